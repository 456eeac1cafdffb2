"""The synth stage: per-domain SFT data in chat format from the cleaned chunks.

Template QA by default (questions from the chunk's own headings and sentences, answers grounded in
the chunk, the chunk id kept as `source`): an answer never repeats a sentence its question already holds
(`without_echo`), so no example teaches echoing the prompt. With an OpenAI-compatible endpoint the model
writes both the question and the answer; an answer whose content words are not in the chunk (`supported`)
or that repeats the question is rejected and the chunk falls back to the templates (counted as
`endpointRejected`). Held-out documents come from the stack's stored split by near-duplicate group
(`latentmas.jobs.splits`), so no document, near copy or prompt is in both splits.

Per document it also writes one paraphrase-style question (`questions/<domain>/{train,heldout}.jsonl`,
`latentmas.jobs.paraphrase`): held-out ones for evaluation, train ones for router training data.

A domain an expert needs but that has no training examples or fewer held-out documents than
`minHeldoutDocuments` (no cleaned documents, or all of them in one near-duplicate group) does not fail
the stage: it is listed with the reason in the manifest's `metrics.skippedDomains`, and only that
expert's later runs are skipped.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from latentmas.jobs.clean import CORPUS_SCHEMA
from latentmas.jobs.cleaning import SENTENCE_END, STOPWORDS, WORD
from latentmas.jobs.outputs import iter_jsonl, read_parquet
from latentmas.jobs.paraphrase import document_questions, endpoint_generator
from latentmas.jobs.quant import read_quality
from latentmas.jobs.splits import (
    EXCLUDED,
    HELDOUT,
    Document,
    Splits,
    corpus_documents,
    ensure_splits,
    heldout_shortfall,
)
from latentmas.prompts import training_messages
from latentmas.spec import SynthesisSpec
from latentmas.stage import StageContext, StageResult

HELDOUT_DOCS = "heldout_docs.json"
Example = dict[str, Any]


# ---- templates ------------------------------------------------------------------------------------------
def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def keywords(text: str, count: int = 3) -> list[str]:
    """The chunk's most frequent content words (first occurrence breaks ties): its topic in a few words."""
    words = [w.lower() for w in WORD.findall(text) if len(w) > 3 and w.isalpha() and w.lower() not in STOPWORDS]
    freq = Counter(words)
    first = {w: i for i, w in reversed(list(enumerate(words)))}
    return sorted(freq, key=lambda w: (-freq[w], first[w]))[:count]


def clip(parts: Iterable[str], limit: int) -> str:
    """Whole sentences up to `limit` characters (at least one, cut at a word if it alone is longer)."""
    out = ""
    for part in parts:
        candidate = f"{out} {part}".strip()
        if out and len(candidate) > limit:
            break
        out = candidate
    return out if len(out) <= limit else out[: out.rfind(" ", 0, limit)].rstrip() + " ..."


def keyword_question(text: str, title: str) -> str | None:
    words = keywords(text)
    if len(words) < 3:
        return None
    where = f" in {title}" if title else ""
    return f"What does the documentation say about {words[0]}, {words[1]} and {words[2]}{where}?"


def qa_problem(text: str, title: str, limit: int) -> tuple[str, str] | None:
    match = re.search(r"Problem:\s*(.+?)\s*Solution:\s*(.+)", text, re.S)
    if not match:
        return None
    return " ".join(match.group(1).split()), clip(sentences(match.group(2)), limit)


def qa_explain(text: str, title: str, limit: int) -> tuple[str, str] | None:
    """Quotes the chunk's first sentence and answers with what the chunk says after it (never the quote itself)."""
    parts = sentences(text)
    if len(parts) < 2:
        return None
    prefix = f"{title}: " if title else ""
    return f'{prefix}Explain this: "{parts[0]}"', clip(parts[1:], limit)


def qa_keywords(text: str, title: str, limit: int) -> tuple[str, str] | None:
    question = keyword_question(text, title)
    if question is None:
        return None
    words = keywords(text)
    relevant = [s for s in sentences(text) if any(w in s.lower() for w in words)]
    return question, clip(relevant or sentences(text), limit)


def qa_continue(text: str, title: str, limit: int) -> tuple[str, str] | None:
    parts = sentences(text)
    if len(parts) < 3:
        return None
    return f'Continue this passage{" from " + title if title else ""}: "{parts[0]}"', clip(parts[1:], limit)


TEMPLATES: list[Callable[[str, str, int], tuple[str, str] | None]] = [qa_problem, qa_explain, qa_keywords, qa_continue]


