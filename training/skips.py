"""The skip-an-expert contract: an expert whose domain has no usable data (the synth stage lists it
in `metrics.skippedDomains`) is skipped, not failed. Its train run writes a manifest with
`skipped: true` and the reason; router, evaluate and promote proceed with the experts that have
data; its previously promoted version stays promoted; with fewer than two such experts the router
run is skipped too."""

from __future__ import annotations

from latentmas.spec import ExpertSpec
from latentmas.stage import StageContext

MIN_ROUTER_EXPERTS = 2


def skipped_experts(ctx: StageContext) -> dict[str, str]:
    """Expert name -> why it is skipped this cycle (from the finished synth stage)."""
    domains: dict[str, str] = ctx.read_manifest("synth")["metrics"].get("skippedDomains", {})
    return {e.name: f"expert {e.name!r} skipped: {domains[e.domain]}" for e in ctx.spec.experts if e.domain in domains}


def active_experts(ctx: StageContext) -> list[ExpertSpec]:
    """The experts that train this cycle, in spec order."""
    skipped = skipped_experts(ctx)
    return [e for e in ctx.spec.experts if e.name not in skipped]


def router_skip_reason(experts: list[ExpertSpec]) -> str | None:
    if len(experts) >= MIN_ROUTER_EXPERTS:
        return None
    names = ", ".join(e.name for e in experts) or "none"
    return f"router needs at least {MIN_ROUTER_EXPERTS} experts with data this cycle; have {len(experts)} ({names})"
