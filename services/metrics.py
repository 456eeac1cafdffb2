"""Prometheus metrics of one server (its own registry, so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "inference_latency_seconds",
            "Request latency from admission to the last token.",
            ["endpoint"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.first_token = Histogram(
            "inference_time_to_first_token_seconds", "Time to the first streamed token.", registry=r
        )
        self.tokens = Counter("inference_tokens_total", "Tokens processed.", ["kind"], registry=r)
        self.requests = Counter(
            "inference_requests_total",
            "Requests by outcome: ok, refused (4xx/429/503), error (failed while generating), disconnected "
            "(the client went away first).",
            ["endpoint", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Rows per forward pass.",
            ["phase"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.adapter_events = Counter(
            "inference_adapter_events_total",
            "Adapter cache events: load, evict, unload, cpu_evict, hit, miss.",
            ["event"],
            registry=r,
        )
        self.reload_latency = Histogram(
            "inference_adapter_reload_seconds",
            "From noticing a new registry version to serving it.",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.reload_failures = Counter("inference_adapter_reload_failures_total", "Rejected versions.", registry=r)
        self.registry_refused = Counter(
            "inference_registry_refused_reads_total",
            "Registry reads not applied (the last good revision keeps serving), by reason: missing, empty, "
            "unparseable, older, storage.",
            ["reason"],
            registry=r,
        )
        self.registry_revision = Gauge("inference_registry_revision", "Registry revision being served.", registry=r)
        self.in_flight = Gauge("inference_requests_in_flight", "Requests admitted and not finished.", registry=r)
        self.slots_used = Gauge("inference_adapter_slots_used", "Device adapter slots holding an adapter.", registry=r)

    def batch(self, size: int, prefill: bool) -> None:
        self.batch_size.labels("prefill" if prefill else "decode").observe(size)

    def tokens_done(self, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.labels("prompt").inc(prompt)
        if completion:
            self.tokens.labels("completion").inc(completion)

    def adapter_event(self, event: str) -> None:
        self.adapter_events.labels(event).inc()
