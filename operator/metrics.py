"""Prometheus metrics of the operator (served on --metrics-port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("latentmas_operator_reconciles_total", "Stack reconciles, by result.", ["result"])
RECONCILE_ERRORS = Counter(
    "latentmas_operator_reconcile_errors_total", "Reconciles that raised, by exception type.", ["error"]
)
RECONCILE_SECONDS = Histogram(
    "latentmas_operator_reconcile_seconds",
    "Wall time of one reconcile (API reads, object-store checks, writes).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("latentmas_operator_queue_depth", "Stacks waiting to be reconciled.")
STAGE_SECONDS = Histogram(
    "latentmas_stage_duration_seconds",
    "Duration of stage attempts, by stage and result.",
    ["stage", "result"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
JOBS_CREATED = Counter(
    "latentmas_stage_jobs_created_total", "Stage Jobs/SparkApplications created, by stage.", ["stage"]
)
CYCLES = Counter("latentmas_cycles_total", "Finished evolution cycles, by trigger and result.", ["trigger", "result"])
CYCLES_STARTED = Counter("latentmas_cycles_started_total", "Started evolution cycles, by trigger.", ["trigger"])
STACKS = Gauge("latentmas_stacks", "Stacks known to the operator, by phase.", ["phase"])
