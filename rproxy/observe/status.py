"""
The status page: the admin API's C{GET /state} document drawn as one HTML page for people.

L{statusPage} renders the whole page on the server: services, each upstream's health, ejection, last error
and its time, exchanges in flight, pooled connections and latency, then the routes and the tunnels.  It
is a complete snapshot without JavaScript.  A small inline script makes it live: every
L{REFRESH_SECONDS} it fetches the same page again (same origin, with the credentials the browser already
sent) and swaps in the new C{<main>}.  There is one renderer, here, and so one place that escapes: every
text that reaches the page goes through C{html.escape}, because much of it comes from outside (an error
reason quotes what an upstream sent, a route names hosts a configuration author chose).

The page is served with L{PAGE_HEADERS}: a Content-Security-Policy that runs only this script and this
style sheet (by their hashes, so that nothing injected could run even if escaping failed), no framing, no
sniffing, no caching and no referrer.

The typed dictionaries are the shape of C{GET /state} (docs/admin-openapi.json): the admin API builds
them, this page and machines read them.
"""

from __future__ import annotations

import time
from base64 import b64encode
from collections.abc import Iterator, Mapping
from hashlib import sha256
from html import escape
from typing import TypedDict

from rproxy._version import __version__
from rproxy.cluster.health import StoreState

#: Seconds between two refreshes of a page open in a browser.
REFRESH_SECONDS = 2


class PoolState(TypedDict):
    """An upstream's connections: C{open} (opening and idle ones included) and C{idle}."""

    open: int
    idle: int


class ErrorState(TypedDict):
    """An upstream's last error: its C{reason}, and the reactor's time it happened C{at}."""

    reason: str
    at: float


class RegistrationState(TypedDict):
    """A registration through the admin API (see L{rproxy.app.admin.Registration})."""

    id: str
    service: str
    key: str
    weight: int
    ttl: float
    expiresIn: float


class UpstreamState(TypedDict):
    """One upstream of a service, as C{GET /state} shows it (docs/admin.md says what each key means)."""

    key: str
    weight: int
    labels: dict[str, str]
    state: str
    reason: str | None
    ejections: int
    ejectionEndsIn: float | None
    lastError: ErrorState | None
    inFlight: int
    pool: PoolState
    latency: float | None
    balancer: dict[str, float | int | str] | None
    registration: RegistrationState | None


class ServiceState(TypedDict):
    """A service: its name, its balancer's name and its upstreams."""

    name: str
    balancer: str
    upstreams: list[UpstreamState]


class RouteState(TypedDict):
    """A route, in a few words."""

    description: str


class StateDocument(TypedDict):
    """What C{GET /state} answers."""

    shuttingDown: bool
    services: list[ServiceState]
    routes: list[RouteState]
    tunnels: dict[str, int]
    stores: list[StoreState]


_STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #b35900; --bad: #cf222e; --line: #8884; --muted: #777; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 1.5em 1.5em; }
header { display: flex; align-items: baseline; gap: 1em; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.3em; margin: .6em 0; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
h2 small, .muted { color: var(--muted); font-weight: normal; }
#live { margin-left: auto; font-size: .9em; }
#live.live::before { content: "\\25CF  "; color: var(--ok); }
#live.stale { color: var(--bad); }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; font-size: .85em; color: var(--muted); }
th:nth-child(1) { width: 19%; } th:nth-child(2) { width: 14%; } th:nth-child(5) { width: 7em; }
th:nth-child(3), th:nth-child(4), th:nth-child(6), th:nth-child(7) { width: 5.5em; }
.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 13px ui-monospace, monospace; overflow-wrap: anywhere; }
.state { display: inline-block; min-width: 5.5em; padding: 0 .5em; border-radius: 1em; color: #fff;
  font-weight: 600; text-align: center; }
