"""Prometheus metrics in the text exposition format (hand-written: no global registry, so any
number of apps can live in one process) and the ASGI middleware that records every request."""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Metrics:
    """Request counters and latency histograms by route; gauges are read at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, list[int]] = {}  # route -> bucket counts (cumulative at render)
        self.latency_sum: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, Callable[[], dict[tuple, float] | float]] = {}
        self.help: dict[str, tuple[str, str]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            counts = self.latency.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
                    break
            self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds
            self.latency_count[route] = self.latency_count.get(route, 0) + 1

    def inc(self, name: str, value: float = 1.0, help: str = "") -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0.0) + value
            if help:
                self.help.setdefault(name, ("counter", help))

    def gauge(self, name: str, help: str, fn: Callable[[], dict[tuple, float] | float], label: str | None = None) -> None:
        """A gauge computed at scrape time: ``fn()`` returns a number or ``{label_value: number}``."""
        self.gauges[name] = (fn, label)
        self.help[name] = ("gauge", help)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP suti_http_requests_total HTTP requests by method, route and status.", "# TYPE suti_http_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f"suti_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            out += ["# HELP suti_http_request_duration_seconds HTTP request latency by route.", "# TYPE suti_http_request_duration_seconds histogram"]
            for route in sorted(self.latency):
                cumulative = 0
                for bound, n in zip(BUCKETS, self.latency[route]):
                    cumulative += n
                    out.append(f"suti_http_request_duration_seconds_bucket{_labels(route=route, le=_num(bound))} {cumulative}")
                out.append(f"suti_http_request_duration_seconds_sum{_labels(route=route)} {self.latency_sum[route]:.6f}")
                out.append(f"suti_http_request_duration_seconds_count{_labels(route=route)} {self.latency_count[route]}")
            for name, value in sorted(self.counters.items()):
                kind, text = self.help.get(name, ("counter", name))
                out += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {_num(value)}"]
        for name, (fn, label) in sorted(self.gauges.items()):
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - a failing gauge must not break the scrape
                continue
            out += [f"# HELP {name} {self.help[name][1]}", f"# TYPE {name} gauge"]
            if isinstance(value, dict):
                for key, v in sorted(value.items()):
                    out.append(f"{name}{_labels(**{label: key})} {_num(v)}")
            else:
                out.append(f"{name} {_num(value)}")
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route template and status, with latency."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope.get("method", "GET"), path, status["code"], time.perf_counter() - started)
