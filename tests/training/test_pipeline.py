"""Bootstrap -> two LoRA experts -> router -> evaluate -> promote on a real MinIO, then a second cycle
with a deliberately worse expert, then a rollback. Tests run in file order; the rollback comes last."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from latentmas.cli import main
from latentmas.store import sha256_bytes
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.modelstore import cached_folder
from latentmas.training.registryops import rollback
from latentmas.training.routers import load_any_router
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.conftest import STACK, Cycle
from tests.training.sampledata import DOMAINS, qa_pairs

pytestmark = pytest.mark.training


def test_each_expert_beats_the_base_on_its_own_domain(cycle1: Cycle) -> None:
    evaluation = cycle1.read_json("evaluate", "evaluation.json")
    for name, entry in evaluation["experts"].items():
        base, expert, served = entry["base"]["perplexity"], entry["expert"]["perplexity"], entry["served"]["perplexity"]
        print(f"{name}: held-out perplexity base {base} -> expert {expert}, served {served}: {entry['comparisons']}")
        assert expert < base, f"{name} does not beat the base: {expert} >= {base}"
        assert served < base and sum(entry["served"]["routed_to"].values()) == entry["heldout_examples"] == 40
        assert entry["expert"]["tokens"] > 100 and entry["expert"]["documents"] == 10


def test_evaluate_writes_the_full_matrix_with_intervals_and_a_status_summary(cycle1: Cycle) -> None:
    """Every model (base, each expert) on every domain, each cell with a bootstrap interval over documents; the
    gate's inputs per expert; the routing the evaluation served with; and the numbers the stack's status shows."""
    evaluation = cycle1.read_json("evaluate", "evaluation.json")
    matrix = evaluation["answer_loss_matrix"]
    assert set(matrix) == {"base", "fin", "med"}
    for row, cells in matrix.items():
        assert set(cells) == {"finance", "medicine"}, row
        for cell in cells.values():
            assert cell["loss_low"] <= cell["loss"] <= cell["loss_high"] and cell["documents"] == 10
    assert matrix["fin"]["finance"]["loss"] < matrix["med"]["finance"]["loss"], "own expert is best on its domain"
    decisions = cycle1.read_json("promote", "promotion.json")["decisions"]
    routing = evaluation["routing"]
    assert (routing["mode"], routing["confidence_threshold"]) == ("top1", 0.3), "inference.routingMode, not routerMode"
    assert routing["router_kind"] == decisions["router"]["kind"], "evaluation scores the router kind that is promoted"
    for name, other in (("fin", "med"), ("med", "fin")):
        gains = evaluation["experts"][name]["comparisons"]
        assert set(gains) == {"base", other}
        assert all(g["low"] <= g["gain"] <= g["high"] and g["documents"] == 10 for g in gains.values())
    summary = cycle1.manifests["evaluate"]["metrics"]
    assert summary["fin_gain_vs_base"] == evaluation["experts"]["fin"]["comparisons"]["base"]["gain"]
    assert summary["med_gain_vs_others_low"] == evaluation["experts"]["med"]["comparisons"]["fin"]["low"]
    assert decisions["fin"]["promoted"] and "beats the base by" in decisions["fin"]["reason"]
    assert decisions["router"]["promoted"] and decisions["router"]["kind"] in {"mlp", "tfidf-lr"}
    assert "routes best on the held-out SFT questions" in decisions["router"]["reason"], "no natural set here"


def test_router_routes_held_out_prompts_to_their_expert(cycle1: Cycle, minio: MinioFixture) -> None:
    metrics = cycle1.read_json("router", "metrics.json")
    heldout = metrics["heldout"]
    print(f"router held-out top-1 accuracy {heldout['accuracy']}, gate entropy {heldout['gate_entropy']}")
    assert heldout["accuracy"] >= 0.9
    assert sum(map(sum, heldout["confusion"])) == heldout["examples"] == 80
    assert 0.0 <= heldout["gate_entropy"] <= heldout["gate_entropy_max"] == pytest.approx(math.log(2), abs=1e-4)
    registry = cycle1.registry()
    router_version = registry.router.active()
    assert router_version is not None and router_version.metrics["expert_versions"] == {"fin": 1, "med": 1}
    router = load_any_router(cached_folder(minio.store, "artifacts", router_version.prefix, router_version.files))
    base = registry.base.active()
    assert base is not None
    base_dir = cached_folder(minio.store, "artifacts", base.prefix, base.files)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    fresh = [q for domain in DOMAINS for q, _ in qa_pairs(domain, random.Random(999), 10)]
    weights = router.gates(model, tokenizer, fresh)
    expected = torch.tensor([router.experts.index(n) for n in ("fin", "med") for _ in range(10)])
    assert float((weights.argmax(dim=-1) == expected).float().mean()) >= 0.9
    assert torch.allclose(weights.sum(dim=-1), torch.ones(len(fresh)))


def test_promoted_artifacts_are_checksummed_peft_safetensors(cycle1: Cycle, minio: MinioFixture) -> None:
    registry = cycle1.registry()
    assert {name: entry.current for name, entry in registry.experts.items()} == {"fin": 1, "med": 1}
    assert registry.base.current == registry.router.current == registry.index.current == 1
    for entry in [*registry.experts.values(), registry.router, registry.base, registry.index]:
        version = entry.active()
        assert version is not None and version.cycle == "c1"
        for name, digest in version.files.items():
            assert sha256_bytes(minio.store.get_bytes("artifacts", version.prefix + name)) == digest
            assert not name.endswith((".bin", ".pt", ".pth", ".pkl")), f"pickle file promoted: {name}"
    fin = registry.experts["fin"].active()
    assert fin is not None and set(fin.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert fin.prefix == f"default/{STACK}/registry/experts/fin/v1/"
    base = registry.base.active()
    assert base is not None
    model = AutoModelForCausalLM.from_pretrained(cached_folder(minio.store, "artifacts", base.prefix, base.files))
    peft = PeftModel.from_pretrained(model, cached_folder(minio.store, "artifacts", fin.prefix, fin.files))
    assert peft.peft_config["default"].to_dict()["r"] == 8
    assert not model.config.tie_word_embeddings


def test_training_reports_progress_and_metrics(cycle1: Cycle) -> None:
    progress = cycle1.read_json("train", "_progress.json", "fin")
    assert progress["step"] == progress["total"] == 30
    assert progress["loss"] > 0 and progress["tokens_per_s"] > 0 and progress["eta_s"] == 0
    metrics = cycle1.manifests["train-fin"]["metrics"]
    assert metrics["steps"] == 30 and metrics["resumed_from_step"] == 0 and metrics["tokens_seen"] > 1000


def test_rerunning_a_finished_stage_is_a_no_op(cycle1: Cycle) -> None:
    revision = cycle1.registry().revision
    assert cycle1.run("promote") == cycle1.manifests["promote"]
    assert cycle1.run("train", "fin") == cycle1.manifests["train-fin"]
    assert cycle1.registry().revision == revision


def test_worse_adapter_is_not_promoted_and_the_reason_is_recorded(cycle2: Cycle) -> None:
    assert cycle2.read_json("base", "base.json")["reused"] == "registry:v1", "cycle 2 must reuse the promoted base"
    evaluation = cycle2.read_json("evaluate", "evaluation.json")["experts"]
    assert evaluation["fin"]["promoted"]["version"] == 1
    assert evaluation["fin"]["expert"]["loss"] > evaluation["fin"]["promoted"]["loss"]
    registry = cycle2.registry()
    assert registry.experts["fin"].current == 1, "the worse adapter replaced the promoted one"
    rejected = [r for r in registry.rejected if r["name"] == "fin" and r["cycle"] == "c2"]
    assert len(rejected) == 1
    assert "regresses against promoted v1" in rejected[0]["reason"] or "gain over" in rejected[0]["reason"]
    decisions = cycle2.read_json("promote", "promotion.json")["decisions"]
    assert decisions["fin"]["promoted"] is False
    med = evaluation["med"]
    print(f"med: promoted v1 loss {med['promoted']['loss']} -> candidate {med['expert']['loss']}")
    assert decisions["med"] == {"promoted": True, "version": 2, "reason": decisions["med"]["reason"]}
    assert "vs promoted v1" in decisions["med"]["reason"]
    assert registry.experts["med"].current == 2 and registry.router.current == 2
    assert registry.index.current == 1 and registry.base.current == 1


def test_rollback_restores_the_previous_version(
    cycle2: Cycle, minio: MinioFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    before = cycle2.registry()
    assert before.experts["med"].current == 2
    after = rollback(minio.store, "artifacts", "default", STACK, "med")
    assert after.experts["med"].current == 1 and after.revision == before.revision + 1
    assert [v.version for v in after.experts["med"].history] == [1, 2], "rollback must keep history"
    assert cycle2.registry().experts["med"].current == 1
    args = ["registry", "rollback", "med", "--stack", STACK, "--endpoint", minio.endpoint]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    assert "latentmas registry: error: version 1 is the oldest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "rollback", "router", "--kind", "router", "--stack", STACK, "--endpoint", minio.endpoint])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out) == {
        "kind": "router",
        "name": "router",
        "from": 2,
        "to": 1,
        "revision": after.revision + 1,
    }
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "show", "--stack", STACK, "--endpoint", minio.endpoint])
    shown = json.loads(capsys.readouterr().out)
    assert shown["experts"]["med"]["current"] == 1 and shown["router"]["current"] == 1
    assert any(r["name"] == "fin" for r in shown["rejected"])
    with pytest.raises(SystemExit):
        main(["registry", "rollback", "nope", "--stack", STACK, "--endpoint", minio.endpoint])
    assert "expert 'nope' is not in the registry" in capsys.readouterr().err
