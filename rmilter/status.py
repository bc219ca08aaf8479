"""The metrics listener's pages (issue 14): ``/metrics``, ``/health`` and a status page at ``/``.

``site(metrics, source)`` builds the ``twisted.web`` site the service binds to
``metrics_socket``.  ``source`` is the running service (or a test double) with
``health()``, ``runtime`` and ``clock``; this module reads it and never imports the
service.  Every page is rendered in the reactor thread: the exposition of a few
hundred series takes well under a millisecond, and no thread pool touches the metrics.
"""
from __future__ import annotations

import html
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rmilter import __version__
from rmilter.metrics import ACTIONS, Metrics, backend_states

#: chart colours per action (the page has no stylesheet framework; colours say it at a glance)
COLOURS = {"accept": "#3a9d5d", "reject": "#c0392b", "tempfail": "#e6a23c", "discard": "#7f8c8d",
           "quarantine": "#8e44ad"}


def health(source: Any) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, document): 200 when serving mail, 503 while shutting down or with no listener up."""
    document: Dict[str, Any] = source.health()
    if document.get("shutting_down"):
        document["status"] = "shutting down"
        return 503, document
    if not document.get("listeners"):
        document["status"] = "no listener"
        return 503, document
    if document.get("workers") and not document.get("workers_alive"):  # workers = N: none serving now
        document["status"] = "no worker"
        return 503, document
    document["status"] = "ok"
    return 200, document


class _Page(Resource):
    """A page rendered at once, or (``refresh``: the main process of ``workers = N``) once the
    workers' fresh figures are in."""

    isLeaf = True
    refresh: Optional[Callable[[], Deferred]] = None

    def render_GET(self, request: Any) -> Any:
        if self.refresh is None:
            return self.render_page(request)
        finished: List[bool] = []
        request.notifyFinish().addBoth(finished.append)

        def render(_: Any) -> None:
            if not finished:  # the client may have gone while the workers answered
                request.write(self.render_page(request))
                request.finish()

        self.refresh().addBoth(render)
        return NOT_DONE_YET

    def render_page(self, request: Any) -> bytes:
        raise NotImplementedError


def _states(source: Any) -> List[Tuple[str, str, bool]]:
    if hasattr(source, "backend_states"):  # the main process of workers = N sums its workers'
        return source.backend_states()  # type: ignore[no-any-return]
    return backend_states(source.runtime.deps, source.clock.seconds())


