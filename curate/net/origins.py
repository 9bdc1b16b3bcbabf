"""Opt-out files of an origin (scheme, host, port): robots.txt (RFC 9309) and TDMRep's /.well-known/tdmrep.json.

Each is fetched once per origin and run (per download process; a resumed local run loads what the first run fetched
from the download checkpoint) through the same guarded client as the images: its own deadline, a 500 KiB cap (the
RFC's minimum a crawler parses: a longer file is cut there, not refused), every redirect hop vetted again, at most
five hops. RFC 9309's rule on failures: a 4xx (or more than five redirects) means no robots.txt, so everything is
allowed; a 5xx, a 429, a timeout or an unreachable or refused server means everything is disallowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from protego import Protego

from curate.net.fetch import FetchError, FetchPolicy, Session, _origin, fetch, resolve

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
MAX_BYTES = 500 * 1024  # RFC 9309 2.5: crawlers parse at least the first 500 KiB
# What fetching an origin's file gave: read; absent (4xx, too many redirects); unreachable (5xx, 429, network,
# a refused redirect); origin_failed (the origin itself is refused or has no address: the image fetch says why).
READ, ABSENT, UNREACHABLE, ORIGIN_FAILED = "read", "absent", "unreachable", "origin_failed"
KINDS = {"robots": ROBOTS_PATH, "tdmrep": TDMREP_PATH}
# Files a process keeps (the least recently used go first): memory stays bounded on a corpus of millions of origins,
# at the price of asking an origin again when its URLs come further apart than this many other origins.
MAX_KEPT = 50_000
PARSED = 4096  # parsed robots.txt and tdmrep.json files kept per process


@dataclass(frozen=True)
class OriginFile:
    origin: str  # scheme://host:port
    kind: str  # robots or tdmrep
    outcome: str  # READ, ABSENT, UNREACHABLE or ORIGIN_FAILED
    body: str | None = None
    detail: str = ""
    reason: str = ""  # the fetch's failure reason, when it failed

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def origin_of(url: str) -> str | None:
    """scheme://host:port of url (IDNA, lower case, default port filled in); None for a URL fetch would refuse."""
    try:
        found = _origin(url)
    except FetchError:
        return None
    host = f"[{found.host}]" if ":" in found.host else found.host
    return f"{found.scheme}://{host}:{found.port}"


def fetch_origin_file(origin: str, kind: str, policy: FetchPolicy, session: Session | None) -> OriginFile:
    """Fetch robots.txt or tdmrep.json of origin; every failure is an outcome, never an exception."""
    parts = _origin(origin + "/")
    try:  # the origin itself refused or unresolvable: the image fetch reports that, no file is asked for
        resolve(parts.host, parts.port, policy, policy.timeout)
    except FetchError as error:
        return OriginFile(origin, kind, ORIGIN_FAILED, None, f"{error.reason}: {error}"[:500], error.reason)
    small = dataclasses.replace(policy, max_bytes=MAX_BYTES, truncate=True, disallowed_directives=(),
                                honour_tdm_header=False)
    try:
        body = fetch(origin + KINDS[kind], small, session)
    except FetchError as error:
        detail = f"{error.reason}: {error}"[:500]
        status = str(error)[5:8] if error.reason == "http_error" else ""
        if error.reason == "too_many_redirects" or (status.startswith("4") and status != "429"):
            return OriginFile(origin, kind, ABSENT, None, detail, error.reason)
        return OriginFile(origin, kind, UNREACHABLE, None, detail, error.reason)
    return OriginFile(origin, kind, READ, body.decode("utf-8", "replace"))


