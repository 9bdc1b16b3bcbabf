"""Consent before download: robots.txt and tdmrep.json of the URL's origin, then the response's opt-out headers; the
outcome of every check is kept per row (consent_robots, consent_tdm, consent_headers), so a dataset card can say
which signals its samples passed."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curate.net.origins import (
    ABSENT,
    ORIGIN_FAILED,
    READ,
    OriginCache,
    OriginFile,
    fetch_origin_file,
    origin_of,
    robots_refusal,
    tdm_reservation,
)
from curate.schema import STATUS, table_schema

if TYPE_CHECKING:
    from curate.net.fetch import Session
    from curate.stages.download import DownloadOptions

CONSENT_ROBOTS, CONSENT_TDM, CONSENT_HEADERS = "consent_robots", "consent_tdm", "consent_headers"
CONSENT_COLUMNS = (CONSENT_ROBOTS, CONSENT_TDM, CONSENT_HEADERS)
NOT_CHECKED = "not_checked"
ROBOTS_DISALLOWED, TDM_RESERVED, OPTED_OUT = "robots_disallowed", "tdm_reserved", "opted_out"
_TDMREP_VALUES = {READ: "not_reserved", ABSENT: "no_tdmrep"}
_RUN_CACHES: OrderedDict[str, OriginCache] = OrderedDict()
_RUN_CACHES_LOCK = threading.Lock()


def not_checked() -> dict[str, Any]:
    return dict.fromkeys(CONSENT_COLUMNS, NOT_CHECKED)


def run_cache(token: str) -> OriginCache:
    """This process's cache of one run's opt-out files (Spark: shared by every task of the run the worker runs)."""
    with _RUN_CACHES_LOCK:
        cache = _RUN_CACHES.setdefault(token, OriginCache())
        _RUN_CACHES.move_to_end(token)
        while len(_RUN_CACHES) > 4:  # a worker process that outlives a run drops its files
            _RUN_CACHES.popitem(last=False)
        return cache


def check_origin(url: str, options: DownloadOptions, session: Session | None, origins: OriginCache) -> dict[str, Any]:
    """The consent columns known before the image is asked for, with STATUS and error set when it must not be."""
    record = not_checked()
    origin = origin_of(url)
    if origin is None or not (options.respect_robots or options.respect_tdm):
        return record  # an invalid URL: the fetch says why

    def file(kind: str) -> OriginFile:
        return origins.get(origin, kind, lambda: fetch_origin_file(origin, kind, options.policy, session))

    if options.respect_robots:
        robots = file("robots")
        if robots.outcome == ORIGIN_FAILED:
            return record
        if robots.reason == "connection_failed":  # the server is down, not its robots.txt: say so (and retry later)
            return {**record, CONSENT_ROBOTS: "unreachable", STATUS: robots.reason,
                    "error": f"robots.txt not fetched, so the image was not asked for: {robots.detail}"[:500]}
        why = robots_refusal(robots, url, (options.policy.user_agent_token, *options.robots_agents))
        if why is not None:
            verdict = "disallowed" if robots.outcome == READ else "unreachable"
            return {**record, CONSENT_ROBOTS: verdict, STATUS: ROBOTS_DISALLOWED, "error": why}
        record[CONSENT_ROBOTS] = "allowed" if robots.outcome == READ else "no_robots"
    if options.respect_tdm:
        tdmrep = file("tdmrep")
        if tdmrep.outcome == ORIGIN_FAILED:
            return record
        why = tdm_reservation(tdmrep, url)
        if why is not None:
            return {**record, CONSENT_TDM: "reserved", STATUS: TDM_RESERVED, "error": why}
        record[CONSENT_TDM] = _TDMREP_VALUES.get(tdmrep.outcome, "tdmrep_unreachable")
    return record


def header_consent(reason: str | None, options: DownloadOptions) -> str:
    """consent_headers after the image request: what its headers said (reason: the fetch's failure, None if none)."""
    if reason in (OPTED_OUT, TDM_RESERVED):
        return reason
    checked = bool(options.policy.disallowed_directives) or options.policy.honour_tdm_header
    return "allowed" if reason is None and checked else NOT_CHECKED


def origins_table(files: list[OriginFile]) -> pa.Table:
    """Opt-out files as the rows of an origins part (curate/schemas/origins.arrow.json)."""
    return pa.Table.from_pylist([found.record() for found in files], schema=table_schema("origins"))
