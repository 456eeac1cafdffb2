"""RAG in the request path: the stack's promoted index bundle (reloaded when a new version is
promoted) plus the documents a conversation supplied inline, searched with the data plane's
`HybridRetriever`; the hits become numbered context in the prompt and citations in the response."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latentmas.jobs.embedding import Embedder
from latentmas.jobs.retrieval import Hit, HybridRetriever, Reranker
from latentmas.prompts import with_context
from latentmas.registry import ArtifactVersion, load_registry
from latentmas.store import ObjectStore, StoreError, sha256_file

log = logging.getLogger("latentmas.services.rag")
SNIPPET_CHARS = 400


@dataclass(frozen=True)
class Citation:
    """One numbered source, as the response returns it and the prompt references it ([n])."""

    n: int
    id: str
    source: str
    doc_id: str
    text: str
    score: float
    origin: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fetch_bundle(store: ObjectStore, bucket: str, version: ArtifactVersion, folder: Path) -> Path:
    """Downloads one promoted index version and verifies every file's checksum before use."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name, digest in version.files.items():
        target = staging / name
        store.get_file(bucket, version.prefix + name, target)
        if sha256_file(target) != digest:
            raise StoreError(f"index v{version.version}: checksum mismatch for {bucket}/{version.prefix}{name}")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


class StackIndex:
    """The promoted index of one stack, swapped atomically when registry.json points elsewhere.
    Polls at most every `poll_seconds`; a failed reload keeps serving the previous version."""

    def __init__(
        self,
        store: ObjectStore,
        bucket: str,
        namespace: str,
        stack: str,
        cache_dir: Path,
        embedder: Embedder | None = None,
        poll_seconds: float = 10.0,
        reranker: Reranker | None = None,
    ) -> None:
        self.store, self.bucket, self.namespace, self.stack = store, bucket, namespace, stack
        self.cache_dir = cache_dir
        self.embedder = embedder
        self.reranker = reranker
        self.poll_seconds = poll_seconds
        self.version: int | None = None
        self.retriever: HybridRetriever | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> bool:
        """Loads a newly promoted version; True when the served version changed."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.poll_seconds:
                return False
            self._checked = now
            try:
                entry = load_registry(self.store, self.bucket, self.namespace, self.stack).index
                active = entry.active()
                if active is None or active.version == self.version:
                    return False
                folder = fetch_bundle(self.store, self.bucket, active, self.cache_dir / f"v{active.version}")
                retriever = HybridRetriever.load(folder, self.embedder)
                retriever.set_reranker(self.reranker)
            except Exception as err:  # keep serving what we have; the next poll retries
                log.warning("index reload failed (serving v%s): %s", self.version, err)
                return False
            previous = self.version
            self.retriever, self.version = retriever, active.version
            if previous is not None:
                shutil.rmtree(self.cache_dir / f"v{previous}", ignore_errors=True)
            log.info("serving index v%d", active.version)
            return True


class RagContext:
    """Searches the conversation's own documents and the stack index (unless a request says
    `no_default_data`), and interleaves the two rankings, conversation first at equal rank."""

    def __init__(self, embedder: Embedder, index: StackIndex | None = None, k: int = 4) -> None:
        self.embedder = embedder
        self.index = index
        self.k = k
        self._conversations: dict[str, tuple[int, HybridRetriever]] = {}
        self._lock = threading.Lock()

    @property
    def index_version(self) -> int | None:
        return self.index.version if self.index is not None else None

    def conversation_retriever(self, conversation_id: str, documents: Sequence[tuple[str, str]]) -> HybridRetriever:
        """An in-memory index of a conversation's documents, rebuilt when documents were added."""
        with self._lock:
            cached = self._conversations.get(conversation_id)
            if cached is not None and cached[0] == len(documents):
                return cached[1]
        retriever = HybridRetriever.from_texts([t for _, t in documents], [i for i, _ in documents], self.embedder)
        with self._lock:
            self._conversations[conversation_id] = (len(documents), retriever)
        return retriever

    def retrieve(
        self,
        query: str,
        conversation_id: str | None = None,
        documents: Sequence[tuple[str, str]] = (),
        no_default_data: bool = False,
        k: int | None = None,
    ) -> list[Citation]:
        limit = k or self.k
        lists: list[list[tuple[Hit, str]]] = []
        if documents and conversation_id:
            conv = self.conversation_retriever(conversation_id, documents).search(query, limit)
            lists.append([(h, "conversation") for h in conv])
        if not no_default_data and self.index is not None:
            self.index.refresh()
            if self.index.retriever is not None:
                lists.append([(h, f"index:v{self.index.version}") for h in self.index.retriever.search(query, limit)])
        # Interleaved by rank: each source keeps its own (possibly reranked) order, and scores from
        # different indexes or a cross-encoder never have to be comparable.
        ranked = sorted(
            ((rank, source, pair) for source, hits in enumerate(lists) for rank, pair in enumerate(hits)),
            key=lambda item: (item[0], item[1]),
        )
        found = [pair for _, _, pair in ranked]
        return [
            Citation(n, h.id, h.source or h.doc_id, h.doc_id, h.text[:SNIPPET_CHARS], round(h.score, 6), origin)
            for n, (h, origin) in enumerate(found[:limit], start=1)
        ]


def augment(question: str, citations: Sequence[Citation]) -> str:
    """The question with numbered context above it, in the layout SFT examples with context use."""
    return with_context(question, citations)
