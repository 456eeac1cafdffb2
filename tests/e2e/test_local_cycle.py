"""`latentmas demo` at test scale: a whole cycle on the embedded store, reuse on re-run, then serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
from latentmas.localrun import StackDocument, load_stack, run_cycle, timing_table, with_local_store
from latentmas.registry import load_registry
from latentmas.store import open_store

pytestmark = pytest.mark.e2e
EXPERTS = ("python", "linux", "licenses")


def small_stack(path: Path) -> Path:
    """The bundled demo stack cut down to three experts and a few training steps."""
    document = yaml.safe_load((Path(__file__).parents[2] / "core" / "demo-stack-tiny.yaml").read_text())
    document["spec"]["experts"] = [{"name": e, "domain": e} for e in EXPERTS]
    document["spec"]["pipeline"]["training"]["maxSteps"] = 30
    document["spec"]["evaluation"] = {"gate": "base", "minImprovement": 0.0}  # 8 documents a domain: no intervals
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def finished_cycle(tmp_path_factory: pytest.TempPathFactory) -> StackDocument:
    root = tmp_path_factory.mktemp("demo")
    stack = with_local_store(load_stack(small_stack(root / "stack.yaml")), root / "store")
    store = open_store(stack.spec.storage)
    for bucket in ("raw", "artifacts"):
        store.ensure_bucket(bucket)
    upload_corpus(store, "raw", default_corpus_dir(), domains=EXPERTS, per_domain=8)
    report = run_cycle(stack, "c1", store)
    assert not any(t.reused for t in report.timings)
    assert max(t.seconds for t in report.timings) <= report.wall_seconds <= report.stage_seconds + 1
    assert timing_table(report).startswith(f"cycle c1: {report.wall_seconds:.1f} s wall")
    return stack


def promoted_experts(stack: StackDocument) -> set[str]:
    registry = load_registry(open_store(stack.spec.storage), "artifacts", stack.namespace, stack.name)
    return {name for name, entry in registry.experts.items() if entry.current is not None}


def test_local_cycle_decides_every_expert_and_reuses_finished_stages(finished_cycle: StackDocument) -> None:
    """Every expert gets a gate decision with its reason (promoted as v1 or refused); the base and the index
    are promoted whatever the experts' fate (a first cycle serves its base), and a re-run reuses everything."""
    store = open_store(finished_cycle.spec.storage)
    registry = load_registry(store, "artifacts", finished_cycle.namespace, finished_cycle.name)
    assert registry.index.current == 1 and registry.base.current == 1
    prefix = f"{finished_cycle.namespace}/{finished_cycle.name}/cycles/c1/promote/promotion.json"
    decisions = json.loads(store.get_bytes("artifacts", prefix))["decisions"]
    for expert in EXPERTS:
        decision = decisions[expert]
        assert decision["reason"], decision
        promoted = registry.experts[expert].current if expert in registry.experts else None
        assert (promoted == 1) == decision["promoted"], (expert, decision)
    again = run_cycle(finished_cycle, "c1", store, parallel=2)  # reused runs are checked here, not in workers
    assert all(t.reused for t in again.timings)


def test_served_cycle_answers_with_routing_and_citations(finished_cycle: StackDocument, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from latentmas.services.app import create_app
    from latentmas.services.settings import ServeSettings

    settings = ServeSettings.from_spec(
        finished_cycle.namespace, finished_cycle.name, finished_cycle.spec, device="cpu", cache_dir=tmp_path
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").text
            time.sleep(0.5)
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert promoted_experts(finished_cycle) <= listed
        answer = client.post(
            "/generate", json={"prompt": "Which file permissions does chmod 755 set?", "max_tokens": 8}
        ).json()
        assert answer["domain"] in (*EXPERTS, "base")
        assert 0.0 <= answer["domain_confidence"] <= 1.0
        assert isinstance(answer["response"], str)


def test_cycle_cli_reports_reuse(finished_cycle: StackDocument, tmp_path: Path) -> None:
    store_dir = finished_cycle.spec.storage.endpoint.removeprefix("file://")
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "latentmas.io/v1alpha1",
                "kind": "LatentMASStack",
                "metadata": {"name": finished_cycle.name, "namespace": finished_cycle.namespace},
                "spec": finished_cycle.spec.model_dump(by_alias=True, exclude_none=True),
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentmas",
            "cycle",
            "run",
            "--local",
            "-f",
            str(stack_file),
            "--cycle-id",
            "c1",
            "--store",
            store_dir,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(reused)") == len(finished_cycle.spec.experts) + 8


def test_report_has_every_expert_and_its_plots(finished_cycle: StackDocument, tmp_path: Path) -> None:
    from latentmas.report import read_cycle, write_report

    store = open_store(finished_cycle.spec.storage)
    facts = read_cycle(store, "artifacts", finished_cycle.namespace, finished_cycle.name, "c1")
    written = write_report(facts, facts, tmp_path / "report.md")
    text = written.read_text()
    for expert in EXPERTS:
        assert f"| {expert} |" in text
    assert "Held-out top-1 accuracy: **" in text and "nan" not in text
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"perplexity.png", "confusion.png", "durations.png"}
    assert "## Change since cycle c1" in text
