"""HTML pieces of the report: tables, image tiles and grids, the page around them. Every value is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:16px 24px;color:#1c1c1c}
h1{margin:0 0 4px} h2{border-bottom:2px solid #dee2e6;padding-bottom:4px;margin-top:36px}
h3{margin:22px 0 6px} .muted{color:#666} .facts span{margin-right:18px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #dee2e6;padding:3px 9px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px} .charts img{max-width:100%;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:8px} .group{display:flex;gap:8px;padding:6px;background:#f8f9fa;margin:6px 0}
figure{margin:0;width:168px;font-size:11px} figure img{width:160px;height:160px;object-fit:contain;background:#eee}
.placeholder{width:160px;height:160px;background:#e9ecef;color:#495057;overflow:hidden;word-break:break-all;
 padding:6px;box-sizing:border-box;font-size:10px}
figure.survivor img,figure.survivor .placeholder{outline:3px solid #2b8a3e}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.cols{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
"""


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{escape(str(value))}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:,.4g}</td>'
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return f"<td>{escape(str(value))}</td>"


def table(headers: list[str], rows: list[list[Any]], css_class: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{escape(css_class)}"><tr>{head}</tr>{body}</table>'


def chart(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _number(value: Any, digits: int = 2) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def tile(detail: dict[str, Any] | None, uri: str | None, survivor: bool = False) -> str:
    """One image with its scores; a placeholder with the URL where no image was stored."""
    detail = detail or {}
    score = detail.get("aesthetic_score", detail.get("aesthetic"))
    if score is None:
        score = detail.get("aesthetic")
    watermark = detail.get("watermark_prob")
    watermark = detail.get("pwatermark") if watermark is None else watermark
    width = detail.get("original_width") or detail.get("width")
    height = detail.get("original_height") or detail.get("height")
    size = f"{int(width)}×{int(height)}" if width and height else "size ?"
    reason = detail.get("drop_reason") or "kept"
    caption = detail.get("caption") or ""
    if uri:
        picture = f'<img src="{uri}" alt="{escape(caption[:80])}">'
    else:
        picture = (f'<div class="placeholder">no stored image ({escape(reason)})<br><br>'
                   f'{escape(str(detail.get("url") or "no URL"))}</div>')
    extra = " · ".join(f"{name} {_number(detail.get(key))}"
                       for name, key in (("nsfw", "punsafe"), ("clip", "clip_score")) if detail.get(key) is not None)
    lines = [f"aesthetic {_number(score)} · wm {_number(watermark)}", *([extra] if extra else []),
             f"{size} · row {detail.get('row', '?')}",
             escape(reason) + (f" ({escape(str(detail['drop_detail']))})" if detail.get("drop_detail") else ""),
             escape(caption)]
    title = escape(" | ".join(str(x) for x in (caption, detail.get("url"), detail.get("key")) if x))
    css = ' class="survivor"' if survivor else ""
    css += ' data-blurred="true"' if uri and detail.get("blurred") else ""
    captions = "".join(f"<figcaption>{line}</figcaption>" for line in lines)
    return f'<figure{css} title="{title}" data-row="{detail.get("row", "")}">{picture}{captions}</figure>'


def grid(rows: list[int], details: dict[int, dict[str, Any]], thumbs: dict[int, str]) -> str:
    if not rows:
        return '<p class="muted">no rows</p>'
    return '<div class="grid">' + "".join(tile(details.get(r), thumbs.get(r)) for r in rows) + "</div>"


def group(survivor: int | None, copies: list[int], details: dict[int, dict[str, Any]],
          thumbs: dict[int, str]) -> str:
    """A duplicate group: the survivor (outlined) first, then the dropped copies."""
    first = tile(details.get(survivor), thumbs.get(survivor), survivor=True) if survivor is not None else (
        '<figure class="survivor"><div class="placeholder">survivor not found</div></figure>')
    return '<div class="group">' + first + "".join(tile(details.get(r), thumbs.get(r)) for r in copies) + "</div>"