.state-up { background: var(--ok); }
.state-ejected { background: var(--warn); }
.state-down, .banner { background: var(--bad); }
.banner { color: #fff; padding: .5em 1em; border-radius: .3em; margin-top: 1em; font-weight: 600; }
.count-none { color: var(--bad); font-weight: 600; }
footer { margin-top: 2em; color: var(--muted); font-size: .9em; }
"""

_SCRIPT = """
"use strict";
(() => {
  const live = document.getElementById("live");
  const every = Number(live.dataset.every);
  const running = "live, every " + every + " s";
  // The page's own URL without any user:password@ it was opened with: fetch refuses those, and the
  // browser sends the credentials it signed in with anyway.
  const here = new URL(location.pathname, location.origin);
  const show = (text, kind) => { live.textContent = text; live.className = kind; };
  const refresh = async () => {
    if (!document.hidden) {
      try {
        const response = await fetch(here, {credentials: "same-origin", cache: "no-store", redirect: "error"});
        if (!response.ok) {
          throw new Error("the admin listener answered " + response.status);
        }
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById("status");
        if (fresh === null) {
          throw new Error("the answer is not the status page");
        }
        document.getElementById("status").replaceWith(document.adoptNode(fresh));
        show(running, "live");
      } catch (error) {
        show("not refreshed: " + error.message + " (trying again)", "stale");
      }
    }
    setTimeout(refresh, every * 1000);
  };
  show(running, "live");
  setTimeout(refresh, every * 1000);
})();
"""


def _hash(text: str) -> str:
    """A CSP source expression allowing exactly the inline element whose content is C{text}."""
    return "'sha256-" + b64encode(sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


#: The headers the page is served with.
PAGE_HEADERS: Mapping[bytes, bytes] = {
    b"content-type": b"text/html; charset=utf-8",
    b"cache-control": b"no-store",
    b"content-security-policy": (
        f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ).encode("ascii"),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-resource-policy": b"same-origin",
}

#: The CSS class of each health state (an unknown one gets none: a class name is never taken from the data).
_STATE_CLASSES = {"up": "state-up", "ejected": "state-ejected", "down": "state-down"}


def _e(value: object) -> str:
    """C{value} as text safe anywhere in the page: in an element or in a quoted attribute."""
    return escape(str(value), quote=True)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _span(seconds: float) -> str:
    """A span of time, as a person says it: C{"8 s"}, C{"3 min"}, C{"2 h"}, C{"4 d"}."""
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f} {unit}"
    return f"{seconds:.0f} s"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "&ndash;"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


def _stateCell(upstream: UpstreamState) -> str:
    state = upstream["state"]
    cell = f'<span class="state {_STATE_CLASSES.get(state, "")}">{_e(state)}</span>'
    endsIn = upstream["ejectionEndsIn"]
    if endsIn is not None:
        cell += f' <span class="muted">{_e(_span(endsIn))} left</span>'
    registration = upstream["registration"]
    if registration is not None:
        cell += f'<br><span class="muted">registered, expires in {_e(_span(registration["expiresIn"]))}</span>'
    return cell


def _errorCell(error: ErrorState | None, now: float) -> str:
    if error is None:
        return '<span class="muted">none</span>'
    at = error["at"]
    return (
        f'<code>{_e(error["reason"])}</code><br><span class="muted">{_e(_clock(at))}, {_e(_span(now - at))} ago</span>'
    )


def _upstreamRow(upstream: UpstreamState, now: float) -> str:
    pool = upstream["pool"]
    return (
        f'<tr data-upstream="{_e(upstream["key"])}" data-state="{_e(upstream["state"])}">'
        f"<td><code>{_e(upstream['key'])}</code>{_labels(upstream['labels'])}</td>"
        f"<td>{_stateCell(upstream)}</td>"
        f'<td class="number">{upstream["weight"]:d}</td>'
        f'<td class="number">{upstream["inFlight"]:d}</td>'
        f'<td class="number">{pool["open"]:d} / {pool["idle"]:d}</td>'
        f'<td class="number">{_latency(upstream["latency"])}</td>'
        f'<td class="number">{upstream["ejections"]:d}</td>'
        f"<td>{_errorCell(upstream['lastError'], now)}</td>"
        f"<td>{_learnt(upstream['balancer'])}</td>"
        "</tr>"
    )


def _labels(labels: Mapping[str, str]) -> str:
    """An upstream's labels, under its key."""
    if not labels:
        return ""
    return '<br><span class="muted">' + _e(" ".join(f"{k}={v}" for k, v in labels.items())) + "</span>"


def _learnt(learnt: Mapping[str, float | int | str] | None) -> str:
    """What the service's balancer has learnt of an upstream (L{rproxy.interfaces.IBalancerState})."""
    if not learnt:
        return '<span class="muted">-</span>'
    return "<br>".join(f"{_e(name)} <code>{_e(str(value))}</code>" for name, value in learnt.items())


_HEADINGS = (
    '<tr><th>Upstream</th><th>State</th><th class="number">Weight</th><th class="number">In flight</th>'
    '<th class="number">Pool open/idle</th><th class="number">Latency</th><th class="number">Ejections</th>'
    "<th>Last error</th><th>Balancer</th></tr>"
)


def _service(service: ServiceState, now: float) -> Iterator[str]:
    upstreams = service["upstreams"]
    up = sum(1 for upstream in upstreams if upstream["state"] == "up")
    count = "count-none" if up == 0 else "count"
    yield (
        f'<section data-service="{_e(service["name"])}"><h2>{_e(service["name"])} '
        f"<small>{_e(service['balancer'])} &middot; "
        f'<span class="{count}">{up} of {len(upstreams)} up</span></small></h2>'
    )
    if not upstreams:
        yield '<p class="muted">No upstreams.</p></section>'
        return
    yield f"<table><thead>{_HEADINGS}</thead><tbody>"
    yield from (_upstreamRow(upstream, now) for upstream in upstreams)
    yield "</tbody></table></section>"


def _main(document: StateDocument, now: float) -> Iterator[str]:
    yield f'<main id="status" data-time="{now:.3f}">'
    if document["shuttingDown"]:
        yield '<p class="banner">rproxy is shutting down: it takes no new connections.</p>'
    for store in document["stores"]:
        if not store["up"]:
            yield (
                f'<p class="banner">{_e(store["store"])} at {_e(store["url"])} out of reach since '
                f"{_e(_clock(store['since']))} ({_e(store['error'])}): {_e(store['fallback'])}.</p>"
            )
    for service in document["services"]:
        yield from _service(service, now)
    yield "<section><h2>Routes <small>in the order they are tried</small></h2><ol>"
    yield from (f"<li><code>{_e(route['description'])}</code></li>" for route in document["routes"])
    yield "</ol></section>"
    if document["stores"]:
        yield "<section><h2>Shared stores <small>what the instances of this gateway share</small></h2>"
        for store in document["stores"]:
            state = "answers" if store["up"] else f"out of reach ({_e(store['error'])})"
            yield (
                f"<p>{_e(store['store'])} at <code>{_e(store['url'])}</code>: {state} since "
                f"{_e(_clock(store['since']))}</p>"
            )
        yield "</section>"
    tunnels = document["tunnels"]
    yield (
        f"<p>Tunnels (WebSockets and other upgraded connections): {tunnels.get('open', 0):d} open, "
        f"{tunnels.get('opened', 0):d} since rproxy started.</p>"
    )
    yield f'<p class="muted">As of {_e(_clock(now))}.</p></main>'


def statusPage(document: StateDocument, now: float) -> bytes:
    """
    The status page showing C{document} (what C{GET /state} answers) at the reactor's time C{now}: a whole
    HTML document, to be served with L{PAGE_HEADERS}.
    """
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>rproxy status</title><style>{_STYLE}</style></head><body>",
        f'<header><h1>rproxy status</h1><span class="muted">rproxy {_e(__version__)}</span>',
        f'<span id="live" class="muted" data-every="{REFRESH_SECONDS:d}">',
        "a snapshot: reload the page to refresh it</span></header>",
        *_main(document, now),
        "<footer>Latency: the moving average of the time to each response head. Pool: connections open "
        "(idle ones included) and idle. The same state, for machines: <code>GET /state</code> with the "
        "bearer token (docs/admin.md).</footer>",
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "".join(parts).encode("utf-8")
