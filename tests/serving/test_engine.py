"""Continuous batching: rows joining and leaving mid-flight decode exactly what each would alone."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from latentmas.services.admission import admissible, auto_budget
from latentmas.services.detokenize import REPLACEMENT
from latentmas.services.engine import BROKEN_SLOT, NON_FINITE, Engine, Sequence, decode_compiler
from latentmas.services.kvslots import bucket
from latentmas.services.lora import Form, install_multi_lora, load_peft_adapter
from latentmas.services.sampling import SamplingParams, sample_next, stop_cut
from latentmas.services.toymodel import llama_config
from latentmas.training.architectures import discover_target_modules
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tests.serving.bytetok import SPLIT_TEXTS, byte_level
from tests.serving.conftest import Toy

pytestmark = pytest.mark.serving


def _reference(toy: Toy, adapter: str | None, prompt: str, tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, toy.adapters[adapter]).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return [int(t) for t in out[0, ids["input_ids"].shape[1] :]]


def test_rows_joining_and_leaving_decode_like_their_own_greedy_reference(toy: Toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    served.write_slot(0, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    served.write_slot(1, load_peft_adapter(toy.adapters["seed2"], served.shapes))
    engine = Engine(served, tokenizer, max_batch_size=3)
    engine.eos_ids = []  # random weights: decode a fixed number of tokens, like min_new_tokens below
    jobs = [  # (prompt, adapter, slot mix, tokens); batch limit 3 forces later rows to join mid-flight
        ("what is the market price of the bond", "seed1", [(0, 1.0)], 12),
        ("hello", None, [], 4),
        ("the court and the judge", "seed2", [(1, 1.0)], 9),
        ("code error", "seed1", [(0, 1.0)], 6),
        ("one two three four five six", "seed2", [(1, 1.0)], 10),
    ]
    done = threading.Semaphore(0)
    seqs = [
        Sequence(tokenizer(p)["input_ids"], SamplingParams(max_tokens=n), mix, lambda _: None, lambda _: done.release())
        for p, _, mix, n in jobs
    ]
    engine.start()
    try:
        for seq in seqs:
            engine.submit(seq)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for seq, (prompt, adapter, _, n) in zip(seqs, jobs, strict=True):
        assert seq.finish_reason == "length"
        assert seq.output_ids == _reference(toy, adapter, prompt, n), prompt


def test_sampling_filters_and_stop_strings() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 2.9]])
    greedy = SamplingParams(temperature=0.0)
    top1 = SamplingParams(temperature=1.5, top_k=1)
    nucleus = SamplingParams(temperature=1.0, top_p=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, [greedy, top1], generator).tolist() == [1, 0]
        assert sample_next(logits, [nucleus, nucleus], generator).tolist() == [1, 0]
    hot = SamplingParams(temperature=5.0)
    seen = {int(sample_next(logits[:1], [hot], generator)) for _ in range(200)}
    assert len(seen) >= 3  # real sampling, not argmax
    assert stop_cut("answer: yes END more", ("END",)) == (12, 12)
    assert stop_cut("answer: yes EN", ("END",)) == (None, 12)  # "EN" may become "END": held back
    assert stop_cut("plain", ()) == (None, 5)


def _run(engine: Engine, seqs: list[Sequence]) -> list[str]:
    """Submits every sequence before the loop starts, so they are prefilled and decoded as one batch;
    returns what each row's on_done received."""
    done = threading.Semaphore(0)
    reasons = [""] * len(seqs)

    def finisher(i: int) -> Callable[[str], None]:
        def finish(reason: str) -> None:
            reasons[i] = reason
            done.release()

        return finish

    for i, seq in enumerate(seqs):
        seq.on_done = finisher(i)
        engine.submit(seq)
    engine.start()
    try:
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    return reasons


