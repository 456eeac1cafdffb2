"""Continuous batching: rows joining and leaving mid-flight decode exactly what each would alone."""

from __future__ import annotations

import threading

import pytest
import torch
from latentmas.services.engine import Engine, Sequence
from latentmas.services.lora import install_multi_lora, load_peft_adapter
from latentmas.services.sampling import SamplingParams, sample_next, stop_cut
from latentmas.training.architectures import discover_target_modules
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

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
