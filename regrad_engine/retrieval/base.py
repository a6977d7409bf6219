"""What every retriever shares: :class:`Hit`, the :class:`Retriever` and :class:`DocumentIndex`
protocols, the checks of documents and queries, and the registry of index backends.

A *backend* is a :class:`DocumentIndex` class registered under a kind (``"bm25"``,
``"elasticsearch"``) with :func:`register_backend`. A store records ``index.info()`` in its
``regrad.json`` (``{"type": kind, ...}``, never credentials) and reopens the index with
:func:`open_index`, which finds the class by kind: registered already, a module of this
package named after the kind, or an entry point in the ``regrad.retrievers`` group of an
installed package. So a new backend is one module (or one installed package) and no edit
anywhere else.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from regrad_engine.errors import RetrievalError, check_k, check_texts

__all__ = ["DocumentIndex", "Hit", "RetrievalError", "Retriever", "backend", "check_query", "open_index",
           "records", "register_backend"]

ENTRY_POINT_GROUP = "regrad.retrievers"


@dataclass(frozen=True)
class Hit:
    """One retrieved document.

    Attributes:
        id: Document (chunk) id.
        text: Document text.
        score: Retrieval score; higher is better (0.0 when not from a search).
        metadata: Document metadata (e.g. ``title``).
    """

    id: str
    text: str
    score: float
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class Retriever(Protocol):
    """Anything that returns the ``k`` best documents for a query."""

    def retrieve(self, query: str, k: int) -> list[Hit]: ...  # at most k hits, best first

    def retrieve_batch(self, queries: list[str], k: int) -> list[list[Hit]]: ...  # retrieve() per query


@runtime_checkable
class DocumentIndex(Retriever, Protocol):
    """A retriever whose documents a store manages: what a backend implements."""

    kind: ClassVar[str]

    def add(self, docs: Iterable[Any]) -> int: ...  # add or replace; returns how many were written

    def delete(self, ids: str | Iterable[str]) -> int: ...  # returns how many were removed

    def ids(self) -> list[str]: ...

    def missing(self, ids: Iterable[str]) -> list[str]: ...  # the ids (in order) not in the index

    def save(self) -> None: ...  # make every write durable and visible to other readers

    def info(self) -> dict: ...  # JSON for the store's regrad.json: {"type": kind, ...}, no credentials

    @classmethod
    def from_info(cls, info: Mapping[str, Any], directory: Path) -> DocumentIndex: ...  # reopen (or create)


def check_query(queries: Any, k: Any) -> list[str]:
    """The queries as a list, if ``k`` is a positive int and every query a non-blank string."""
    check_k(k)
    return check_texts(queries, "query")


def _record(doc: Any, n: int) -> tuple[str, str, dict]:
    """A Chunk, Hit or dict as ``(id, text, metadata)``; n is its position for errors."""
    if isinstance(doc, Mapping):
        doc_id, text = doc.get("id"), doc.get("text")
        meta = dict(doc["metadata"]) if isinstance(doc.get("metadata"), Mapping) else {}
        meta.update({k: v for k, v in doc.items() if k not in ("id", "text", "metadata", "score")})
    else:
        doc_id, text, meta = getattr(doc, "id", None), getattr(doc, "text", None), dict(getattr(doc, "metadata", {}))
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        raise RetrievalError(f"document #{n}: needs a non-empty string 'id' (pass Chunk objects or dicts with id/text)")
    if not isinstance(text, str) or not text.strip():
        raise RetrievalError(f"document #{n} (id {doc_id!r}): needs a non-empty string 'text'")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise RetrievalError(f"document #{n} (id {doc_id!r}): metadata is not JSON-serializable ({exc})") from exc
    return doc_id, text, meta


def records(docs: Any) -> list[tuple[str, str, dict]]:
    """Documents to add (one or many Chunk, Hit or dict) as checked ``(id, text, metadata)``.

    Raises:
        RetrievalError: A document lacks an id or text, or its metadata is not JSON.
    """
    if isinstance(docs, Mapping) or hasattr(docs, "text"):
        docs = [docs]
    return [_record(doc, n) for n, doc in enumerate(docs)]


_BACKENDS: dict[str, type] = {}


def register_backend(kind: str):
    """Class decorator: make a :class:`DocumentIndex` class the backend of ``kind``."""
    def register(cls: type) -> type:
        cls.kind = kind
        _BACKENDS[kind] = cls
        return cls
    return register


def backend(kind: str) -> type:
    """The backend class of ``kind`` (see the module docstring for where it is looked up).

    Raises:
        RetrievalError: No backend of that kind.
    """
    if kind not in _BACKENDS:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name == kind:
                point.load()  # registers itself
        if kind not in _BACKENDS and isinstance(kind, str) and kind.isidentifier():
            try:
                importlib.import_module(f"{__package__}.{kind}")
            except ModuleNotFoundError as err:
                if err.name != f"{__package__}.{kind}":
                    raise  # the backend exists but lacks one of its own dependencies: say which
    if kind not in _BACKENDS:
        raise RetrievalError(f"no retriever backend {kind!r}: the built-in ones are bm25 and elasticsearch; "
                             f"install the package that provides it (entry point group {ENTRY_POINT_GROUP!r})")
    return _BACKENDS[kind]


def open_index(info: Mapping[str, Any], directory: str | Path) -> DocumentIndex:
    """Reopen the index a store's ``regrad.json`` describes (``info["type"]`` is the kind);
    ``directory`` is where a local backend keeps its files."""
    if not isinstance(info, Mapping) or not isinstance(info.get("type"), str):
        raise RetrievalError(f"the retriever description {info!r} names no type; rebuild the store with `regrad build`")
    return backend(info["type"]).from_info(info, Path(directory))