def normalized(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def without_echo(question: str, answer: str) -> str:
    """`answer` without the sentences `question` already contains (whitespace, case and punctuation aside): an
    answer that starts by repeating its prompt teaches the expert to echo, not to answer. Empty when nothing else
    is left."""
    asked = normalized(question)
    return " ".join(part for part in sentences(answer) if normalized(part) not in asked).strip()


def template_examples(chunk: Mapping[str, str], title: str, spec: SynthesisSpec) -> list[tuple[str, str]]:
    """Up to `examplesPerChunk` (question, answer) pairs; the choice of templates is seeded per chunk. A pair
    whose answer is nothing but the question's own sentences is dropped."""
    rng = random.Random(f"{spec.seed}:{chunk['chunk_id']}")
    order = TEMPLATES[:1] + rng.sample(TEMPLATES[1:], len(TEMPLATES) - 1)
    pairs = []
    for template in order:
        pair = template(chunk["text"], title, spec.max_answer_chars)
        answer = without_echo(*pair) if pair is not None else ""
        if pair is not None and answer:
            pairs.append((pair[0], answer))
        if len(pairs) == spec.examples_per_chunk:
            break
    return pairs


PairGenerator = Callable[[str, str], tuple[str, str]]
SUPPORT_MIN = 0.8  # share of an endpoint answer's content words that must occur in its chunk
PAIR_SYSTEM = (
    "Write one question a user might ask that the passage answers, in your own words, and its answer, using only "
    'facts stated in the passage. Reply with JSON only: {"question": "...", "answer": "..."}'
)


def content_words(text: str) -> set[str]:
    return {w.lower() for w in WORD.findall(text) if len(w) > 2 and w.lower() not in STOPWORDS}


def supported(answer: str, chunk: str, minimum: float = SUPPORT_MIN) -> bool:
    """Lexical support: at least `minimum` of the answer's content words occur in the chunk (an answer the model
    made up from its own knowledge brings words the passage does not have). Closeness, not entailment."""
    words = content_words(answer)
    return bool(words) and len(words & content_words(chunk)) / len(words) >= minimum


def endpoint_pair_generator(endpoint: str, model: str) -> PairGenerator:
    """(question, answer) written by an OpenAI-compatible chat endpoint from a passage; a reply that is not the
    JSON asked for gives ("", "") (rejected like an unsupported answer); an unreachable endpoint fails the stage
    in one line."""
    import httpx

    url = endpoint.rstrip("/") + (
        "/chat/completions" if endpoint.rstrip("/").endswith("/v1") else "/v1/chat/completions"
    )

    def generate(chunk: str, title: str) -> tuple[str, str]:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": PAIR_SYSTEM},
                {"role": "user", "content": f"{title}\n\n{chunk}" if title else chunk},
            ],
            "max_tokens": 256,
            "temperature": 0.0,
        }
        try:
            response = httpx.post(url, json=body, timeout=60)
            response.raise_for_status()
            content = str(response.json()["choices"][0]["message"]["content"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            detail = str(err).splitlines()[0] if str(err) else ""
            raise RuntimeError(f"synthesis endpoint {url}: {type(err).__name__}: {detail}") from err
        return parse_pair(content)

    return generate


def parse_pair(content: str) -> tuple[str, str]:
    """The (question, answer) of a JSON reply (the first {...} in it), or ("", "") when there is none."""
    match = re.search(r"\{.*\}", content, re.S)
    try:
        reply = json.loads(match.group(0)) if match else {}
    except json.JSONDecodeError:
        reply = {}
    if not isinstance(reply, dict):
        return "", ""
    return " ".join(str(reply.get("question", "")).split()), " ".join(str(reply.get("answer", "")).split())


def endpoint_examples(
    chunk: Mapping[str, str], title: str, spec: SynthesisSpec, generate: PairGenerator
) -> tuple[list[tuple[str, str]], bool]:
    """The endpoint's pair when its answer is supported by the chunk and does not repeat the question, else the
    template pairs; the flag says the endpoint's pair was rejected."""
    question, answer = generate(chunk["text"], title)
    answer = without_echo(question, answer) if question else ""
    if question and answer and supported(answer, chunk["text"]):
        return [(question, clip(sentences(answer), spec.max_answer_chars))], False
    return template_examples(chunk, title, spec), True


def example(question: str, answer: str, domain: str, chunk_id: str) -> Example:
    """One SFT row; its messages come from the prompt builder serving uses, so the prompts match."""
    return {"messages": training_messages(question, answer), "domain": domain, "source": chunk_id}


def doc_title(row: Mapping[str, Any]) -> str:
    """The document's title, else its file name without extension (e.g. `ls`, `GPL-3`)."""
    if row.get("title"):
        return str(row["title"])[:80]
    name = str(row["source"]).split("#")[0].rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]


def synthesize(
    chunks: Iterable[Mapping[str, str]],
    titles: Mapping[str, str],
    heldout: set[str],
    spec: SynthesisSpec,
    generate: PairGenerator | None = None,
) -> tuple[dict[tuple[str, str], list[Example]], Counter[str]]:
    """(domain, split) -> examples, plus counts: duplicate prompts dropped, endpoint pairs rejected."""
    out: dict[tuple[str, str], list[Example]] = defaultdict(list)
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    for chunk in chunks:
        title = titles.get(chunk["doc_id"], "")
        if generate is not None:
            pairs, rejected = endpoint_examples(chunk, title, spec, generate)
            counts["endpointRejected"] += rejected
        else:
            pairs = template_examples(chunk, title, spec)
        split = "heldout" if chunk["doc_id"] in heldout else "train"
        for question, answer in pairs:
            norm = " ".join(question.lower().split())
            if norm in seen:
                counts["duplicatesDropped"] += 1
                continue
            seen.add(norm)
            out[(chunk["domain"], split)].append(example(question, answer, chunk["domain"], chunk["chunk_id"]))
    return out, counts


# ---- the stage ------------------------------------------------------------------------------------------
def read_chunks(ctx: StageContext) -> list[dict[str, str]]:
    """The clean stage's chunks (one object, or Spark's folder of parts)."""
    return list(iter_jsonl(ctx.store, ctx.bucket, ctx.prefix("clean") + "rag_chunks.jsonl"))


def read_corpus(ctx: StageContext) -> list[dict[str, Any]]:
    columns = ["doc_id", "domain", "source", "title"]
    table = read_parquet(ctx.store, ctx.bucket, ctx.prefix("clean") + "corpus.parquet", columns, CORPUS_SCHEMA)
    return table.to_pylist()


def run(ctx: StageContext) -> StageResult:
    spec = ctx.spec.pipeline.synthesis
    ctx.read_manifest("clean")
    quant = ctx.read_manifest("quant")
    corpus = read_corpus(ctx)
    chunks = read_chunks(ctx)
    quality = read_quality(ctx)
    domains = {row["domain"] for row in corpus} | {e.domain for e in ctx.spec.experts}
    kept_docs = {r["doc_id"]: r["domain"] for r in corpus if quality.get(r["doc_id"], 1.0) >= spec.min_quality}
    titles = {r["doc_id"]: doc_title(r) for r in corpus}
    documents = corpus_documents(ctx)
    splits, split_report = ensure_splits(ctx, documents)
    heldout = splits.of(HELDOUT) & kept_docs.keys()
    usable = [c for c in chunks if c["doc_id"] in kept_docs and splits.split[c["doc_id"]] != EXCLUDED]
    ctx.progress(1, 2, phase="generating", chunks=len(usable), heldout_docs=len(heldout))
    pairs = endpoint_pair_generator(spec.endpoint, spec.model) if spec.endpoint else None
    data, made = synthesize(usable, titles, heldout, spec, pairs)
    outputs: list[str] = []
    counts: dict[str, int] = {"chunks": len(usable), "duplicatesDropped": made["duplicatesDropped"],
                              "endpointRejected": made["endpointRejected"], "heldoutDocs": len(heldout),
                              "qualityFiltered": len(corpus) - len(kept_docs),
                              "excludedDocs": len(splits.of(EXCLUDED) & kept_docs.keys())}  # fmt: skip
    for domain in sorted(domains):
        for split in ("train", "heldout"):
            rows = data.get((domain, split), [])
            name = f"sft/{domain}/{split}.jsonl"
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            ctx.store.put_bytes(ctx.bucket, ctx.key(name), body.encode())
            outputs.append(name)
            counts[f"{domain}_{split}"] = len(rows)
    first_chunks = {c["doc_id"]: c for c in reversed(usable)}  # each document's first chunk
    generator = endpoint_generator(spec.endpoint, spec.model) if spec.endpoint else None
    questions = document_questions(first_chunks, titles, splits.split, generator, spec.seed)
    for domain in sorted(domains):
        for split in ("train", "heldout"):
            rows = questions.get((domain, split), [])
            name = f"questions/{domain}/{split}.jsonl"
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            ctx.store.put_bytes(ctx.bucket, ctx.key(name), body.encode())
            outputs.append(name)
            counts[f"{domain}_questions_{split}"] = len(rows)
    by_domain: dict[str, list[str]] = defaultdict(list)
    for doc_id in sorted(heldout):
        by_domain[kept_docs[doc_id]].append(doc_id)
    outputs.append(ctx.put_json(HELDOUT_DOCS, dict(by_domain)))
    ctx.progress(2, 2, phase="done")
    kept = [d for d in documents if d.doc_id in kept_docs]
    skips = skipped_domains([e.domain for e in ctx.spec.experts], kept, splits, counts, spec.min_heldout_documents)
    return StageResult(
        outputs=outputs,
        counts=counts,
        metrics={
            "mode": "endpoint" if spec.endpoint else "template",
            "inputs": {"quantRows": quant["counts"].get("rows")},
            "skippedDomains": skips,
            "splits": split_report,
        },
    )


def skipped_domains(
    domains: Iterable[str], documents: Sequence[Document], splits: Splits, counts: Mapping[str, int], minimum: int
) -> dict[str, str]:
    """Expert domains without the data to train and evaluate an expert, with the reason."""
    reasons = {}
    present = Counter(d.domain for d in documents)
    for domain in sorted(set(domains)):
        shortfall = heldout_shortfall(domain, documents, splits, minimum)
        if present[domain] == 0:
            reasons[domain] = f"domain {domain!r} has no cleaned documents"
        elif shortfall:
            reasons[domain] = shortfall
        elif counts.get(f"{domain}_heldout", 0) == 0:
            reasons[domain] = f"domain {domain!r} yields no held-out examples"
        elif counts.get(f"{domain}_train", 0) == 0:
            reasons[domain] = f"domain {domain!r} yields no training examples"
    return reasons