class MetricsPage(_Page):
    """``GET /metrics``: the Prometheus text exposition of the process's registry."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_page(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)


class HealthPage(_Page):
    """``GET /health``: JSON, 200 or 503 (what ``rmilter status`` prints)."""

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.source = source

    def render_page(self, request: Any) -> bytes:
        code, document = health(self.source)
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class StatusPage(_Page):
    """``GET /``: one HTML page an administrator looks at instead of the log."""

    def __init__(self, metrics: Metrics, source: Any) -> None:
        super().__init__()
        self.metrics = metrics
        self.source = source

    def render_page(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        code, document = health(self.source)
        states = _states(self.source)
        return status_html(self.metrics.per_minute(), states, list(self.metrics.recent), code, document).encode("utf-8")


def site(metrics: Metrics, source: Any, refresh: Optional[Callable[[], Deferred]] = None) -> Site:
    """``refresh``: called before each page (the main process gathers its workers' figures)."""
    root = Resource()
    pages: List[_Page] = [StatusPage(metrics, source), MetricsPage(metrics), HealthPage(source)]
    for page, name in zip(pages, (b"", b"metrics", b"health")):
        page.refresh = refresh
        # zope interfaces are invisible to mypy without its plugin: the pages are IResources
        root.putChild(name, page)  # type: ignore[arg-type]
    factory = Site(root)
    factory.noisy = False
    factory.displayTracebacks = False
    return factory


# -- the status page ---------------------------------------------------------------------------
CHART_WIDTH, CHART_HEIGHT, CHART_LEFT, CHART_BOTTOM = 720, 200, 40, 20


def chart_svg(minutes: Sequence[Tuple[int, Dict[str, int]]]) -> str:
    """Stacked bars, one per minute, by action; an inline SVG (no script, nothing to load)."""
    peak = max([sum(counts.values()) for _, counts in minutes] + [1])
    plot_w, plot_h = CHART_WIDTH - CHART_LEFT, CHART_HEIGHT - CHART_BOTTOM
    slot = plot_w / max(len(minutes), 1)
    parts: List[str] = [
        '<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
        'aria-label="messages per minute by action">' % (CHART_WIDTH, CHART_HEIGHT),
        '<rect x="%d" y="0" width="%d" height="%d" fill="#f7f7f7"/>' % (CHART_LEFT, plot_w, plot_h),
        '<text x="%d" y="12" font-size="11" text-anchor="end">%d</text>' % (CHART_LEFT - 4, peak),
        '<text x="%d" y="%d" font-size="11" text-anchor="end">0</text>' % (CHART_LEFT - 4, plot_h),
        '<text x="%d" y="%d" font-size="11">-60 min</text>' % (CHART_LEFT, CHART_HEIGHT - 4),
        '<text x="%d" y="%d" font-size="11" text-anchor="end">now</text>' % (CHART_WIDTH, CHART_HEIGHT - 4),
    ]
    for i, (minute, counts) in enumerate(minutes):
        y = float(plot_h)
        for action in ACTIONS:
            count = counts.get(action, 0)
            if not count:
                continue
            h = plot_h * count / peak
            y -= h
            parts.append(
                '<rect class="bar" data-action="%s" data-count="%d" x="%.1f" y="%.1f" width="%.1f" '
                'height="%.1f" fill="%s"><title>%s: %d %s</title></rect>'
                % (action, count, CHART_LEFT + i * slot + 1, y, max(slot - 2, 1), h, COLOURS[action],
                   time.strftime("%H:%M", time.gmtime(minute * 60)), count, action))
    parts.append("</svg>")
    return "".join(parts)


def status_html(minutes: Sequence[Tuple[int, Dict[str, int]]], states: Sequence[Tuple[str, str, bool]],
                recent: Sequence[str], code: int, document: Dict[str, Any]) -> str:
    e = html.escape
    totals = {action: sum(c.get(action, 0) for _, c in minutes) for action in ACTIONS}
    legend = " ".join('<span class="legend" style="color:%s">&#9632; %s %d</span>' % (COLOURS[a], a, totals[a])
                      for a in ACTIONS)
    rows = "".join('<tr class="backend %s"><td>%s</td><td>%s</td><td>%s</td></tr>'
                   % ("alive" if alive else "dead", e(backend), e(server), "alive" if alive else "dead")
                   for backend, server, alive in states) or '<tr><td colspan="3">no backend configured</td></tr>'
    lines = "\n".join(e(line) for line in reversed(recent)) or "no message yet"
    listeners = ", ".join(e(str(x)) for x in document.get("listeners", ())) or "none"
    return """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<title>rmilter status</title>
<style>body{font-family:sans-serif;margin:1em 2em}td,th{padding:2px 12px;text-align:left}
tr.dead td{color:#c0392b;font-weight:bold}pre{font-size:12px;background:#f7f7f7;padding:8px;overflow-x:auto}
</style></head><body>
<h1>rmilter %(version)s</h1>
<p id="health" data-code="%(code)d">%(status)s &middot; configuration generation %(generation)s &middot;
listening on %(listeners)s &middot; %(in_flight)s messages in flight on %(connections)s connections%(workers)s</p>
<h2>Messages per minute, last hour</h2>
%(chart)s
<p id="legend">%(legend)s</p>
<h2>Backends</h2>
<table id="backends"><tr><th>backend</th><th>server</th><th>state</th></tr>%(rows)s</table>
<h2>Last %(count)d messages</h2>
<pre id="summaries">%(lines)s</pre>
</body></html>
""" % dict(version=e(__version__), code=code, status=e(str(document.get("status"))),
           generation=e(str(document.get("config_generation"))), listeners=listeners,
           in_flight=e(str(document.get("messages_in_flight", 0))),
           connections=e(str(document.get("connections", 0))), chart=chart_svg(minutes), legend=legend,
           rows=rows, count=len(recent), lines=lines,
           workers=(' &middot; <span id="workers">%d of %d workers alive</span>'
                    % (document.get("workers_alive", 0), document["workers"]) if document.get("workers") else ""))
