"""The embedded retriever: an on-disk BM25 index (backend ``"bm25"``, the default).

An index directory holds three things:

* ``regrad-bm25.json``: settings (stemmer, stopwords) and which saved BM25
  matrix matches which state of the doc store;
* ``docs.jsonl``: the doc store, an append-only log of ``{"id", "text",
  "metadata"}`` records and ``{"id", "deleted": true}`` tombstones (the last
  record for an id wins); :meth:`BM25Index.save` compacts it;
* ``bm25-<generation>/``: the bm25s score matrix for the compacted store.

One process should write to an index at a time; readers may share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from regrad_engine.errors import UnknownDocumentError
from regrad_engine.files import TMP_SUFFIX, atomic_write
from regrad_engine.retrieval.base import (
    Hit,
    RetrievalError,
    check_query,
    records,
    register_backend,
)

logger = logging.getLogger(__name__)

_META = "regrad-bm25.json"
_STORE = "docs.jsonl"
_FORMAT = 1


def _make_stemmer(name: str | None) -> Any:
    """Return a PyStemmer stemmer, or None if ``name`` is None or PyStemmer is missing."""
    if name is None:
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError:
        logger.warning("PyStemmer is not installed; BM25 runs without stemming (pip install PyStemmer)")
        return None
    if name not in Stemmer.algorithms():
        raise RetrievalError(f"unknown stemmer {name!r}; choose one of {', '.join(Stemmer.algorithms())} or None")
    return Stemmer.Stemmer(name)


def _interrupted_create(path: Path) -> bool:
    """True if ``path`` holds nothing, or only what a killed :meth:`BM25Index.create` leaves.

    ``create`` writes an empty doc store, then the metadata file last; a kill
    between the two leaves an empty ``docs.jsonl`` (and perhaps ``.tmp`` files)
    with no metadata. That holds no documents, so creating over it loses nothing.
    """
    leftovers = {_STORE, _STORE + TMP_SUFFIX, _META + TMP_SUFFIX}
    for entry in path.iterdir():
        if entry.name not in leftovers or not entry.is_file():
            return False
        if entry.name == _STORE and entry.stat().st_size:
            return False
    return True


@register_backend("bm25")
class BM25Index:
    """Embedded on-disk BM25 index built on `bm25s <https://github.com/xhluca/bm25s>`_.

    Why bm25s: it is pure Python on numpy (tiny install, no server, no compiled
    extension to build), it is fast, and a saved index is loaded memory-mapped.
    Tantivy or Lucene would need a Rust extension wheel or a JVM.

    bm25s cannot add documents to a built index, so :meth:`add` and
    :meth:`delete` only update the doc store and mark the index stale; the next
    search rebuilds it from the doc store (about 1.5 s per 20k documents of 60
    words on one CPU core, so about a minute per million). That is fine up to
    ~1M short documents, the intended scale; the doc store is kept in memory.
    Call :meth:`save` to persist the rebuilt index.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`, not the constructor.
    """

    def __init__(self, path: Path, meta: dict, docs: dict[str, tuple[str, dict]], store_hash: str, mmap: bool,
                 truncate_at: int | None = None):
        self.path = path
        self._truncate_at = truncate_at  # byte length of the store without a torn last line
        self._meta = meta
        self._docs = docs
        self._stemmer = _make_stemmer(meta["stemmer"])
        stemmer_lost = self._stemmer is None and meta["stemmer"] is not None
        if stemmer_lost:
            meta["stemmer"] = None  # re-index without stemming so queries and index match
        self._bm25: bm25s.BM25 | None = None
        self._order: list[str] = []
        self._rebuild_lock = threading.Lock()
        self._dirty = store_hash != meta["store_sha256"] or stemmer_lost  # disk differs from what save() writes
        self._stale = self._dirty  # the BM25 matrix does not reflect self._docs
        if not self._stale and meta["has_index"]:
            try:
                self._bm25 = bm25s.BM25.load(path / f"bm25-{meta['generation']}", mmap=mmap, show_progress=False)
            except (OSError, ValueError) as exc:
                logger.warning("BM25 matrix in %s is unreadable (%s); it will be rebuilt from the doc store", path, exc)
                self._stale = self._dirty = True
        if not self._stale:
            self._order = list(docs)

    @classmethod
    def create(cls, path: str | Path, *, stemmer: str | None = "english", stopwords: str | None = "en") -> BM25Index:
        """Create an empty index in a new (or empty) directory.

        Args:
            path: Directory to create the index in.
            stemmer: A PyStemmer algorithm name (e.g. ``"english"``) or None.
            stopwords: A bm25s stopword list name (``"en"``, ``"de"``, ...) or None.

        Raises:
            RetrievalError: If ``path`` already holds files or the settings are invalid.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or not _interrupted_create(path)):
            raise RetrievalError(f"{path} already exists: open it with BM25Index.open() or choose a new path")
        stem = _make_stemmer(stemmer)
        try:
            bm25s.tokenize("probe", stopwords=stopwords, show_progress=False)
        except ValueError as exc:
            raise RetrievalError(f"invalid stopwords {stopwords!r}: {exc}") from exc
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "stemmer": stemmer if stem is not None else None, "stopwords": stopwords,
                "generation": 0, "has_index": False, "store_sha256": hashlib.sha256(b"").hexdigest()}
        atomic_write(path / _STORE, b"")
        atomic_write(path / _META, json.dumps(meta, indent=2).encode())
        return cls(path, meta, {}, meta["store_sha256"], mmap=False)

    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = True) -> BM25Index:
        """Open an existing index.

        Args:
            path: The index directory.
            mmap: Memory-map the saved score matrix instead of reading it into RAM.

        Raises:
            RetrievalError: If there is no index at ``path`` or it is corrupt.
        """
        path = Path(path)
        if not (path / _META).is_file():
            raise RetrievalError(f"no BM25 index at {path}: build one with `regrad build`")
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"cannot read {path / _META} ({exc}); rebuild the index with `regrad build`") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise RetrievalError(f"{path} has an unsupported index format; rebuild it with `regrad build`")
        docs, digest, truncate_at = cls._replay(path / _STORE)
        return cls(path, meta, docs, digest, mmap=mmap, truncate_at=truncate_at)

    @classmethod
    def open_or_create(cls, path: str | Path, **kw: Any) -> BM25Index:
        """Open the index at ``path``, or create it there if there is none.

        Keyword arguments go to :meth:`open` (``mmap``) or :meth:`create`
        (``stemmer``, ``stopwords``; ignored when the index already exists).
        """
        if (Path(path) / _META).is_file():
            return cls.open(path, **{k: v for k, v in kw.items() if k == "mmap"})
        return cls.create(path, **{k: v for k, v in kw.items() if k != "mmap"})

    @staticmethod
    def _replay(store: Path) -> tuple[dict[str, tuple[str, dict]], str, int | None]:
        """Replay the doc store log; return (docs, sha256, good length if the last line is torn)."""
        docs: dict[str, tuple[str, dict]] = {}
        digest = hashlib.sha256()
        try:
            with open(store, "rb") as f:
                lines = list(f)
        except OSError as exc:
            raise RetrievalError(f"cannot read doc store {store} ({exc}); rebuild with `regrad build`") from exc
        for lineno, raw in enumerate(lines, start=1):
            digest.update(raw)
            try:
                rec = json.loads(raw)
                if rec.get("deleted"):
                    docs.pop(rec["id"], None)
                else:
                    docs.pop(rec["id"], None)  # a replaced doc moves to the end, like a fresh add
                    docs[rec["id"]] = (rec["text"], rec.get("metadata") or {})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if lineno == len(lines) and not raw.endswith(b"\n"):
                    logger.warning("ignoring truncated last line of %s (interrupted write)", store)
                    return docs, digest.hexdigest(), sum(map(len, lines[:-1]))
                raise RetrievalError(f"{store}:{lineno}: corrupt doc store record ({exc}); fix or delete that line") from exc
        return docs, digest.hexdigest(), None

    def _append(self, records: list[dict]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        store = self.path / _STORE
        with open(store, "rb+") as f:
            if self._truncate_at is not None:  # drop a torn last line left by an interrupted write
                f.truncate(self._truncate_at)
                self._truncate_at = None
            f.seek(0, os.SEEK_END)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._stale = self._dirty = True

    def add(self, docs: Iterable[Any]) -> int:
        """Add or replace documents (the last one with a given id wins).

        The records are appended to the doc store on disk right away; the BM25
        matrix is rebuilt at the next search and persisted by :meth:`save`.

        Args:
            docs: :class:`~regrad_engine.data.Chunk` objects, :class:`Hit`
                objects, or dicts with ``id``, ``text`` and optional
                ``metadata`` (other keys are merged into metadata).

        Returns:
            The number of documents written (replacements included).

        Raises:
            RetrievalError: If a document lacks an id/text or has metadata that
                is not JSON-serializable; nothing is written in that case.
        """
        checked = records(docs)
        lines = [{"id": doc_id, "text": text, "metadata": meta} for doc_id, text, meta in checked]
        if not checked:
            return 0
        self._append(lines)
        for doc_id, text, meta in checked:
            self._docs.pop(doc_id, None)
            self._docs[doc_id] = (text, meta)
        return len(checked)

    def delete(self, ids: str | Iterable[str]) -> int:
        """Delete documents by id; unknown ids are ignored.

        Returns:
            The number of documents actually removed.
        """
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        present = [i for i in ids if i in self._docs]
        if present:
            self._append([{"id": i, "deleted": True} for i in present])
            for i in present:
                del self._docs[i]
        return len(present)

    def get(self, doc_id: str) -> Hit:
        """Return the stored document ``doc_id`` as a :class:`Hit` with score 0.0.

        Raises:
            UnknownDocumentError: If there is no such document (a KeyError).
        """
        if doc_id not in self._docs:
            raise UnknownDocumentError(f"no document {doc_id!r} in the index at {self.path}")
        text, meta = self._docs[doc_id]
        return Hit(doc_id, text, 0.0, dict(meta))

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def ids(self) -> list[str]:
        """Return all document ids in store order."""
        return list(self._docs)

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids (in order, once each) that are not in the index."""
        return [i for i in dict.fromkeys(ids) if i not in self._docs]

    def info(self) -> dict:
        """What a store's ``regrad.json`` records: the index lives in the store's ``index/``."""
        return {"type": self.kind}

    @classmethod
    def from_info(cls, info: Mapping[str, Any], directory: Path) -> BM25Index:
        """The store's index in ``directory``.

        Raises:
            RetrievalError: There is none (it is never recreated empty: that would hide the loss).
        """
        return cls.open(directory)

    def __repr__(self) -> str:
        return f"BM25Index({str(self.path)!r}, docs={len(self)}, stale={self._stale})"

    def __str__(self) -> str:
        return f"the BM25 index at {self.path}"

    def _tokenize(self, texts: str | list[str], return_ids: bool = True) -> Any:
        return bm25s.tokenize(texts, stopwords=self._meta["stopwords"], stemmer=self._stemmer,
                              return_ids=return_ids, show_progress=False)

    def _ensure_index(self) -> None:
        """Rebuild the BM25 matrix from the doc store if documents changed.

        Built into locals and published under a lock, so concurrent first queries never
        see a half-built index.
        """
        if not self._stale:
            return
        with self._rebuild_lock:
            if not self._stale:
                return
            order = list(self._docs)
            bm25 = None
            if order:
                tokenized = self._tokenize([self._docs[i][0] for i in order])
                if any(tokenized.ids):  # bm25s cannot index a corpus without a single token
                    bm25 = bm25s.BM25()
                    bm25.index(tokenized, show_progress=False)
            self._order, self._bm25 = order, bm25
            self._stale = False
            self._dirty = True

    def _search(self, query: str, k: int) -> list[Hit]:
        if self._bm25 is None:
            return []
        tokens = self._tokenize(query, return_ids=False)[0]
        token_ids = self._bm25.get_tokens_ids(tokens)
        if not token_ids:  # only stopwords or words absent from the corpus
            return []
        scores = np.asarray(self._bm25.get_scores_from_ids(token_ids), dtype=np.float64)
        n = len(scores)
        if k < n:
            kth = np.partition(scores, n - k)[n - k]
            candidates = np.flatnonzero((scores >= kth) & (scores > 0))
        else:
            candidates = np.flatnonzero(scores > 0)
        ranked = sorted(candidates.tolist(), key=lambda i: (-scores[i], self._order[i]))[:k]
        return [Hit(self._order[i], self._docs[self._order[i]][0], float(scores[i]),
                    dict(self._docs[self._order[i]][1])) for i in ranked]

    def retrieve(self, query: str, k: int) -> list[Hit]:
        """Return up to ``k`` documents matching ``query``, best first.

        Only documents sharing at least one (stemmed, non-stopword) term with
        the query are returned, so the result may be shorter than ``k`` or
        empty. Equal scores are ordered by id.

        Raises:
            RequestError: If ``k`` is not a positive int or the query is empty or blank.
        """
        check_query([query], k)
        self._ensure_index()
        return self._search(query, k)

    def retrieve_batch(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Return ``retrieve(q, k)`` for every query, in order."""
        queries = check_query(queries, k)
        self._ensure_index()
        return [self._search(q, k) for q in queries]

    def save(self) -> None:
        """Persist the index: compact the doc store and write the BM25 matrix.

        Each file is written to a temporary name and renamed into place; the
        metadata file is replaced last, so an interrupted save leaves either
        the old index or a doc store that the next :meth:`open` detects as
        changed (and re-indexes).
        """
        self._ensure_index()
        if not self._dirty:
            return
        gen = int(self._meta["generation"]) + 1
        new_dir = self.path / f"bm25-{gen}"
        shutil.rmtree(new_dir, ignore_errors=True)  # leftover of an interrupted save
        if self._bm25 is not None:
            self._bm25.save(new_dir, show_progress=False)
        data = b"".join(
            json.dumps({"id": i, "text": t, "metadata": m}, ensure_ascii=False).encode() + b"\n"
            for i, (t, m) in self._docs.items()
        )
        atomic_write(self.path / _STORE, data)
        meta = {**self._meta, "generation": gen, "has_index": self._bm25 is not None,
                "store_sha256": hashlib.sha256(data).hexdigest(), "num_docs": len(self._docs)}
        atomic_write(self.path / _META, json.dumps(meta, indent=2).encode())
        self._meta = meta
        for old in self.path.glob("bm25-*"):
            if old != new_dir:
                shutil.rmtree(old, ignore_errors=True)
        self._dirty, self._truncate_at = False, None