def test_a_row_with_non_finite_logits_fails_alone(toy: Toy) -> None:
    """A NaN written straight into one adapter slot at run time (past every load-time check) ends that
    adapter's rows with an error; greedy and sampled rows of the base and of a healthy adapter in the same
    batch finish, and the greedy ones decode exactly what they decode alone."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    served.write_slot(0, load_peft_adapter(toy.adapters["seed2"], served.shapes))
    served.write_slot(1, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    with torch.no_grad():  # slot 0: rows with a narrower mix must not be padded onto it
        for layer in served.layers.values():
            layer.lora_b.data[0].fill_(float("nan"))
    engine = Engine(served, tokenizer, max_batch_size=8)
    engine.eos_ids = []
    prompt = "what is the market price of the bond"
    ids = tokenizer(prompt)["input_ids"]
    jobs = [  # (slot mix, temperature)
        ([(0, 1.0)], 1.0),  # the poisoned adapter, sampled (multinomial on NaN used to fail the batch)
        ([], 0.0),
        ([(1, 1.0)], 0.0),
        ([(1, 0.5), (0, 0.5)], 0.0),  # a mixture touching the poisoned slot
        ([], 0.8),
        ([(0, 1.0)], 0.0),
    ]
    seqs = [Sequence(ids, SamplingParams(max_tokens=6, temperature=t), mix, _noop, _noop) for mix, t in jobs]
    reasons = _run(engine, seqs)
    poisoned = [0, 3, 5]
    for i, reason in enumerate(reasons):
        if i in poisoned:
            assert reason == f"error: {BROKEN_SLOT}", (i, reason)
            assert seqs[i].output_ids == []
        else:
            assert reason == "length" and len(seqs[i].output_ids) == 6, (i, reason)
    assert seqs[1].output_ids == _reference(toy, None, prompt, 6)
    assert seqs[2].output_ids == _reference(toy, "seed1", prompt, 6)


@pytest.mark.parametrize("form", ["dense", "gathered"])
def test_a_broken_slot_no_row_uses_is_quarantined_and_the_batch_decodes(toy: Toy, form: Form) -> None:
    """The dense LoRA term reads every slot up to the highest one used, so NaN in an idle slot 0 reaches a
    slot-1 row (in A, (x @ NaN) x 0 is NaN whatever the BLAS kernel; in B some kernels skip zero factors);
    the engine finds it, quarantines slot 0 and re-runs the step: nothing fails. The gathered term never
    reads slot 0: nothing to quarantine."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    served.form = form
    served.write_slot(0, load_peft_adapter(toy.adapters["seed2"], served.shapes))
    served.write_slot(1, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    with torch.no_grad():
        for layer in served.layers.values():
            layer.lora_a.data[0].fill_(float("nan"))
    engine = Engine(served, tokenizer, max_batch_size=4)
    engine.eos_ids = []
    prompt = "what is the market price of the bond"
    ids = tokenizer(prompt)["input_ids"]
    seqs = [Sequence(ids, SamplingParams(max_tokens=5), mix, _noop, _noop) for mix in ([(1, 1.0)], [])]
    assert _run(engine, seqs) == ["length", "length"]
    assert served.broken == ({0} if form == "dense" else set())
    assert seqs[0].output_ids == _reference(toy, "seed1", prompt, 5)
    assert seqs[1].output_ids == _reference(toy, None, prompt, 5)


def test_a_row_whose_activations_overflow_fails_alone(toy: Toy) -> None:
    """A finite adapter whose outputs overflow float32 at run time (B scaled by 1e30: loading accepts it)
    ends its own rows with the error; no slot is quarantined, and base and other-adapter rows of the same
    batch, which share the dense LoRA term with it, decode exactly as alone."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    huge = load_peft_adapter(toy.adapters["seed2"], served.shapes)
    huge.modules = {name: (a, b * 1e30) for name, (a, b) in huge.modules.items()}
    served.write_slot(0, huge)
    served.write_slot(1, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    engine = Engine(served, tokenizer, max_batch_size=8)
    engine.eos_ids = []
    prompt = "what is the market price of the bond"
    ids = tokenizer(prompt)["input_ids"]
    mixes: list[list[tuple[int, float]]] = [[(0, 1.0)], [], [(1, 1.0)], [(0, 0.5), (1, 0.5)]]
    seqs = [Sequence(ids, SamplingParams(max_tokens=5), mix, _noop, _noop) for mix in mixes]
    reasons = _run(engine, seqs)
    assert reasons == [f"error: {NON_FINITE}", "length", "length", f"error: {NON_FINITE}"]
    assert served.broken == set()
    assert seqs[1].output_ids == _reference(toy, None, prompt, 5)
    assert seqs[2].output_ids == _reference(toy, "seed1", prompt, 5)


def test_admission_keeps_the_padded_batch_cache_within_the_kv_budget() -> None:
    """Rows join in queue order while (rows + 1) x the longest reservation fits; a request that alone
    exceeds the budget is never admitted."""
    assert admissible([], [10, 10, 10], room=8, budget=30) == 3
    assert admissible([], [10, 10, 10], room=2, budget=30) == 2
    assert admissible([10], [5, 40], room=8, budget=60) == 1  # 3 rows x 40 would not fit
    assert admissible([50], [5], room=8, budget=60) == 0  # 2 rows x 50 would not fit: it waits
    assert admissible([], [61], room=8, budget=60) == 0
    assert auto_budget(bytes_per_token=100, free_bytes=10**9, rows=64, row_tokens=3072) == 64 * 3072
    assert auto_budget(bytes_per_token=10**5, free_bytes=10**9, rows=64, row_tokens=3072) == 5000  # half of free
    assert auto_budget(bytes_per_token=10**9, free_bytes=10**9, rows=64, row_tokens=3072) == 3072  # one row at least


def test_the_engine_queues_what_does_not_fit_and_refuses_what_never_can(toy: Toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=1, max_rank=8)
    ids = tokenizer("what is the market price of the bond")["input_ids"]
    budget = 2 * (len(ids) + 6)  # room for two rows of this request at a time
    sizes: list[int] = []
    engine = Engine(served, tokenizer, max_batch_size=8, kv_budget_tokens=budget)
    engine.eos_ids = []
    engine.observer = _Sizes(sizes)
    seqs = [Sequence(ids, SamplingParams(max_tokens=6), [], _noop, _noop) for _ in range(5)]
    seqs.append(Sequence(ids, SamplingParams(max_tokens=budget), [], _noop, _noop))
    reasons = _run(engine, seqs)
    assert reasons[:5] == ["length"] * 5
    assert reasons[5] == f"error: prompt + max_tokens = {len(ids) + budget} exceeds the KV budget of {budget} tokens"
    assert sizes and max(sizes) == 2


@dataclass
class _Sizes:
    sizes: list[int]

    def batch(self, size: int, prefill: bool) -> None:
        if not prefill:
            self.sizes.append(size)

    def tokens_done(self, prompt: int, completion: int) -> None:
        return None


def _noop(_: str) -> None:
    return None


def _scripted(model: torch.nn.Module, script: list[int]) -> None:
    """Makes the real model's head put all mass on script[k] at its k-th forward (prefill or decode step),
    so a whole batch decodes a chosen id sequence through the real engine."""
    calls = iter(range(10_000))

    def hook(_module: torch.nn.Module, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., script[min(next(calls), len(script) - 1)]] = 0.0
        return forced

    model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_engine_streams_and_cuts_only_whole_characters(tmp_path, text: str) -> None:
    tokenizer = byte_level()
    model = LlamaForCausalLM(llama_config("test", tokenizer)).eval()
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    _scripted(model, script)
    engine = Engine(
        install_multi_lora(model, discover_target_modules(model), slots=1, max_rank=4), tokenizer, max_batch_size=4
    )
    engine.eos_ids = []
    cut = next(i for i in range(1, len(script)) if REPLACEMENT in tokenizer.decode(script[:i]))
    deltas: dict[int, list[str]] = {0: [], 1: []}
    prompt = tokenizer("hi", add_special_tokens=False)["input_ids"]
    seqs = [
        Sequence(prompt, SamplingParams(max_tokens=len(script)), [], deltas[0].append, _noop),
        Sequence(prompt, SamplingParams(max_tokens=cut), [], deltas[1].append, _noop),  # ends inside a character
    ]
    _run(engine, seqs)
    assert seqs[0].output_ids == script
    assert "".join(deltas[0]) == seqs[0].text == text
    assert "".join(deltas[1]) == seqs[1].text and text.startswith(seqs[1].text) and seqs[1].text != text
    assert all(REPLACEMENT not in d for d in deltas[0] + deltas[1])


@dataclass
class StepLog:
    """The engine's steps in order, as ("prefill" | "decode", rows); `then` runs once after the first decode."""

    steps: list[tuple[str, int]]
    then: Callable[[], None] | None = None

    def batch(self, size: int, prefill: bool) -> None:
        self.steps.append(("prefill" if prefill else "decode", size))
        if not prefill and self.then is not None:
            then, self.then = self.then, None
            then()

    def tokens_done(self, prompt: int, completion: int) -> None:
        pass


@pytest.mark.parametrize("chunk", [3, 4])
def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_decode_steps(toy: Toy, chunk: int) -> None:
    """A long prompt arriving while a row decodes is prefilled `chunk` columns per step, each chunk followed
    by a decode step of the running row (it never waits for the whole prefill), and both decode exactly
    their own greedy reference (chunked prefill changes no token)."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=1, max_rank=8)
    served.write_slot(0, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    log = StepLog([])
    engine = Engine(served, tokenizer, max_batch_size=4, observer=log, prefill_chunk=chunk)
    engine.eos_ids = []
    short, long = "hello", "what is the market price of the bond and who sets it in the court of the judge today"
    long_ids = tokenizer(long)["input_ids"]
    chunks = -(-len(long_ids) // chunk)
    assert chunks >= 5
    done = threading.Semaphore(0)
    short_ids = tokenizer(short)["input_ids"]
    running = Sequence(short_ids, SamplingParams(max_tokens=chunks + 4), [], lambda _: None, lambda _: done.release())
    joining = Sequence(long_ids, SamplingParams(max_tokens=6), [(0, 1.0)], lambda _: None, lambda _: done.release())
    log.then = lambda: engine.submit(joining)  # arrives while `running` decodes
    engine.start()
    try:
        engine.submit(running)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.stop()
    first = log.steps.index(("decode", 1)) + 1
    assert log.steps[first : first + 2 * chunks] == [("prefill", 1), ("decode", 1)] * (chunks - 1) + [
        ("prefill", 1),
        ("decode", 2),
    ], log.steps
    assert running.output_ids == _reference(toy, None, short, chunks + 4)
    assert joining.finish_reason == "length" and joining.output_ids == _reference(toy, "seed1", long, 6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decode_runs_on_fixed_slots_written_in_place(toy: Toy, attention: str) -> None:
    """Decode steps have the shape of their bucket (rows: the power of two covering the highest slot in use;
    positions: the longest row rounded up to 64), so consecutive steps keep one shape while the rows' lengths
    change; finished rows only free their slot (no buffer is reallocated or copied), a newcomer takes the
    lowest free slot, and a row running past 64 positions grows the buffers once, keeping what they held:
    every row decodes exactly its greedy reference. With sdpa (boolean masks) and eager (additive masks)."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base, attn_implementation=attention).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=1, max_rank=8)
    served.write_slot(0, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    engine = Engine(served, tokenizer, max_batch_size=3)
    engine.eos_ids = []
    steps: list[tuple[tuple[int, ...], tuple[int, ...], int, list[int]]] = []

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, mask = args[0] if args else kwargs["hidden_states"], kwargs["attention_mask"]
        if hidden.shape[1] == 1:  # decode steps (prefill chunks are wider)
            keys = engine._slots.buffers[0][0]
            steps.append((tuple(hidden.shape[:2]), tuple(mask.shape), keys.data_ptr(), list(engine._row_slots)))

    model.get_decoder().layers[0].register_forward_pre_hook(record, with_kwargs=True)
    jobs = [  # batch limit 3: the fourth request joins when the first finishes, into its slot
        ("what is the market price of the bond", [(0, 1.0)], 3, "seed1"),
        ("hello", [], 12, None),
        ("the court and the judge", [(0, 1.0)], 8, "seed1"),
        ("one two three", [], 70, None),
    ]
    done = threading.Semaphore(0)
    seqs = [
        Sequence(tokenizer(p)["input_ids"], SamplingParams(max_tokens=n), mix, lambda _: None, lambda _: done.release())
        for p, mix, n, _ in jobs
    ]
    for seq in seqs:
        engine.submit(seq)
    engine.start()  # the first three join together
    try:
        for _ in seqs:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    for seq, (prompt, _, n, adapter) in zip(seqs, jobs, strict=True):
        assert seq.output_ids == _reference(toy, adapter, prompt, n), prompt
    for (rows, _), mask, _, slots in steps:
        assert rows == mask[0] == bucket(max(slots) + 1) and mask[1:3] == (1, 1) and mask[3] in (64, 128)
    assert steps[0][3] == [0, 1, 2] and steps[0][1] == (4, 1, 1, 64)
    shapes = [s[1] for s in steps]
    assert sum(a != b for a, b in itertools.pairwise(shapes)) <= 3, shapes  # bucket changes only
    pointers = [s[2] for s in steps]
    grown = next(i for i, s in enumerate(steps) if s[1][3] == 128)
    assert set(pointers[:grown]) == {pointers[0]} and set(pointers[grown:]) == {pointers[grown]} != {pointers[0]}
    joined = next(s[3] for s in steps if len(s[3]) == 3 and s[3] != [0, 1, 2])
    assert sorted(joined) == [0, 1, 2], "the newcomer took the slot the first row freed"


def test_compiled_decode_decodes_like_eager_and_the_setting_is_checked(toy: Toy) -> None:
    """The compiled decode path (traced by TorchDynamo here; CUDA graphs on a GPU) with the LoRA plan in its
    fixed shapes decodes exactly the greedy references of adapter, mixed and base rows."""
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=3, max_rank=8)
    served.write_slot(0, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    served.write_slot(2, load_peft_adapter(toy.adapters["seed2"], served.shapes))
    traced: list[int] = []

    def trace(module: torch.nn.Module) -> Callable[..., object]:
        def backend(graph: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Callable[..., object]:
            traced.append(len(graph.graph.nodes))
            return graph.forward

        return torch.compile(module, backend=backend)

    engine = Engine(served, tokenizer, max_batch_size=3, compile_decode=trace)
    engine.eos_ids = []
    jobs = [("what is the market price of the bond", [(0, 1.0)], "seed1"), ("hello", [], None)]
    jobs.append(("the court and the judge", [(2, 1.0)], "seed2"))
    done = threading.Semaphore(0)
    seqs = [
        Sequence(tokenizer(p)["input_ids"], SamplingParams(max_tokens=6), mix, lambda _: None, lambda _: done.release())
        for p, mix, _ in jobs
    ]
    for seq in seqs:
        engine.submit(seq)
    engine.start()
    try:
        for _ in seqs:
            assert done.acquire(timeout=300)
    finally:
        engine.stop()
    assert engine.compiled and traced, "the decode steps ran through the compiled model"
    for seq, (prompt, _, adapter) in zip(seqs, jobs, strict=True):
        assert seq.output_ids == _reference(toy, adapter, prompt, 6), prompt
    assert decode_compiler("auto", torch.device("cpu")) is None and decode_compiler("off", torch.device("cuda")) is None
    assert decode_compiler("auto", torch.device("cuda")) is not None
    with pytest.raises(ValueError, match="compile_decode: 'fast' is not"):
        decode_compiler("fast", torch.device("cpu"))
