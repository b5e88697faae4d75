"""Prometheus metrics of `mrtune serve`, in a registry of their own (one per app, so tests can build several)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Labels take only these values (anything else is "other"), so that requests for random paths cannot grow the
# metrics without bound.
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/parse", "/v1/completions", "/v1/chat/completions")


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mrtune_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mrtune_request_latency_seconds",
            "Time from a request's arrival to its answer, by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.rows = Counter("mrtune_rows", "Rows (sentences or prompts) decoded", registry=self.registry)
        self.batch_size = Histogram(
            "mrtune_batch_size",
            "Rows per decoded batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.errors = Counter("mrtune_errors", "Requests refused or failed, by kind", ["kind"], registry=self.registry)
        self.queued_rows = Gauge("mrtune_queued_rows", "Rows waiting for a batch", registry=self.registry)

    def endpoint(self, path: str) -> str:
        return path if path in ENDPOINTS else "other"

    def observe_batch(self, rows: int) -> None:
        self.batch_size.observe(rows)
        self.rows.inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
