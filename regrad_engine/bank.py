"""Gradient Bank: on-disk store of per-document LoRA gradients, keyed by document id.

Every document (chunk) of the corpus gets one gradient of its LM loss w.r.t. the LoRA
factors ("phi"): a flat ``dict[str, Tensor]`` such as
``{"model.layers.20.mlp.gate_proj.lora_A": (r, in), "...lora_B": (out, r), ...}``.
All documents share exactly the same keys and shapes. At inference the gradients of
the top-k retrieved documents are fetched and summed (:meth:`GradientBank.sum`).

Layout of a bank directory::

    manifest.json                       # {format_version, binding, shapes, storage_dtype,
                                        #  shards: [{file, ids}], deleted: [...], ...}
    shard-w000-000000.safetensors       # one stacked tensor per key: (n_rows, *shape)
    manifest.w001.json                  # only while worker 1 of N builds (before merge)

Writes are append-only: pending rows are flushed as a new shard file (tmp + os.replace),
then the manifest is rewritten atomically, so a killed build loses only unflushed rows.
When a document id appears in several shards (overwrite), the latest shard wins.
Reads are lazy and memory-mapped through ``safetensors.safe_open``.

A bank object is not thread-safe, and two processes must not write the same manifest
(use distinct ``worker`` indices and :meth:`GradientBank.merge`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regrad_engine.errors import (
    BankError,
    BankMismatchError,
    InvalidInputError,
    UnknownDocumentError,
)
from regrad_engine.files import atomic_write, atomic_write_json

__all__ = [
    "BankError",
    "BankMismatchError",
    "UnknownDocumentError",
    "InvalidInputError",
    "GradientBank",
]

logger = logging.getLogger(__name__)

_MAIN_MANIFEST = "manifest.json"
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
_WORKER_MANIFEST_RE = re.compile(r"^manifest\.w(\d{3})\.json$")


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("regrad")
    except Exception:  # not installed (source checkout)
        return "unknown"


def _norm_dtype(storage_dtype: str) -> str:
    if not isinstance(storage_dtype, str):
        raise InvalidInputError(f"storage_dtype must be a string (fp32, bf16 or fp16), got {storage_dtype!r}")
    name = _DTYPE_ALIASES.get(storage_dtype.lower(), storage_dtype.lower())
    if name not in _DTYPES:
        raise InvalidInputError(f"unknown storage_dtype {storage_dtype!r}: use one of fp32, bf16, fp16")
    return name


def _norm_shapes(shapes: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, dict) or not shapes:
        raise InvalidInputError("shapes must be a non-empty dict {parameter name: shape tuple}")
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"shape keys must be non-empty strings, got {key!r}")
        dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise InvalidInputError(f"shape of {key!r} must be a tuple of positive ints, got {shape!r}")
        out[key] = dims
    return out


def _norm_binding(binding: Any) -> dict:
    if not isinstance(binding, dict):
        raise InvalidInputError(f"binding must be a dict (e.g. base model fingerprint), got {type(binding).__name__}")
    try:  # JSON roundtrip: what is stored is what is compared (tuples -> lists)
        return json.loads(json.dumps(binding, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"binding must be JSON-serialisable: {exc}") from None


def _check_id(doc_id: Any) -> str:
    if not isinstance(doc_id, str):
        raise InvalidInputError(f"document ids must be str, got {type(doc_id).__name__} ({doc_id!r})")
    if not doc_id:
        raise InvalidInputError("document ids must be non-empty strings")
    return doc_id


def _binding_diff(stored: dict, given: dict) -> list[str]:
    missing = "<absent>"
    return [
        f"{k}: bank was built for {stored.get(k, missing)!r}, this run has {given.get(k, missing)!r}"
        for k in sorted(set(stored) | set(given))
        if stored.get(k, missing) != given.get(k, missing)
    ]


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BankError(f"cannot read bank manifest {path}: {exc}; the bank is corrupted, rebuild it") from None
    version = data.get("format_version")
    if not isinstance(version, int) or version > GradientBank.FORMAT_VERSION:
        raise BankError(
            f"{path} has format_version {version!r}, this regrad reads <= {GradientBank.FORMAT_VERSION}: "
            "upgrade regrad or rebuild the bank"
        )
    return data


class GradientBank:
    """Append-only, resumable store of per-document gradients (see module docstring).

    Attributes:
        path: Bank directory.
        binding: What the bank is bound to (base model fingerprint, meta checkpoint...).
        shapes: ``{key: shape}`` of every stored gradient.
        storage_dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    FORMAT_VERSION = 1

    # ---------------------------------------------------------------- construction
    def __init__(self, path: Path, meta: dict, base: dict | None, worker: int, num_workers: int,
                 shard_size: int | None = None) -> None:
        """Internal: use :meth:`create`, :meth:`open`, :meth:`open_or_create` or :meth:`merge`."""
        self.path = path
        self._worker, self._num_workers = worker, num_workers
        self._binding = meta["binding"]
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in meta["shapes"].items()}
        self.storage_dtype: str = meta["storage_dtype"]
        self._dtype = _DTYPES[self.storage_dtype]
        self.shard_size = int(shard_size or meta.get("shard_size", 256))
        self._shards: list[dict] = [dict(file=s["file"], ids=list(s["ids"])) for s in meta["shards"]]
        self._deleted: set[str] = set(meta.get("deleted", []))
        # Worker mode: the merged main manifest (if any) is a read-only base layer.
        self._base_shards: list[dict] = list(base["shards"]) if base else []
        self._base_deleted: set[str] = set(base.get("deleted", [])) if base else set()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # id -> {key: (*shape) storage dtype}
        self._handles: dict[str, Any] = {}
        self._closed = False
        for s in self._base_shards + self._shards:
            if not (path / s["file"]).is_file():
                raise BankError(f"shard {s['file']} listed in the manifest of {path} is missing: rebuild the bank")
        self._build_index()
        seqs = [int(m.group(1)) for p in path.glob(f"shard-w{worker:03d}-*.safetensors*")
                if (m := re.match(rf"shard-w{worker:03d}-(\d+)\.safetensors", p.name))]
        self._next_seq = max(seqs, default=-1) + 1

    @staticmethod
    def _manifest_name(worker: int, num_workers: int) -> str:
        if not (isinstance(num_workers, int) and num_workers >= 1 and isinstance(worker, int)
                and 0 <= worker < num_workers):
            raise InvalidInputError(f"need 0 <= worker < num_workers, got worker={worker!r}, num_workers={num_workers!r}")
        return _MAIN_MANIFEST if num_workers == 1 else f"manifest.w{worker:03d}.json"

    @classmethod
    def create(cls, path: str | os.PathLike, *, binding: dict, shapes: dict[str, tuple[int, ...]],
               storage_dtype: str = "bf16", shard_size: int = 256, worker: int = 0,
               num_workers: int = 1) -> GradientBank:
        """Creates an empty bank (or this worker's part of one) at ``path``.

        Raises:
            BankError: A bank (or this worker's manifest) already exists there.
            BankMismatchError: Worker mode and the merged bank there has another binding/layout.
        """
        path = Path(path)
        name = cls._manifest_name(worker, num_workers)
        binding, shapes, dtype = _norm_binding(binding), _norm_shapes(shapes), _norm_dtype(storage_dtype)
        if not isinstance(shard_size, int) or shard_size < 1:
            raise InvalidInputError(f"shard_size must be a positive int, got {shard_size!r}")
        if (path / name).exists() or (num_workers == 1 and cls._worker_manifests(path)):
            raise BankError(f"a Gradient Bank already exists at {path}: use GradientBank.open/open_or_create "
                            "(or merge its worker manifests), or pick another directory")
        base = None
        if num_workers > 1 and (path / _MAIN_MANIFEST).exists():
            base = _read_manifest(path / _MAIN_MANIFEST)
            cls._check_meta(base, path, binding, shapes, dtype)
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(format_version=cls.FORMAT_VERSION, binding=binding,
                    shapes={k: list(v) for k, v in shapes.items()}, storage_dtype=dtype, shard_size=shard_size,
                    worker=worker, num_workers=num_workers, shards=[], deleted=[],
                    library_version=_library_version())
        atomic_write_json(path / name, meta)
        return cls(path, meta, base, worker, num_workers)

    @classmethod
    def open(cls, path: str | os.PathLike, *, binding: dict | None = None, worker: int = 0,
             num_workers: int = 1) -> GradientBank:
        """Opens an existing bank; checks ``binding`` against the stored one when given.

        Raises:
            BankError: No bank at ``path`` (or its worker manifests are not merged yet).
            BankMismatchError: ``binding`` differs from the stored one.
        """
        return cls._open(Path(path), binding, None, None, worker, num_workers, None)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, *, binding: dict, shapes: dict[str, tuple[int, ...]],
                       storage_dtype: str = "bf16", shard_size: int = 256, worker: int = 0,
                       num_workers: int = 1) -> GradientBank:
        """Opens the bank at ``path`` (checking binding, shapes and storage dtype) or creates it."""
        path = Path(path)
        if (path / cls._manifest_name(worker, num_workers)).exists():
            return cls._open(path, binding, _norm_shapes(shapes), _norm_dtype(storage_dtype), worker,
                             num_workers, shard_size)
        return cls.create(path, binding=binding, shapes=shapes, storage_dtype=storage_dtype,
                          shard_size=shard_size, worker=worker, num_workers=num_workers)

    @classmethod
    def _open(cls, path: Path, binding: dict | None, shapes: dict | None, dtype: str | None, worker: int,
              num_workers: int, shard_size: int | None) -> GradientBank:
        name = cls._manifest_name(worker, num_workers)
        if not (path / name).is_file():
            if num_workers == 1 and cls._worker_manifests(path):
                raise BankError(f"the Gradient Bank at {path} was built by several workers and not merged yet: "
                                "run `regrad merge --store <the store above it>` (GradientBank.merge) first")
            if num_workers > 1 and (path / _MAIN_MANIFEST).exists():
                raise BankError(f"worker {worker} has no manifest ({name}) in {path}: use open_or_create")
            raise BankError(f"no Gradient Bank at {path}: build one with `regrad build ...`")
        meta = _read_manifest(path / name)
        cls._check_meta(meta, path, None if binding is None else _norm_binding(binding), shapes, dtype)
        if num_workers == 1 and cls._worker_manifests(path):
            logger.warning("%s has unmerged worker manifests: run `regrad merge --store <the store above it>` "
                           "to include them", path)
        base = _read_manifest(path / _MAIN_MANIFEST) if num_workers > 1 and (path / _MAIN_MANIFEST).exists() else None
        if num_workers > 1 and int(meta.get("num_workers", num_workers)) != num_workers:
            raise BankError(f"{name} in {path} was written with num_workers={meta.get('num_workers')}, "
                            f"not {num_workers}: resume with the same worker count")
        return cls(path, meta, base, worker, num_workers, shard_size)

    @staticmethod
    def _check_meta(meta: dict, path: Path, binding: dict | None, shapes: dict | None, dtype: str | None) -> None:
        problems = _binding_diff(meta["binding"], binding) if binding is not None else []
        if shapes is not None and _norm_shapes(meta["shapes"]) != shapes:
            stored = _norm_shapes(meta["shapes"])
            bad = sorted(k for k in set(stored) | set(shapes) if stored.get(k) != shapes.get(k))
            problems += [f"shape of {k}: bank has {stored.get(k)}, this run has {shapes.get(k)}" for k in bad[:5]]
        if dtype is not None and meta["storage_dtype"] != dtype:
            problems.append(f"storage_dtype: bank has {meta['storage_dtype']!r}, this run asks {dtype!r}")
        if problems:
            raise BankMismatchError(f"the Gradient Bank at {path} does not match this run:\n  - "
                                    + "\n  - ".join(problems)
                                    + "\nrebuild the bank or load the matching model/checkpoint")

    @staticmethod
    def _worker_manifests(path: Path) -> dict[int, Path]:
        if not path.is_dir():
            return {}
        return {int(m.group(1)): p for p in path.iterdir() if (m := _WORKER_MANIFEST_RE.match(p.name))}

    # ---------------------------------------------------------------- index / metadata
    @property
    def binding(self) -> dict:
        """What the bank is bound to (a copy)."""
        return copy.deepcopy(self._binding)

    def _build_index(self) -> None:
        index: dict[str, tuple[str, int]] = {}
        for s in self._base_shards:
            index.update((i, (s["file"], r)) for r, i in enumerate(s["ids"]))
        for i in self._base_deleted:
            index.pop(i, None)
        for s in self._shards:  # later shards win (overwrite)
            index.update((i, (s["file"], r)) for r, i in enumerate(s["ids"]))
        for i in self._deleted:
            index.pop(i, None)
        self._index = index  # id -> (shard file, row)

    def _meta(self) -> dict:
        return dict(format_version=self.FORMAT_VERSION, binding=self._binding,
                    shapes={k: list(v) for k, v in self.shapes.items()}, storage_dtype=self.storage_dtype,
                    shard_size=self.shard_size, worker=self._worker, num_workers=self._num_workers,
                    shards=self._shards, deleted=sorted(self._deleted), library_version=_library_version())

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / self._manifest_name(self._worker, self._num_workers), self._meta())

    def _alive(self) -> None:
        if self._closed:
            raise BankError(f"the Gradient Bank at {self.path} is closed: open it again")

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._pending or doc_id in self._index

    def ids(self) -> list[str]:
        """All stored (flushed or pending) document ids, sorted."""
        return sorted(self._index.keys() | self._pending.keys())

    def nbytes_per_document(self) -> int:
        """Bytes one document's gradient takes on disk (storage dtype, tensor data only)."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return sum(math.prod(s) for s in self.shapes.values()) * itemsize

    # ---------------------------------------------------------------- writing
    def _validate(self, grad: Any, batch: int | None) -> None:
        if not isinstance(grad, dict):
            raise BankError(f"gradient must be a dict {{key: Tensor}}, got {type(grad).__name__}")
        for key in sorted(set(self.shapes) | set(grad)):
            if key not in grad:
                raise BankError(f"gradient is missing key {key!r} (the bank stores {len(self.shapes)} keys)")
            if key not in self.shapes:
                raise BankError(f"gradient has unexpected key {key!r}: it does not match this bank's LoRA layout")
            t = grad[key]
            want = self.shapes[key] if batch is None else (batch, *self.shapes[key])
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise BankError(f"gradient {key!r} must be a floating-point Tensor, got {getattr(t, 'dtype', type(t))}")
            if tuple(t.shape) != want:
                raise BankError(f"gradient {key!r} has shape {tuple(t.shape)}, the bank expects {want}")
            if not bool(torch.isfinite(t).all()):
                raise BankError(f"gradient {key!r} contains NaN/Inf: fix the training step before storing it")

    def add(self, doc_id: str, grad: dict[str, torch.Tensor], *, overwrite: bool = False) -> None:
        """Adds (or with ``overwrite=True`` replaces) one document's gradient.

        Args:
            doc_id: Non-empty document id.
            grad: ``{key: (*shape)}`` with exactly the bank's keys and shapes.
            overwrite: Replace an existing entry instead of raising.

        Raises:
            BankError: Bad keys/shapes, or duplicate id without ``overwrite``.
        """
        self._alive()
        _check_id(doc_id)
        self._validate(grad, None)
        if not overwrite and doc_id in self:
            raise BankError(f"document {doc_id!r} is already in the bank: pass overwrite=True to replace it")
        self._pending[doc_id] = {k: grad[k].detach().to(device="cpu", dtype=self._dtype, copy=True)
                                 for k in self.shapes}
        if len(self._pending) >= self.shard_size:
            self.flush()

    def add_batch(self, doc_ids: list[str], grads: dict[str, torch.Tensor], *, overwrite: bool = False) -> None:
        """Adds N documents at once; each ``grads`` value is ``(N, *shape)``. All-or-nothing validation."""
        self._alive()
        doc_ids = [_check_id(i) for i in doc_ids]
        if len(set(doc_ids)) != len(doc_ids):
            raise BankError("add_batch got the same document id twice in one batch")
        self._validate(grads, len(doc_ids))
        if not overwrite and (dup := [i for i in doc_ids if i in self]):
            raise BankError(f"document {dup[0]!r} is already in the bank: pass overwrite=True to replace it")
        for n, doc_id in enumerate(doc_ids):
            self.add(doc_id, {k: v[n] for k, v in grads.items()}, overwrite=True)

    def flush(self) -> None:
        """Writes pending rows as a new shard (atomic), then the manifest (atomic)."""
        if self._closed or not self._pending:
            return
        ids = list(self._pending)
        file = self._write_shard(ids, {k: torch.stack([self._pending[i][k] for i in ids]) for k in self.shapes})
        self._shards.append(dict(file=file, ids=ids))
        self._deleted.difference_update(ids)  # re-added after a delete: alive again
        self._write_manifest()
        self._pending.clear()
        self._build_index()

    def _write_shard(self, ids: list[str], tensors: dict[str, torch.Tensor]) -> str:
        """Write rows ``(n, *shape)`` of ``ids`` as this writer's next shard file (atomic); its name."""
        file = f"shard-w{self._worker:03d}-{self._next_seq:06d}.safetensors"
        atomic_write(self.path / file, lambda tmp: save_file(
            tensors, str(tmp), metadata={"regrad_ids": json.dumps(ids), "regrad_format_version": str(self.FORMAT_VERSION)}))
        self._next_seq += 1
        return file

    def delete(self, doc_ids: str | Iterable[str]) -> int:
        """Deletes documents (tombstones; :meth:`compact` reclaims space). Returns how many were deleted.

        Raises:
            UnknownDocumentError: An id is not in the bank (nothing is deleted then).
        """
        self._alive()
        ids = list(dict.fromkeys([doc_ids] if isinstance(doc_ids, str) else doc_ids))
        for i in ids:
            if i not in self:
                raise UnknownDocumentError(f"unknown document id {i!r}: it is not in the bank at {self.path}")
        tomb = [i for i in ids if i in self._index]
        for i in ids:
            self._pending.pop(i, None)
        if tomb:
            self._deleted.update(tomb)
            self._write_manifest()
            self._build_index()
        return len(ids)

    def compact(self) -> None:
        """Rewrites this writer's shards without deleted/overwritten rows, then removes the old files."""
        self._alive()
        self.flush()
        own = {s["file"] for s in self._shards}
        live = [i for i, (f, _) in self._index.items() if f in own]
        new_shards: list[dict] = []
        for start in range(0, len(live), self.shard_size):
            ids = live[start:start + self.shard_size]
            file = self._write_shard(ids, {k: torch.stack([self._read_row(i, k) for i in ids]) for k in self.shapes})
            new_shards.append(dict(file=file, ids=ids))
        base_ids = {i for s in self._base_shards for i in s["ids"]}
        self._shards, self._deleted = new_shards, self._deleted & base_ids
        self._write_manifest()
        self._handles.clear()
        for f in own:
            (self.path / f).unlink(missing_ok=True)
        self._build_index()

    # ---------------------------------------------------------------- reading
    def _read_row(self, doc_id: str, key: str) -> torch.Tensor:
        """Row of ``key`` for ``doc_id`` in the storage dtype: (*shape)."""
        if doc_id in self._pending:
            return self._pending[doc_id][key]
        loc = self._index.get(doc_id)
        if loc is None:
            raise UnknownDocumentError(f"unknown document id {doc_id!r}: it is not in the bank at {self.path} "
                                       "(build it with `regrad build`, or check the retriever's corpus)")
        file, row = loc
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return handle.get_slice(key)[row]

    def get(self, doc_id: str) -> dict[str, torch.Tensor]:
        """One document's gradient as float32 tensors ``{key: (*shape)}``."""
        self._alive()
        return {k: self._read_row(doc_id, k).to(torch.float32, copy=True) for k in self.shapes}

    def sum(self, doc_ids: list[str]) -> dict[str, torch.Tensor]:
        """Float32 sum of the stored gradients (zeros for an empty list): ``{key: (*shape)}``."""
        self._alive()
        out = {k: torch.zeros(s, dtype=torch.float32) for k, s in self.shapes.items()}
        for doc_id in doc_ids:
            for k in self.shapes:
                out[k] += self._read_row(doc_id, k).to(torch.float32)
        return out

    def sum_batch(self, id_lists: list[list[str]]) -> dict[str, torch.Tensor]:
        """Per-row sums: each value is ``(B, *shape)``, row b = sum over ``id_lists[b]``."""
        self._alive()
        out = {k: torch.zeros((len(id_lists), *s), dtype=torch.float32) for k, s in self.shapes.items()}
        for b, ids in enumerate(id_lists):
            for k, v in self.sum(ids).items():
                out[k][b] = v
        return out

    # ---------------------------------------------------------------- merge / lifecycle
    @classmethod
    def merge(cls, path: str | os.PathLike) -> GradientBank:
        """Merges worker manifests ``manifest.w000.json``..``w{n-1}`` into ``manifest.json``.

        Idempotent: shards already in the main manifest are skipped. Worker manifests are
        removed after the main manifest is written.

        Raises:
            BankError: A worker manifest is missing, or an id was written by two workers.
            BankMismatchError: Workers (or the existing bank) have different bindings/layouts.
        """
        path = Path(path)
        found = cls._worker_manifests(path)
        if not found:
            return cls.open(path)
        metas = {w: _read_manifest(p) for w, p in found.items()}
        n = {int(m.get("num_workers", 0)) for m in metas.values()}
        if len(n) != 1:
            raise BankError(f"worker manifests in {path} disagree on num_workers ({sorted(n)}): rebuild consistently")
        (n_workers,) = n
        if max(metas) >= n_workers:
            raise BankError(f"{path} has a manifest for worker {max(metas)} but num_workers={n_workers}: "
                            "remove the stray manifest or rebuild with a consistent worker count")
        missing = [w for w in range(n_workers) if w not in metas]
        if missing:
            raise BankError(f"cannot merge {path}: worker(s) {missing} of {n_workers} have no manifest; "
                            f"run them (e.g. --worker {missing[0]} --num-workers {n_workers}) before merging")
        main = _read_manifest(path / _MAIN_MANIFEST) if (path / _MAIN_MANIFEST).exists() else None
        ref = main or metas[0]
        ref_shapes = _norm_shapes(ref["shapes"])
        for w, m in metas.items():
            try:
                cls._check_meta(m, path, ref["binding"], ref_shapes, ref["storage_dtype"])
            except BankMismatchError as exc:
                raise BankMismatchError(f"worker {w} differs from {'the bank' if main else 'worker 0'}: {exc}") from None
        done = {s["file"] for s in main["shards"]} if main else set()
        shards, deleted = list(main["shards"]) if main else [], set(main["deleted"]) if main else set()
        owner: dict[str, int] = {}
        live: set[str] = set()
        for w in range(n_workers):
            new = [s for s in metas[w]["shards"] if s["file"] not in done]
            rows = {i for s in new for i in s["ids"]}
            for i in rows:
                if i in owner:
                    raise BankError(f"document {i!r} was written by workers {owner[i]} and {w}: workers must build "
                                    "disjoint slices; delete it in one worker (then compact) and merge again")
                owner[i] = w
            shards += new
            deleted |= set(metas[w]["deleted"])
            live |= rows - set(metas[w]["deleted"])
        all_rows = {i for s in shards for i in s["ids"]}
        meta = dict(ref, shards=shards, deleted=sorted((deleted - live) & all_rows), worker=0, num_workers=1,
                    format_version=cls.FORMAT_VERSION, library_version=_library_version())
        atomic_write_json(path / _MAIN_MANIFEST, meta)
        for p in found.values():
            p.unlink()
        return cls.open(path)

    def close(self) -> None:
        """Flushes pending rows and releases file handles. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._handles.clear()
            self._closed = True

    def __enter__(self) -> GradientBank:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Flush even on exception: computed gradients are never thrown away.
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            logger.exception("could not flush the Gradient Bank at %s while handling another error", self.path)

    def __repr__(self) -> str:
        return (f"GradientBank({str(self.path)!r}, docs={len(self)}, keys={len(self.shapes)}, "
                f"dtype={self.storage_dtype}, worker={self._worker}/{self._num_workers})")
