"""Conversations in SQLite: messages, per-conversation RAG documents, and the history that fits a
token budget. A file on a volume, so conversations survive a restart of the inference pod."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, session_id TEXT, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL REFERENCES conversations(id),
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS documents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL REFERENCES conversations(id),
    doc_id TEXT NOT NULL, text TEXT NOT NULL, UNIQUE (conversation_id, doc_id)
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
CREATE INDEX IF NOT EXISTS conversations_by_session ON conversations (session_id, updated);
"""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    created: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class Conversation:
    id: str
    session_id: str | None
    title: str
    created: float
    updated: float
    messages: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": self.id,
            "session_id": self.session_id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "messages": self.messages,
        }


class UnknownConversation(KeyError):
    pass


class SessionStore:
    """Thread-safe SQLite access (the API calls it from the event loop and worker threads)."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def ensure_conversation(self, conversation_id: str | None, session_id: str | None, title: str = "") -> str:
        """The given conversation (created under that id if new) or a fresh one."""
        cid = conversation_id or uuid.uuid4().hex
        now = time.time()
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR IGNORE INTO conversations (id, session_id, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                (cid, session_id, title[:80], now, now),
            )
        return cid

    def add_message(self, conversation_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self._lock, self._conn:
            if not self._exists(conversation_id):
                raise UnknownConversation(conversation_id)
            self._conn.execute(
                "INSERT INTO messages (conversation_id, role, content, created, meta) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, now, json.dumps(meta or {})),
            )
            self._conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))

    def _exists(self, conversation_id: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return row is not None

    def messages(self, conversation_id: str) -> list[Message]:
        with self._lock:
            if not self._exists(conversation_id):
                raise UnknownConversation(conversation_id)
            rows = self._conn.execute(
                "SELECT role, content, created, meta FROM messages WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [Message(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def list_conversations(self, session_id: str | None = None, limit: int = 50) -> list[Conversation]:
        """Most recently updated first; all sessions when `session_id` is None."""
        query = (
            "SELECT c.id, c.session_id, c.title, c.created, c.updated, COUNT(m.seq) FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id {where} GROUP BY c.id ORDER BY c.updated DESC LIMIT ?"
        )
        with self._lock:
            if session_id is None:
                rows = self._conn.execute(query.format(where=""), (limit,)).fetchall()
            else:
                rows = self._conn.execute(query.format(where="WHERE c.session_id = ?"), (session_id, limit)).fetchall()
        return [Conversation(*row) for row in rows]

    def history(self, conversation_id: str, budget_tokens: int, count_tokens: Callable[[str], int]) -> list[Message]:
        """The most recent messages whose rendered size fits the budget, oldest first."""
        kept: list[Message] = []
        used = 0
        for message in reversed(self.messages(conversation_id)):
            cost = count_tokens(render_turn(message))
            if used + cost > budget_tokens:
                break
            kept.append(message)
            used += cost
        return kept[::-1]

    def add_documents(self, conversation_id: str, texts: Sequence[str]) -> list[str]:
        """Stores inline RAG documents for a conversation (deduplicated by content); returns their ids."""
        ids = [f"{conversation_id[:8]}-doc-{uuid.uuid5(uuid.NAMESPACE_OID, t).hex[:10]}" for t in texts]
        with self._lock, self._conn:
            if not self._exists(conversation_id):
                raise UnknownConversation(conversation_id)
            self._conn.executemany(
                "INSERT OR IGNORE INTO documents (conversation_id, doc_id, text) VALUES (?, ?, ?)",
                [(conversation_id, i, t) for i, t in zip(ids, texts, strict=True)],
            )
        return ids

    def documents(self, conversation_id: str) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT doc_id, text FROM documents WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]


def render_turn(message: Message) -> str:
    speaker = "User" if message.role == "user" else "Assistant"
    return f"{speaker}: {message.content}"


def render_history(messages: Sequence[Message]) -> str:
    """Earlier turns as plain text, prepended to the new question."""
    if not messages:
        return ""
    return "Conversation so far:\n" + "\n".join(render_turn(m) for m in messages) + "\n\n"
