"""Bank builds on Ray: a pool of actors, one model each, computes a store's gradients.

The hand-made split (``regrad build --worker i --num-workers n``, then ``regrad merge``) is
the building block. The chunks are cut into *slices* by
:func:`~regrad_engine.store.worker_of` (a stable hash of the id), and slice ``s`` is bank
worker ``s`` of ``slices``: its own shard names, its own manifest (``manifest.wNNN.json``) and
its own writer lock. Ray Data hands the slices to an actor pool (one actor per GPU, or per
``cpus_per_worker`` CPUs); an actor computes a slice in batches with
:func:`~regrad_engine.store.add_gradients`, flushing every ``flush_every`` documents.

What a build guarantees:

* A task whose actor dies (killed, out of memory, node lost) is retried by Ray Data on a
  restarted actor. The retry opens that slice's manifest again and computes only what is
  missing (same id and same text hash: skipped), so no document is lost or stored twice.
* The bank's ``manifest.json`` changes once, at the end: after every slice is done the
  driver merges the slices' manifests into it (one atomic write), checks that every chunk is
  in the bank with the gradient of its current text, and only then writes the index (on the
  driver). Until then readers see the bank as it was.
* A driver that dies leaves the slices' manifests behind; the same build run again continues
  them (the slice count is read back from them) and computes only the missing documents.

The store must be a path that the driver and every actor see (a shared file system): shards
are written with fsync and atomic renames and locked with OS file locks, which fsspec URLs
(``s3://``...) do not offer, so they are not supported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from regrad_engine.bank import GradientBank, text_hash
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.data import Chunk
from regrad_engine import errors
from regrad_engine.errors import ModelLoadError, RegradError, StoreError
from regrad_engine.lora import LoraSpace
from regrad_engine.models import LoadedModel, embedded_alias, load_model, resolve_model_path
from regrad_engine.retrieval.base import DocumentIndex
from regrad_engine.store import BuildStats, add_gradients, bank_binding, open_for_build, worker_of, write_index

MAX_SLICES = 1000  # worker manifests are numbered with three digits
INSTALL = "pip install 'regrad[ray]'"


class ModelLoader(Protocol):
    """What each actor calls once to get its model; pickled to the actors."""

    name: str  # the name the loaded model will have (``LoadedModel.name``): ``regrad.json`` records it

    def __call__(self) -> LoadedModel: ...


@dataclass(frozen=True)
class ModelSpec:
    """Which model an actor loads (picklable: the model is loaded where the actor runs).

    Attributes:
        model: HF id or local path (every node must reach it); None for the embedded default.
        device: Torch device inside the actor (``"cuda"`` is the actor's own GPU).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        threads: Torch CPU threads of the actor (None: Ray's default, its CPU share).
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    @property
    def name(self) -> str:
        """The name :func:`load_model` gives the model (what ``regrad.json`` records)."""
        return embedded_alias(self.model) or str(self.model)

    def __call__(self) -> LoadedModel:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.model, device=self.device, dtype=getattr(torch, self.dtype))

    def tokenizer(self):
        """The model's tokenizer alone (the driver chunks the corpus; it never loads the model)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(resolve_model_path(self.model))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the tokenizer of model {self.model!r}: {err}") from err


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(f"bank builds on Ray need Ray Data: {INSTALL}") from None
    return ray


def build_store_ray(store: str | Path, chunks: Sequence[Chunk], *, loader: ModelLoader,
                    meta_path: str | Path, doc_max_tokens: int = 200, storage_dtype: str = "bf16",
                    batch_size: int = 8, overwrite: bool = False, workers: int | None = None,
                    cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, slices: int | None = None,
                    flush_every: int = 64, flush_seconds: float = 30.0, index: DocumentIndex | None = None,
                    reuse_index: bool = False) -> BuildStats:
    """:func:`~regrad_engine.store.build_store` on the Ray cluster this process is connected to
    (``ray.init`` is the caller's; without it Ray starts a local one). See the module docstring.

    Args:
        loader: Called once in each actor (e.g. :class:`ModelSpec`; tests pass their own).
        workers: Actors, each with one model (default: as many as the cluster has room for).
        cpus_per_worker, gpus_per_worker: What each actor reserves (1 GPU: one model per GPU).
        slices: How many bank workers the chunks are split into (default: the count of an
            unfinished build of this store, else 4 per actor); a slice is the unit of retry.
        Other arguments: as for ``build_store``.

    Returns:
        The totals of the slices; ``added`` counts the documents computed by the attempts that
        finished (what a killed attempt had flushed is counted in ``skipped``; with
        ``overwrite`` a retried slice is computed again whole).

    Raises:
        StoreError: The store does not suit this build, or a chunk has no gradient afterwards.
        RegradError: The one an actor met (e.g. CheckpointError for another base model), after
            the other slices are done.
    """
    ray = _import_ray()
    started = time.perf_counter()
    meta_path = Path(meta_path).resolve()  # actors may run elsewhere: no path relative to this cwd
    MetaCheckpoint.load(meta_path)  # a bad --meta fails here, before the cluster is asked for anything
    opened = open_for_build(store, chunks, model_name=loader.name, meta_path=str(meta_path),
                            doc_max_tokens=doc_max_tokens, index=index, reuse_index=reuse_index)
    bank_dir = opened.path.resolve() / "bank"
    workers = workers or _room_for(ray, cpus_per_worker, gpus_per_worker)
    slices = _slice_count(bank_dir, slices, workers)
    settings = dict(doc_max_tokens=doc_max_tokens, storage_dtype=storage_dtype, batch_size=batch_size,
                    overwrite=overwrite, flush_every=flush_every, flush_seconds=flush_seconds)
    rows = [{"slice": s, "ids": [c.id for c in part], "texts": [c.text for c in part]}
            for s, part in enumerate(_split(chunks, slices))]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        SliceWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, slices)),
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
        fn_constructor_kwargs=dict(loader=loader, meta_path=str(meta_path), bank_dir=str(bank_dir), slices=slices,
                                   **settings))
    done = dataset.take_all()  # actors that die are restarted and their slice retried (Ray Data's default)
    failed = [r for r in done if r["error"]]
    if failed:  # the other slices' gradients are kept: the same build run again continues
        raise _error(failed[0]["error_type"], failed[0]["error"])
    with GradientBank.merge(bank_dir) as bank:  # manifest.json is written here, once
        _check_complete(bank, chunks, store)
        if not reuse_index:
            bank.begin_writing()  # one writer for bank and index alike
            write_index(opened, chunks, index)
    return BuildStats(added=int(sum(r["added"] for r in done)), skipped=int(sum(r["skipped"] for r in done)),
                      changed=int(sum(r["changed"] for r in done)), seconds=time.perf_counter() - started)


class SliceWorker:
    """A Ray Data actor: loads one model, then computes whole slices, each as its bank worker."""

    def __init__(self, *, loader: ModelLoader, meta_path: str, bank_dir: str, slices: int,
                 doc_max_tokens: int, storage_dtype: str, batch_size: int, overwrite: bool, flush_every: int,
                 flush_seconds: float) -> None:
        self.bank_dir, self.slices, self.storage_dtype = Path(bank_dir), slices, storage_dtype
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.add_kwargs = dict(doc_max_tokens=doc_max_tokens, batch_size=batch_size, overwrite=overwrite)
        # An error here would make Ray restart the actor again and again: keep it for the tasks.
        self.failed: RegradError | None = None
        try:
            self.model = loader()
            self.checkpoint = MetaCheckpoint.load(meta_path)
            self.checkpoint.check_base(self.model.fingerprint, self.model.name, tokenizer=self.model.tokenizer)
        except RegradError as err:
            self.failed = err
            return
        self.space = LoraSpace.attach(self.model.model, self.checkpoint.lora)
        self.binding = bank_binding(self.model, self.checkpoint, doc_max_tokens)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """One row per slice: its BuildStats, or the RegradError it met (as data: Ray keeps only
        the text of an exception, and an error of the user's data is not worth a retry)."""
        out: dict[str, list] = {k: [] for k in ("slice", "added", "skipped", "changed", "seconds", "error_type",
                                                "error")}
        for s, ids, texts in zip(batch["slice"], batch["ids"], batch["texts"]):
            stats, error = BuildStats(0, 0, 0.0), self.failed
            if error is None:
                try:
                    stats = self.build_slice(int(s), [Chunk(id=str(i), text=str(t), source_id=str(i), index=0)
                                                      for i, t in zip(ids, texts)])
                except RegradError as err:
                    error = err
            for key, value in (("slice", int(s)), ("added", stats.added), ("skipped", stats.skipped),
                               ("changed", stats.changed), ("seconds", stats.seconds),
                               ("error_type", type(error).__name__ if error else ""), ("error", str(error or ""))):
                out[key].append(value)
        return out

    def build_slice(self, s: int, chunks: list[Chunk]) -> BuildStats:
        """Add what slice ``s`` lacks to its worker manifest (what an earlier attempt flushed stays)."""
        with GradientBank.open_or_create(self.bank_dir, binding=self.binding, shapes=self.space.shapes,
                                         storage_dtype=self.storage_dtype, shard_size=self.flush_every,
                                         worker=s, num_workers=self.slices) as bank:
            bank.flush_seconds = self.flush_seconds
            return add_gradients(self.model.model, self.model.tokenizer, self.space, self.checkpoint.phi, chunks,
                                 bank, worker=s, num_workers=self.slices, progress=False, **self.add_kwargs)


def _room_for(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many actors of that size the cluster holds now (at least one)."""
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9)))


def _slice_count(bank_dir: Path, slices: int | None, workers: int) -> int:
    """The slice count: an unfinished build's (its worker manifests say it), else ``slices`` or
    4 per actor; at least 2, so the main manifest is only ever written by the final merge."""
    unfinished = {json.loads(p.read_text(encoding="utf-8")).get("num_workers")
                  for p in bank_dir.glob("manifest.w[0-9][0-9][0-9].json")}
    if len(unfinished) > 1:
        raise StoreError(f"{bank_dir} holds worker manifests of builds with different worker counts "
                         f"({sorted(unfinished)}): finish one with `regrad build --worker i --num-workers n`, or "
                         "delete the bank and build again")
    if unfinished:
        (count,) = unfinished
        if slices is not None and slices != count:
            raise StoreError(f"{bank_dir} holds an unfinished build of {count} slices: continue it with "
                             f"slices={count} (or the default)")
        return int(count)
    count = slices if slices is not None else 4 * workers
    if not 2 <= count <= MAX_SLICES:
        raise StoreError(f"slices must be between 2 and {MAX_SLICES}, got {count}")
    return count


def _split(chunks: Sequence[Chunk], slices: int) -> list[list[Chunk]]:
    parts: list[list[Chunk]] = [[] for _ in range(slices)]
    for chunk in chunks:
        parts[worker_of(chunk.id, slices)].append(chunk)
    return parts


def _check_complete(bank: GradientBank, chunks: Sequence[Chunk], store: str | Path) -> None:
    """Every chunk has a gradient of its current text (what the retries promise, checked)."""
    missing = [c.id for c in chunks if c.id not in bank or bank.text_hash(c.id) not in (None, text_hash(c.text))]
    if missing:
        raise StoreError(f"{len(missing)} of {len(chunks)} chunks have no gradient of their text after the build "
                         f"(e.g. {missing[:3]}): run the same build again on {store}; it computes only those")


def _error(name: str, message: str) -> RegradError:
    """The RegradError an actor met, by class name (Ray's wrappers lose the exception itself)."""
    kind = getattr(errors, name, None)
    return (kind if isinstance(kind, type) and issubclass(kind, RegradError) else RegradError)(message)
