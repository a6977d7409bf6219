"""Stage 2 and wiring: a *store* is a Gradient Bank plus the index that finds its chunks.

A store is a directory:
    regrad.json   what the store is bound to (versioned, see :class:`Store`): the base model,
                  the meta checkpoint (a path relative to the store, so the two can move
                  together), the chunk size, and the index backend (``{"type": "bm25"}``, the
                  embedded index below, or ``{"type": "elasticsearch", "url": ..., "index":
                  ...}``; never credentials, they come from the environment)
    bank/         the Gradient Bank (see ``bank.py``)
    index/        the embedded BM25 index of the chunk texts, unless another backend is used

:func:`build_store` and :func:`open_engine` are the entry points; :class:`Store` is what
they share (and what a bank made by hand is opened with).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regrad_engine.bank import GradientBank, VerifyReport, text_hash
from regrad_engine.checkpoint import SHIPPED, MetaCheckpoint, library_version, shipped_checkpoint
from regrad_engine.data import Chunk, chunk_source
from regrad_engine.errors import DataError, RetrievalError, StoreError, UnknownDocumentError
from regrad_engine.files import atomic_write_json
from regrad_engine.gradients import document_gradients
from regrad_engine.inference import ReGrad
from regrad_engine.lora import LoraSpace
from regrad_engine.models import LoadedModel, load_model
from regrad_engine.prompts import bos_prefix, encode_documents
from regrad_engine.retrieval.base import DocumentIndex, Retriever, open_index
from regrad_engine.retrieval.bm25 import BM25Index

STORE_FILE = "regrad.json"
STORE_KIND = "regrad-store"
STORE_FORMAT = 1
SHIPPED_PREFIX = "shipped:"  # regrad.json's name for a checkpoint that ships with the package


def bank_binding(model: LoadedModel, meta: MetaCheckpoint, doc_max_tokens: int) -> dict:
    """What a Gradient Bank is bound to: its gradients are valid only for these.

    ``document_bos`` is recorded when documents start with the tokenizer's beginning-of-sequence
    token (see ``prompts.encode_documents``), and only then: banks of tokenizers without one (the
    embedded SmolLM2) keep the binding they had, and a bank built before documents began with it
    is refused instead of mixed with new gradients.
    """
    binding = {"base_model_fingerprint": model.fingerprint, "meta_fingerprint": meta.fingerprint(),
               "doc_max_tokens": doc_max_tokens}
    if bos_prefix(model.tokenizer):
        binding["document_bos"] = True
    return binding


@dataclass
class BuildStats:
    added: int  # gradients computed (new documents and changed ones)
    skipped: int  # already in the bank with the same text
    seconds: float
    changed: int = 0  # of ``added``: documents whose text changed since their gradient was stored

    @property
    def ms_per_document(self) -> float:
        return 1000 * self.seconds / max(1, self.added)


def worker_of(doc_id: str, num_workers: int) -> int:
    """Stable assignment of a document to one of ``num_workers`` build workers."""
    return zlib.crc32(doc_id.encode()) % num_workers


def add_gradients(model, tokenizer, space: LoraSpace, phi, chunks: Sequence[Chunk], bank: GradientBank, *,
                  doc_max_tokens: int = 200, batch_size: int = 8, overwrite: bool = False,
                  worker: int = 0, num_workers: int = 1, progress: bool = True,
                  checkpoint_layers: bool = False) -> BuildStats:
    """Compute and store the gradient of every chunk this worker owns that the bank lacks or
    holds for another text (content-aware: the bank records a hash of each chunk's text).

    Re-running after a kill continues: ids already flushed are skipped, not recomputed; the
    bank flushes whole batches, so a resumed build computes the same batches and ends
    bit-equal to an uninterrupted one. With ``overwrite`` every owned chunk is recomputed.
    ``checkpoint_layers`` recomputes decoder layers in backward (larger batches fit; the same
    gradients).
    """
    from tqdm.auto import tqdm

    owned = [c for c in chunks if worker_of(c.id, num_workers) == worker]
    hashes = {c.id: text_hash(c.text) for c in owned}
    changed = {c.id for c in owned if c.id in bank and bank.text_hash(c.id) not in (None, hashes[c.id])}
    todo = [c for c in owned if overwrite or c.id not in bank or c.id in changed]
    device = next(model.parameters()).device
    phi = {k: v.to(device, torch.float32) for k, v in phi.items()}
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="gradient bank", unit="doc", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            try:
                encoded = encode_documents(tokenizer, [c.text for c in batch], doc_max_tokens)
            except ValueError as err:  # a chunk too short to learn from
                raise DataError(f"{err}; remove that document or give it more text") from None
            tokens = {k: v.to(device) for k, v in encoded.items()}
            grads = document_gradients(model, space, phi, tokens, checkpoint_layers=checkpoint_layers)
            bank.add_batch([c.id for c in batch], {k: g.detach().cpu() for k, g in grads.items()}, overwrite=True,
                           text_hashes=[hashes[c.id] for c in batch])
            bar.update(len(batch))
    bank.flush()
    return BuildStats(added=len(todo), skipped=len(owned) - len(todo), seconds=time.perf_counter() - started,
                      changed=len(changed))


class Store:
    """A store directory and its ``regrad.json``.

    ``regrad.json`` (format 1): ``{"format_version": 1, "kind": "regrad-store", "model": NAME,
    "meta": PATH, "doc_max_tokens": N, "retriever": {"type": KIND, ...}, "library_version": V}``;
    ``meta`` is relative to the store directory (absolute if it was on another drive), or
    ``shipped:NAME`` for a checkpoint that ships inside the package. Files of
    older regrad versions (no ``format_version``, absolute ``meta``) are read as well.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`.
    """

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path, self._info = path, info

    # ------------------------------------------------------------ regrad.json
    @classmethod
    def create(cls, path: str | os.PathLike, *, model_name: str, meta_path: str | os.PathLike,
               doc_max_tokens: int, retriever: dict | None = None) -> Store:
        """Write a new store's ``regrad.json`` (the directory may exist, the file must not)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"--store {path} is a file: pass a directory (it is created if missing)")
        if (path / STORE_FILE).exists():
            raise StoreError(f"a store already exists at {path}: open it, or pick another --store")
        store = cls(path, {"format_version": STORE_FORMAT, "kind": STORE_KIND, "model": model_name,
                           "meta": "", "doc_max_tokens": int(doc_max_tokens),
                           "retriever": dict(retriever or {"type": "bm25"}), "library_version": library_version()})
        store._info["meta"] = store._relative(meta_path)
        store._write()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Read a store's ``regrad.json``.

        Raises:
            StoreError: No store there, or its ``regrad.json`` is damaged or too new.
        """
        path = Path(path)
        file = path / STORE_FILE
        if path.exists() and not path.is_dir():
            raise StoreError(f"--store {path} is a file, not a store directory")
        if not file.is_file():
            raise StoreError(f"no regrad store at {path}: build one with "
                             f"`regrad build --corpus FILE --meta CKPT --store {path}`")
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {file} ({exc}): the store is damaged; rebuild it with `regrad build` "
                             "into a new --store") from None
        if not isinstance(info, dict) or not {"model", "meta", "doc_max_tokens"} <= info.keys():
            raise StoreError(f"{file} is not a regrad store description (needs model, meta, doc_max_tokens); "
                             "rebuild the store with `regrad build`")
        version = info.get("format_version", 0)
        if info.get("kind", STORE_KIND) != STORE_KIND or not isinstance(version, int) or version > STORE_FORMAT:
            raise StoreError(f"{file} has kind {info.get('kind')!r}, format {version!r}; this regrad reads "
                             f"{STORE_KIND!r} up to format {STORE_FORMAT}: upgrade regrad or rebuild the store")
        return cls(path, info)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, **create_kwargs: Any) -> Store:
        """Open the store at ``path`` or create it with ``create_kwargs`` (see :meth:`create`)."""
        if (Path(path) / STORE_FILE).exists():
            return cls.open(path)
        return cls.create(path, **create_kwargs)

    def _relative(self, meta_path: str | os.PathLike) -> str:
        target = Path(meta_path).resolve()
        if target.parent == SHIPPED.resolve():  # a checkpoint of the package: by name, valid across reinstalls
            return f"{SHIPPED_PREFIX}{target.name}"
        try:
            return os.path.relpath(target, self.path.resolve())
        except ValueError:  # another drive (Windows): keep it absolute
            return str(target)

    def _write(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / STORE_FILE, self._info)

    @property
    def model_name(self) -> str:
        return self._info["model"]

    @property
    def meta_path(self) -> Path:
        """The meta checkpoint the store was built with."""
        if self._info["meta"].startswith(SHIPPED_PREFIX):
            return shipped_checkpoint(self._info["meta"][len(SHIPPED_PREFIX):])
        meta = Path(self._info["meta"])
        return meta if meta.is_absolute() else (self.path / meta).resolve()

    @property
    def doc_max_tokens(self) -> int:
        return int(self._info["doc_max_tokens"])

    @property
    def retriever(self) -> dict:
        """The index backend's description (``{"type": "bm25"}`` for stores of old versions)."""
        return dict(self._info.get("retriever") or {"type": "bm25"})

    def set_retriever(self, spec: dict) -> None:
        self._info["retriever"] = dict(spec)
        self._write()

    # ------------------------------------------------------------ parts
    def binding(self, model: LoadedModel, checkpoint: MetaCheckpoint) -> dict:
        return bank_binding(model, checkpoint, self.doc_max_tokens)

    def bank(self, binding: dict | None = None, **create: Any) -> GradientBank:
        """The store's bank; with ``create`` (shapes, storage_dtype, worker, ...) created if missing."""
        if create:
            return GradientBank.open_or_create(self.path / "bank", binding=binding, **create)
        return GradientBank.open(self.path / "bank", binding=binding)

    def index(self) -> DocumentIndex:
        """The index its ``regrad.json`` names.

        Raises:
            RetrievalError: The index is missing or its server cannot be reached.
        """
        return open_index(self.retriever, self.path / "index")

    def engine(self, *, model: LoadedModel | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               meta: str | None = None, retriever: Retriever | None = None, **engine_kwargs: Any) -> ReGrad:
        """A ready engine over the store (see :func:`open_engine`)."""
        checkpoint = MetaCheckpoint.load(meta or self.meta_path, device=device)
        if model is None:
            name = self.model_name
            model = load_model(name, device=device, dtype=dtype)
        checkpoint.check_base(model.fingerprint, model.name, tokenizer=model.tokenizer)
        space = LoraSpace.attach(model.model, checkpoint.lora)
        bank = self.bank(self.binding(model, checkpoint))
        index = retriever if retriever is not None else self.index()
        engine = ReGrad(model.model, model.tokenizer, space, checkpoint, retriever=index, bank=bank,
                        doc_max_tokens=self.doc_max_tokens, **engine_kwargs)
        engine.store_dir = str(self.path.resolve())  # adapters serialise an engine as its store
        return engine

    def delete(self, ids: Sequence[str], *, compact: bool = False) -> int:
        """Remove documents from the bank and the index: a chunk id removes that chunk, a
        source document id every chunk of it. Unknown ids change nothing (and raise). With
        ``compact`` the bank is rewritten at once, so the deleted gradients leave the disk.

        Returns:
            The number of chunks removed.
        """
        index = self.index()  # before the bank changes: a server that is down fails here
        with self.bank() as bank:
            bank.begin_writing()  # one writer for bank and index alike
            chunks: dict[str, list[str]] = {}
            for doc_id in sorted(set(bank.ids()) | set(index.ids())):
                chunks.setdefault(chunk_source(doc_id), []).append(doc_id)
            expanded = [c for i in ids for c in ([i] if i in bank or i in index else chunks.get(i, [i]))]
            unknown = [i for i in expanded if i not in bank and i not in index]
            if unknown:
                raise UnknownDocumentError(f"unknown document id {unknown[0]!r}: it is in neither the bank nor the "
                                           f"index of {self.path}")
            bank.delete([i for i in expanded if i in bank])
            index.delete(expanded)  # before compacting: bank and index agree even if compacting fails
            index.save()
            if compact:
                bank.compact()
        return len(expanded)

    def compact(self) -> int:
        """Rewrite the bank without deleted or replaced gradients; returns the bytes freed."""
        with self.bank() as bank:
            return bank.compact()

    def verify(self, *, repair: bool = False) -> tuple[VerifyReport, list[str], list[str]]:
        """Check the bank (see :meth:`GradientBank.verify`) and that bank and index hold the same ids.

        Returns:
            The bank's report, the ids the index has and the bank lacks (``regrad build``
            computes them), and the ids the bank has and the index lacks (removed from the
            bank with ``repair``: nothing can retrieve them).
        """
        report = GradientBank.verify(self.path / "bank", repair=repair)
        index_ids = set(self.index().ids())
        with GradientBank.open(self.path / "bank", strict=False) as bank:
            bank_ids = set(bank.ids())
            orphans = sorted(bank_ids - index_ids)
            if repair and orphans:
                bank.delete(orphans)
                bank.compact()
        return report, sorted(index_ids - bank_ids), orphans

    def merge(self) -> int:
        """Merge the build workers' shards into the bank; returns the number of documents."""
        return len(GradientBank.merge(self.path / "bank"))


def open_engine(store: str | Path, *, model: LoadedModel | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, meta: str | None = None, retriever: Retriever | None = None,
                **engine_kwargs: Any) -> ReGrad:
    """Open the model, meta checkpoint, bank and index of a store as a ready engine.

    ``retriever`` replaces the store's own index; ``engine_kwargs`` go to :class:`ReGrad`.

    Raises:
        StoreError: No store there. BankError: its bank was built for another model/checkpoint.
        CheckpointError: The checkpoint does not match the model.
    """
    return Store.open(store).engine(model=model, device=device, dtype=dtype, meta=meta, retriever=retriever,
                                    **engine_kwargs)


def build_store(store: str | Path, chunks: Sequence[Chunk], *, model: LoadedModel, meta_path: str,
                doc_max_tokens: int = 200, storage_dtype: str = "bf16", batch_size: int = 8,
                overwrite: bool = False, worker: int = 0, num_workers: int = 1, progress: bool = True,
                index: DocumentIndex | None = None, reuse_index: bool = False, flush_every: int = 64,
                flush_seconds: float = 30.0, checkpoint_layers: bool = False) -> BuildStats:
    """Index the chunks and add their gradients to the store's bank (creating it if needed).

    Gradients are flushed to disk every ``flush_every`` documents or ``flush_seconds``,
    whichever comes first (at batch ends): a killed build keeps everything flushed.

    Args:
        index: Search this index (e.g. an ``ElasticsearchIndex``) instead of the store's
            embedded BM25 index.
        reuse_index: ``index`` already holds every chunk (checked before any gradient
            is computed): write nothing to it.
        checkpoint_layers: Recompute decoder layers in backward (see :func:`add_gradients`).

    Raises:
        StoreError: The store was built with another chunk size or index backend.
        RetrievalError: With ``reuse_index``, chunks missing from ``index``.
    """
    checkpoint = MetaCheckpoint.load(meta_path)
    checkpoint.check_base(model.fingerprint, model.name, tokenizer=model.tokenizer)
    opened = open_for_build(store, chunks, model_name=model.name, meta_path=meta_path, doc_max_tokens=doc_max_tokens,
                            index=index, reuse_index=reuse_index)
    space = LoraSpace.attach(model.model, checkpoint.lora)
    with opened.bank(opened.binding(model, checkpoint), shapes=space.shapes, storage_dtype=storage_dtype,
                     worker=worker, num_workers=num_workers, shard_size=flush_every) as bank:
        bank.flush_seconds = flush_seconds
        stats = add_gradients(model.model, model.tokenizer, space, checkpoint.phi, chunks, bank,
                              doc_max_tokens=doc_max_tokens, batch_size=batch_size, overwrite=overwrite,
                              worker=worker, num_workers=num_workers, progress=progress,
                              checkpoint_layers=checkpoint_layers)
        if worker == 0 and not reuse_index:  # still under the bank's writer lock
            write_index(opened, chunks, index)
    return stats


def open_for_build(store: str | Path, chunks: Sequence[Chunk], *, model_name: str, meta_path: str,
                   doc_max_tokens: int, index: DocumentIndex | None = None, reuse_index: bool = False) -> Store:
    """Open (or create) the store a build writes, after checking it suits this build.

    Raises:
        StoreError: The store was built with another chunk size or index backend.
        RetrievalError: With ``reuse_index``, chunks missing from ``index``.
    """
    if index is not None and reuse_index:
        missing = index.missing([c.id for c in chunks])
        if missing:
            raise RetrievalError(
                f"{len(missing)} of {len(chunks)} chunks are not in {index} "
                f"(e.g. {missing[:3]}): drop --reuse-index to index them, or check --id-field and --chunk-tokens "
                f"(a document longer than one chunk becomes chunks <id>#0, <id>#1, ...)")
    spec = index.info() if index is not None else {"type": BM25Index.kind}
    opened = Store.open_or_create(store, model_name=model_name, meta_path=meta_path, doc_max_tokens=doc_max_tokens,
                                  retriever=spec)
    if opened.doc_max_tokens != doc_max_tokens:
        raise StoreError(f"store {store} uses chunks of {opened.doc_max_tokens} tokens, not {doc_max_tokens}")
    if opened.retriever["type"] != spec["type"]:
        raise StoreError(f"store {store} is searched with {opened.retriever['type']}, not {spec['type']}: "
                         "use a new --store")
    if opened.retriever != spec:  # e.g. the server moved: the last build wins
        opened.set_retriever(spec)
    return opened


def write_index(store: Store, chunks: Sequence[Chunk], index: DocumentIndex | None = None) -> None:
    """Add the chunks to ``index`` (default: the store's embedded BM25 index) and save it; call it
    holding the bank's writer lock, so bank and index are written by one writer."""
    target = index if index is not None else BM25Index.open_or_create(store.path / "index")
    target.add(chunks)
    target.save()
