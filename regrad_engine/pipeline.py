"""Stage 2 and wiring: build a store (Gradient Bank + BM25 index) and open an engine on it.

A *store* is a directory:
    regrad.json   which base model, meta checkpoint and chunk size it was built with, and
                  which retriever finds its chunks: ``{"type": "bm25"}`` (the embedded index
                  below) or ``{"type": "elasticsearch", "url": ..., "index": ...}`` (see
                  ``elastic.py``; never credentials, they come from the environment)
    bank/         the Gradient Bank (see ``bank.py``)
    index/        the BM25 index of the chunk texts (see ``retrieval.py``), unless Elasticsearch
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from regrad_engine.bank import BankError, GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.chunking import Chunk
from regrad_engine.elastic import ElasticsearchIndex
from regrad_engine.gradients import document_gradients
from regrad_engine.inference import ReGrad, bank_binding
from regrad_engine.lora import LoraSpace, lora_config_from_dict
from regrad_engine.models import LoadedModel, load_model
from regrad_engine.prompts import encode_documents
from regrad_engine.retrieval import BM25Index, RetrievalError, Retriever

STORE_FILE = "regrad.json"


@dataclass
class BuildStats:
    added: int
    skipped: int
    seconds: float

    @property
    def ms_per_document(self) -> float:
        return 1000 * self.seconds / max(1, self.added)


def worker_of(doc_id: str, num_workers: int) -> int:
    """Stable assignment of a document to one of ``num_workers`` build workers."""
    return zlib.crc32(doc_id.encode()) % num_workers


def add_gradients(model, tokenizer, space: LoraSpace, phi, chunks: Sequence[Chunk], bank: GradientBank, *,
                  doc_max_tokens: int = 200, batch_size: int = 8, overwrite: bool = False,
                  worker: int = 0, num_workers: int = 1, progress: bool = True) -> BuildStats:
    """Compute and store the gradient of every chunk this worker owns and the bank lacks.

    Re-running after a kill continues: ids already flushed are skipped, not recomputed.
    With ``overwrite`` every owned chunk is recomputed (documents whose text changed).
    """
    from tqdm.auto import tqdm

    owned = [c for c in chunks if worker_of(c.id, num_workers) == worker]
    todo = [c for c in owned if overwrite or c.id not in bank]
    device = next(model.parameters()).device
    phi = {k: v.to(device, torch.float32) for k, v in phi.items()}
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="gradient bank", unit="doc", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            tokens = {k: v.to(device) for k, v in encode_documents(tokenizer, [c.text for c in batch], doc_max_tokens).items()}
            grads = document_gradients(model, space, phi, tokens)
            bank.add_batch([c.id for c in batch], {k: g.detach().cpu() for k, g in grads.items()}, overwrite=overwrite)
            bar.update(len(batch))
    bank.flush()
    return BuildStats(added=len(todo), skipped=len(owned) - len(todo), seconds=time.perf_counter() - started)


def write_store_info(store: Path, *, model_name: str, meta_path: str, doc_max_tokens: int,
                     retriever: dict | None = None) -> None:
    store.mkdir(parents=True, exist_ok=True)
    info = {"model": model_name, "meta": str(Path(meta_path).resolve()), "doc_max_tokens": doc_max_tokens,
            "retriever": retriever or {"type": "bm25"}}
    (store / STORE_FILE).write_text(json.dumps(info, indent=1))


def read_store_info(store: str | Path) -> dict:
    path = Path(store) / STORE_FILE
    if not path.exists():
        raise BankError(f"no regrad store at {store}: build one with `regrad build --corpus FILE --meta CKPT --store {store}`")
    return json.loads(path.read_text())


def open_store_index(store: str | Path) -> BM25Index | ElasticsearchIndex:
    """Open the retriever a store's ``regrad.json`` names (the embedded BM25 index for older stores).

    Raises:
        BankError: No store there.
        RetrievalError: The index is missing or its server cannot be reached.
    """
    spec = read_store_info(store).get("retriever") or {"type": "bm25"}
    if spec["type"] == "elasticsearch":
        return ElasticsearchIndex.from_store_info(spec)
    if spec["type"] != "bm25":
        raise RetrievalError(f"store {store} names an unknown retriever {spec['type']!r}; "
                             f"rebuild it with `regrad build`")
    return BM25Index.open(Path(store) / "index")


def open_engine(store: str | Path, *, model: LoadedModel | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, meta: str | None = None, retriever: Retriever | None = None,
                **engine_kwargs) -> ReGrad:
    """Open the model, meta checkpoint, bank and index of a store as a ready engine.

    ``retriever`` replaces the store's own index (:func:`open_store_index`).

    Raises:
        BankError: No store there, or its bank was built for another model/checkpoint.
        CheckpointError: The checkpoint does not match the model.
    """
    info = read_store_info(store)
    checkpoint = MetaCheckpoint.load(meta or info["meta"], device=device)
    if model is None:
        model = load_model(None if info["model"].startswith("embedded:") else info["model"], device=device, dtype=dtype)
    checkpoint.check_base(model.fingerprint, model.name)
    space = getattr(model.model, "_regrad_space", None) or LoraSpace(model.model, lora_config_from_dict(checkpoint.lora))
    binding = bank_binding(model.fingerprint, checkpoint, info["doc_max_tokens"])
    bank = GradientBank.open(Path(store) / "bank", binding=binding)
    index = retriever if retriever is not None else open_store_index(store)
    return ReGrad(model.model, model.tokenizer, space, checkpoint, retriever=index, bank=bank,
                  doc_max_tokens=info["doc_max_tokens"], **engine_kwargs)


def build_store(store: str | Path, chunks: Sequence[Chunk], *, model: LoadedModel, meta_path: str,
                doc_max_tokens: int = 200, storage_dtype: str = "bf16", batch_size: int = 8,
                overwrite: bool = False, worker: int = 0, num_workers: int = 1, progress: bool = True,
                index: ElasticsearchIndex | None = None, reuse_index: bool = False) -> BuildStats:
    """Index the chunks and add their gradients to the store's bank (creating it if needed).

    Args:
        index: Search this Elasticsearch index instead of the store's embedded BM25 index.
        reuse_index: ``index`` already holds every chunk (checked before any gradient
            is computed): write nothing to it.

    Raises:
        BankError: The store was built with another chunk size or retriever type.
        RetrievalError: With ``reuse_index``, chunks missing from ``index``.
    """
    store = Path(store)
    checkpoint = MetaCheckpoint.load(meta_path)
    checkpoint.check_base(model.fingerprint, model.name)
    if index is not None and reuse_index:
        missing = index.missing([c.id for c in chunks])
        if missing:
            raise RetrievalError(
                f"{len(missing)} of {len(chunks)} chunks are not in Elasticsearch index {index.index} "
                f"(e.g. {missing[:3]}): drop --reuse-index to index them, or check --id-field and --chunk-tokens "
                f"(a document longer than one chunk becomes chunks <id>#0, <id>#1, ...)")
    retriever = index.store_info() if index is not None else {"type": "bm25"}
    if (store / STORE_FILE).exists():
        info = read_store_info(store)
        if info["doc_max_tokens"] != doc_max_tokens:
            raise BankError(f"store {store} uses chunks of {info['doc_max_tokens']} tokens, not {doc_max_tokens}")
        kind = (info.get("retriever") or {"type": "bm25"})["type"]
        if kind != retriever["type"]:
            raise BankError(f"store {store} is searched with {kind}, not {retriever['type']}: use a new --store")
        if index is not None and info.get("retriever") != retriever:  # e.g. the server moved: the last build wins
            (store / STORE_FILE).write_text(json.dumps({**info, "retriever": retriever}, indent=1))
    else:
        write_store_info(store, model_name=model.name, meta_path=meta_path, doc_max_tokens=doc_max_tokens,
                         retriever=retriever)
    space = getattr(model.model, "_regrad_space", None) or LoraSpace(model.model, lora_config_from_dict(checkpoint.lora))
    binding = bank_binding(model.fingerprint, checkpoint, doc_max_tokens)
    with GradientBank.open_or_create(store / "bank", binding=binding, shapes=space.shapes,
                                     storage_dtype=storage_dtype, worker=worker, num_workers=num_workers) as bank:
        stats = add_gradients(model.model, model.tokenizer, space, checkpoint.phi, chunks, bank,
                              doc_max_tokens=doc_max_tokens, batch_size=batch_size, overwrite=overwrite,
                              worker=worker, num_workers=num_workers, progress=progress)
    if worker == 0 and index is None:
        bm25 = BM25Index.open_or_create(store / "index")
        bm25.add(chunks)
        bm25.save()
    elif worker == 0 and not reuse_index:
        index.add(chunks)
        index.save()
    return stats
