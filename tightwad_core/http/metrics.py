"""Prometheus metrics and the JSON status, both read from live state at
request time. Each app has its own registry (no global state)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tightwad_core.http.common import ServerState


class _SpecCollector:
    """Speculation figures straight from the mode's totals."""

    def __init__(self, st: ServerState) -> None:
        self.st = st

    def collect(self) -> Any:
        s = self.st.mode.status()
        if "rounds" not in s:
            return
        for name, key, doc in (
            ("tightwad_spec_requests", "requests", "Requests served by speculation"),
            ("tightwad_spec_relayed_requests", "relayed", "Requests relayed to the target (K = 0)"),
            ("tightwad_spec_rounds", "rounds", "Draft-and-verify rounds"),
            ("tightwad_spec_draft_tokens", "drafted", "Draft tokens proposed"),
            ("tightwad_spec_accepted_tokens", "accepted", "Draft tokens the target accepted"),
            ("tightwad_spec_emitted_tokens", "emitted", "Tokens emitted by speculation"),
            ("tightwad_spec_draft_failures", "draft_failures", "Proposals that failed or timed out"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s[key]))
            yield c
        secs = CounterMetricFamily("tightwad_spec_seconds", "Time spent, by phase", labels=["phase"])
        for phase, value in s["time_s"].items():
            if value is not None:
                secs.add_metric([phase], float(value))
        yield secs
        k = GaugeMetricFamily("tightwad_spec_draft_length", "Current draft length K")
        k.add_metric([], float(s["draft_length"]["k"]))
        yield k
        acc = GaugeMetricFamily("tightwad_spec_acceptance_estimate", "Moving-average acceptance rate")
        acc.add_metric([], float(s["draft_length"]["acceptance_estimate"]))
        yield acc
        h = s.get("round_histogram")
        if h:
            fam = HistogramMetricFamily("tightwad_spec_tokens_per_round",
                                        "Tokens emitted per round, per request")
            fam.add_metric([], buckets=[(label, float(c)) for label, c in h["buckets"]],
                           sum_value=float(h["sum"]))
            yield fam


class _ModeCollector:
    """Families a mode describes itself: ``status()["metrics"]`` is a list of
    ``{"name", "help", "type": "counter" | "gauge", "labels": [...],
    "samples": [[[label values...], value], ...]}``."""

    def __init__(self, st: ServerState) -> None:
        self.st = st

    def collect(self) -> Any:
        for fam in self.st.mode.status().get("metrics") or ():
            kind = CounterMetricFamily if fam.get("type") == "counter" else GaugeMetricFamily
            m = kind(fam["name"], fam.get("help", ""), labels=list(fam.get("labels") or ()))
            for labels, value in fam.get("samples") or ():
                if value is not None:
                    m.add_metric([str(v) for v in labels], float(value))
            yield m


class Metrics:
    def __init__(self, st: ServerState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tightwad_requests", "HTTP requests answered",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("tightwad_request_seconds", "Time to the response head (streams: first token)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.registry.register(_SpecCollector(st))
        self.registry.register(_ModeCollector(st))
        self.started = time.time()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
