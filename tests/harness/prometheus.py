"""A private Prometheus server (Debian's ``prometheus``) scraping one target (REAL-SERVICES §11.3)."""
from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from typing import Any, List, Optional

from tests.harness.base import ManagedProcess, find_program, free_port, scratch_dir, tail, tcp_accepts, wait_until, write_file


class Prometheus:
    """``prometheus`` on a free loopback port, scraping ``target`` (``HOST:PORT``) every second."""

    host = "127.0.0.1"

    def __init__(self, target: str) -> None:
        self.dir = scratch_dir("prometheus")
        self.port = free_port()
        self.target = target
        self.config_path = write_file(
            os.path.join(self.dir, "prom.yml"),
            "global: { scrape_interval: 1s, evaluation_interval: 1s }\n"
            "scrape_configs:\n"
            "  - job_name: rmilter\n"
            "    static_configs: [ { targets: [%s] } ]\n" % json.dumps(target),
        )
        self.log_path = os.path.join(self.dir, "prometheus.log")
        self.process: Optional[ManagedProcess] = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        argv = [
            find_program("prometheus"),
            "--config.file=" + self.config_path,
            "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
            "--web.listen-address=%s:%d" % (self.host, self.port),
        ]
        self.process = ManagedProcess(argv, self.log_path, cwd=self.dir)
        wait_until(lambda: tcp_accepts(self.host, self.port), timeout, "prometheus on port %d" % self.port,
                   lambda: tail(self.log_path))
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def api(self, path: str, **params: str) -> Any:
        url = "http://%s:%d/api/v1/%s?%s" % (self.host, self.port, path, urllib.parse.urlencode(params))
        with urllib.request.urlopen(url, timeout=5) as reply:
            document = json.load(reply)
        if document.get("status") != "success":
            raise AssertionError("prometheus %s: %r" % (path, document))
        return document["data"]

    def query(self, expression: str) -> List[Any]:
        """The instant vector of ``expression``: [(labels, value), ...]."""
        return [(r["metric"], float(r["value"][1])) for r in self.api("query", query=expression)["result"]]

    def scalar(self, expression: str) -> Optional[float]:
        """The one value of ``expression`` (a ``sum(...)``), None while there is no series."""
        result = self.query(expression)
        return result[0][1] if result else None

    def wait_for(self, expression: str, expected: float, timeout: float = 30.0) -> float:
        """Poll until ``expression`` equals ``expected`` (scrapes land once a second)."""
        wait_until(lambda: self.scalar(expression) == expected, timeout,
                   "prometheus: %s == %s (now %r)" % (expression, expected, self.scalar(expression)),
                   lambda: "targets: %r\n%s" % (self.api("targets"), tail(self.log_path)), interval=0.5)
        return expected