class OriginCache:
    """The opt-out files one run has fetched, shared by a process's download threads: a file many threads want at
    once is fetched by the first and waited for by the others. `learned()` hands over what is new since the last
    call, for the download checkpoint; `load` takes back what an earlier attempt of the run fetched."""

    def __init__(self, max_kept: int = MAX_KEPT, track: bool = False) -> None:
        """track: keep what is fetched for learned() (the caller must drain it: the local engine, per part)."""
        self._lock, self.max_kept, self.track = threading.Lock(), max_kept, track
        self._known: OrderedDict[tuple[str, str], OriginFile] = OrderedDict()
        self._pending: dict[tuple[str, str], threading.Event] = {}
        self._new: list[OriginFile] = []
        self.fetched = 0  # files this cache fetched itself (the rest came from load)

    def get(self, origin: str, kind: str, fetcher: Callable[[], OriginFile]) -> OriginFile:
        key = (origin, kind)
        while True:
            with self._lock:
                if key in self._known:
                    self._known.move_to_end(key)
                    return self._known[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
            if waiting is not None:
                waiting.wait()
                continue  # the fetching thread stored it (or failed: then this one tries)
            found: OriginFile | None = None
            try:
                found = fetcher()
            finally:
                with self._lock:
                    if found is not None:
                        self._keep(key, found)
                        if self.track:
                            self._new.append(found)
                        self.fetched += 1
                    self._pending.pop(key).set()
            return found

    def load(self, records: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for record in records:
                found = OriginFile(**record)
                self._keep((found.origin, found.kind), found)

    def _keep(self, key: tuple[str, str], found: OriginFile) -> None:
        self._known[key] = found
        while len(self._known) > self.max_kept:
            self._known.popitem(last=False)

    def learned(self) -> list[OriginFile]:
        with self._lock:
            new, self._new = self._new, []
        return new


@lru_cache(maxsize=PARSED)
def robots_parser(body: str) -> Protego:
    """Protego (Scrapy's RFC 9309 parser: wildcards, `$`, the longest match wins); one parse per distinct file."""
    return Protego.parse(body)


def robots_refusal(found: OriginFile, url: str, agents: tuple[str, ...]) -> str | None:
    """Why robots.txt forbids url to any of agents (RFC 9309's failure rules included); None when allowed."""
    if found.outcome == UNREACHABLE:
        return f"{found.origin}{ROBOTS_PATH} unreachable ({found.detail}): RFC 9309 treats that as disallow all"
    if found.outcome != READ or found.body is None:
        return None
    parser = robots_parser(found.body)
    for agent in agents:
        if not parser.can_fetch(url, agent):
            return f"{found.origin}{ROBOTS_PATH} disallows it for user agent {agent}"[:500]
    return None


def _location_pattern(location: str) -> re.Pattern[str]:
    """A TDMRep location (robots.txt's syntax: `*` any run of characters, `$` the end) as a prefix pattern."""
    location = location if location.startswith("/") else "/" + location
    anchored = location.endswith("$")
    body = ".*".join(re.escape(piece) for piece in location.rstrip("$").split("*"))
    return re.compile(body + ("$" if anchored else ""))


@lru_cache(maxsize=PARSED)
def tdm_rules(body: str) -> tuple[tuple[re.Pattern[str], bool], ...] | None:
    """(location pattern, reserved) in file order; None when the file is not TDMRep's JSON array of rules."""
    try:
        rules = json.loads(body)
    except ValueError:
        return None
    if not isinstance(rules, list):
        return None
    parsed = []
    for rule in rules:
        if isinstance(rule, dict) and isinstance(rule.get("location"), str):
            parsed.append((_location_pattern(rule["location"]), str(rule.get("tdm-reservation")) == "1"))
    return tuple(parsed)


def tdm_reservation(found: OriginFile, url: str) -> str | None:
    """Why tdmrep.json reserves url's text-and-data-mining rights (its first matching rule decides); None if not."""
    rules = tdm_rules(found.body) if found.outcome == READ and found.body is not None else None
    if not rules:
        return None
    parts = _origin(url)
    for pattern, reserved in rules:
        if pattern.match(parts.target):
            return f"{found.origin}{TDMREP_PATH} reserves TDM rights on {pattern.pattern}"[:500] if reserved else None
    return None
