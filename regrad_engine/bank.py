"""Gradient Bank: on-disk store of per-document LoRA gradients, keyed by document id.

Every document (chunk) of the corpus gets one gradient of its LM loss w.r.t. the LoRA
factors ("phi"): a flat ``dict[str, Tensor]`` such as
``{"model.layers.20.mlp.gate_proj.lora_A": (r, in), "...lora_B": (out, r), ...}``.
All documents share exactly the same keys and shapes. At inference the gradients of
the top-k retrieved documents are fetched and summed (:meth:`GradientBank.sum`).

Layout of a bank directory::

    manifest.json                       # {format_version, binding, shapes, storage_dtype, storage,
                                        #  shards: [{file, rows, bytes, row_ids, index}], deleted: [...], ...}
    shard-m-<session>-000000.safetensors      # stacked parts (n_rows, ...) + the shard's row index
    shard-w001-<session>-000000.safetensors   # written by worker 1 of N (distributed builds)
    manifest.w001.json                  # only while worker 1 of N builds (before merge)
    .writer.lock, .writer.lock.json     # the single writer's lock and who holds it

Writes are append-only: pending rows are flushed as a new shard file (tmp + fsync +
os.replace) every ``shard_size`` documents or ``flush_seconds``, whichever comes first,
then the manifest is rewritten atomically: a killed build loses only the unflushed rows.
When a document id appears in several shards (overwrite), the latest shard wins;
:meth:`GradientBank.compact` drops the dead rows from disk.

Storage (``storage_dtype``, chosen at creation and recorded in the manifest with its
parameters): fp32, bf16, fp16, or compressed, int8 with per-row scales, optionally as rank-q
factors (``int8-rank7``); see :mod:`regrad_engine.compression`. An entry is stored as its
*parts* (for the float kinds, one tensor per key, named like the key); reads dequantise to
float32, and a sum of k entries costs O(k) whatever the bank's size.

Integrity: every entry has a checksum (blake2b over the stored bytes of every part) and the
hash of the text its gradient was computed from. Format 3 keeps them, with a hash of each id,
in the shard's row index (:mod:`regrad_engine.shard_index`); the manifest records each
shard's rows, size, ids and the index's checksum (also in the shard's header). Formats 1-2
listed everything in the manifest and are still read (a million entries then take seconds
to open; format 3 opens them in about 0.3 s and finds an id by binary search over the
hashes). Opening checks every shard's size, header and row index; reading checks the served
entries' checksums and that their stored floats are finite. A mismatch raises :class:`BankCorruptError` naming the file and the repair (``regrad
verify --repair``, then ``regrad build`` recomputes what was dropped); non-finite gradients
are refused at write time.

One writer: every writing bank object holds an exclusive lock (:class:`~regrad_engine.files.WriterLock`,
one per manifest, so distributed workers write side by side); a second writer gets
:class:`BankLockedError` naming the holder. Shard names carry a per-writer session token.
Reads are lazy and memory-mapped through ``safetensors.safe_open``; readers take no lock. A
bank object is not thread-safe.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regrad_engine.compression import StorageFormat, parse_storage
from regrad_engine.errors import (
    BankCorruptError,
    BankError,
    BankLockedError,
    BankMismatchError,
    InvalidInputError,
    UnknownDocumentError,
)
from regrad_engine.files import LockHeld, WriterLock, atomic_write, atomic_write_json, describe_holder
from regrad_engine.shard_index import DIGEST, INDEX_PREFIX, SEPARATOR, IdLookup, ShardIndex, record_problem

__all__ = [
    "BankCorruptError",
    "BankLockedError",
    "BankError",
    "BankMismatchError",
    "UnknownDocumentError",
    "InvalidInputError",
    "GradientBank",
    "VerifyReport",
    "entry_checksum",
    "text_hash",
]

logger = logging.getLogger(__name__)

_MAIN_MANIFEST = "manifest.json"
_REBUILD_ROWS = 65_536  # rows flushed since the lookup was built that trigger a rebuild (at least)
_WORKER_MANIFEST_RE = re.compile(r"^manifest\.w(\d{3})\.json$")


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("regrad")
    except Exception:  # not installed (source checkout)
        return "unknown"


def _norm_dtype(storage_dtype: str, shapes: dict | None = None) -> str:
    """The canonical ``storage_dtype`` name; with ``shapes``, also checks that its stored
    parts' names do not collide with the keys."""
    try:
        storage = parse_storage(storage_dtype)
        if shapes is not None:
            storage.layout(shapes)
    except ValueError as err:
        raise InvalidInputError(str(err)) from None
    return storage.name


def _norm_shapes(shapes: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, dict) or not shapes:
        raise InvalidInputError("shapes must be a non-empty dict {parameter name: shape tuple}")
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if not isinstance(key, str) or not key or key.startswith(INDEX_PREFIX):
            raise InvalidInputError(f"shape keys must be non-empty strings not starting with {INDEX_PREFIX!r}, "
                                    f"got {key!r}")
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
    if not doc_id or SEPARATOR in doc_id:
        raise InvalidInputError(f"document ids must be non-empty strings without NUL characters, got {doc_id!r}")
    return doc_id


def _binding_diff(stored: dict, given: dict) -> list[str]:
    missing = "<absent>"
    return [
        f"{k}: bank was built for {stored.get(k, missing)!r}, this run has {given.get(k, missing)!r}"
        for k in sorted(set(stored) | set(given))
        if stored.get(k, missing) != given.get(k, missing)
    ]


_REPAIR = "run `regrad verify --store <the store> --repair`, then `regrad build` again to recompute what it drops"


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BankError(f"cannot read bank manifest {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BankCorruptError(f"bank manifest {path} is not valid JSON ({exc}): the bank is damaged; "
                               "delete the bank directory and run `regrad build` again") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or version > GradientBank.FORMAT_VERSION:
        raise BankError(
            f"{path} has format_version {version!r}, this regrad reads <= {GradientBank.FORMAT_VERSION}: "
            "upgrade regrad or rebuild the bank"
        )
    problem = _manifest_problem(data)
    if problem:
        raise BankCorruptError(f"bank manifest {path} is damaged ({problem}): delete the bank directory and run "
                               "`regrad build` again")
    return data


def _manifest_problem(data: dict) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(data.get("binding"), dict):
        return "no 'binding'"
    if not isinstance(data.get("shapes"), dict) or not data["shapes"]:
        return "no 'shapes'"
    try:
        storage = parse_storage(data.get("storage_dtype"))
    except ValueError:
        return f"unknown storage_dtype {data.get('storage_dtype')!r}"
    if "storage" in data and data["storage"] != storage.describe():
        return f"its 'storage' record {data['storage']!r} does not match storage_dtype {storage.name!r}"
    if not isinstance(data.get("shards"), list) or not isinstance(data.get("deleted", []), list):
        return "no 'shards' list"
    for shard in data["shards"]:
        problem = record_problem(shard)
        if problem:
            return problem
    return None


def _shard_index(record: dict, path: Path) -> ShardIndex:
    try:
        return ShardIndex.from_record(record)
    except ValueError as err:
        raise BankCorruptError(f"bank manifest {path}: shard {record['file']} is damaged ({err}): delete the bank "
                               "directory and run `regrad build` again") from None


def _record_ids(path: Path, record: dict) -> list[str]:
    """The ids of one shard of a manifest, in row order."""
    return _shard_index(record, path).ids


def _digest(parts: dict[str, torch.Tensor]) -> bytes:
    digest = hashlib.blake2b(digest_size=DIGEST)
    for name in sorted(parts):
        digest.update(name.encode())
        digest.update(parts[name].detach().contiguous().view(torch.uint8).numpy())
    return digest.digest()


def _row_digests(parts: dict[str, torch.Tensor], rows: int) -> bytes:
    """:func:`_digest` of every row of stacked parts ``{part: (rows, ...)}``, concatenated."""
    names = sorted(parts)
    data = [(name.encode(), parts[name].detach().contiguous().view(torch.uint8).reshape(rows, -1).numpy())
            for name in names]
    out = []
    for row in range(rows):
        digest = hashlib.blake2b(digest_size=DIGEST)
        for name, values in data:
            digest.update(name)
            digest.update(values[row])
        out.append(digest.digest())
    return b"".join(out)


def entry_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum of one entry's stored bytes: every part (for the float kinds, one tensor per
    key), names in sorted order."""
    return _digest(tensors).hex()


def text_hash(text: str) -> str:
    """Hash of the text a gradient was computed from (content-aware rebuilds)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _check_text_hash(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and len(value) == 2 * DIGEST
                                  and all(c in "0123456789abcdef" for c in value)):
        raise InvalidInputError(f"text hashes must come from regrad_engine.bank.text_hash (32 hex digits), got {value!r}")
    return value


def _writer_lock(path: Path, worker: int | None) -> WriterLock:
    """The lock of the main manifest (``worker=None``) or of one build worker's manifest."""
    return WriterLock(path / (".writer.lock" if worker is None else f".writer.w{worker:03d}.lock"))


def _take(lock: WriterLock, path: Path) -> None:
    try:
        lock.acquire()
    except LockHeld as held:
        raise BankLockedError(f"the Gradient Bank at {path} is being written by {describe_holder(held.holder)}: "
                              "wait for that build to finish or stop it, then run again (a writer that died "
                              "leaves no lock behind)") from None
    except PermissionError:
        raise BankError(f"cannot write to the Gradient Bank at {path}: the directory is read-only for this user "
                        "(serving from it needs no write access; building does)") from None


class VerifyReport:
    """What :meth:`GradientBank.verify` found: damaged shards and entries, and what it repaired."""

    def __init__(self) -> None:
        self.entries_checked = 0
        self.damaged: dict[str, str] = {}  # document id -> what is wrong
        self.damaged_shards: dict[str, str] = {}  # shard file -> what is wrong
        self.stray_files: list[str] = []  # shard files no manifest lists (a write killed before its manifest)
        self.repaired = False

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.damaged_shards

    def __str__(self) -> str:
        lines = [f"{self.entries_checked} entries checked"]
        lines += [f"shard {f}: {why}" for f, why in sorted(self.damaged_shards.items())]
        lines += [f"stray file {f}: listed by no manifest" + (" (removed)" if self.repaired else "")
                  for f in self.stray_files]
        lines += [f"entry {i!r}: {why}" for i, why in sorted(self.damaged.items())[:20]]
        if len(self.damaged) > 20:
            lines.append(f"... and {len(self.damaged) - 20} more damaged entries")
        return "\n".join(lines)


class GradientBank:
    """Append-only, resumable store of per-document gradients (see module docstring).

    Attributes:
        path: Bank directory.
        binding: What the bank is bound to (base model fingerprint, meta checkpoint...).
        shapes: ``{key: shape}`` of every stored gradient.
        storage_dtype: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"`` or ``"int8-rank<q>"``.
    """

    # 2: per-shard size, entry checksums and text hashes; 3: compressed kinds (the manifest's
    # "storage" record), checksums and text hashes packed per shard. 1 and 2 are still read.
    FORMAT_VERSION = 3

    # ---------------------------------------------------------------- construction
    def __init__(self, path: Path, meta: dict, base: dict | None, worker: int, num_workers: int,
                 shard_size: int | None = None, flush_seconds: float = 30.0, strict: bool = True) -> None:
        """Internal: use :meth:`create`, :meth:`open`, :meth:`open_or_create` or :meth:`merge`."""
        self.path = path
        self._worker, self._num_workers = worker, num_workers
        self._binding = meta["binding"]
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in meta["shapes"].items()}
        self._format: StorageFormat = parse_storage(meta["storage_dtype"])
        self.storage_dtype: str = self._format.name
        self._layout = self._format.layout(self.shapes)  # stored part -> (shape, dtype) of one entry
        self.shard_size = int(shard_size or meta.get("shard_size", 64))
        self.flush_seconds = float(flush_seconds)
        # id -> (stored parts of its batch {part: (n, ...)}, its row there, text hash)
        self._pending: dict[str, tuple[dict[str, torch.Tensor], int, str | None]] = {}
        self._handles: dict[str, Any] = {}
        self._closed = False
        self._session = secrets.token_hex(4)  # shard names of this writer never collide with another's
        self._shard_prefix = "shard-m" if num_workers == 1 else f"shard-w{worker:03d}"
        self._next_seq = 0
        self._last_flush = time.monotonic()
        self._lock = _writer_lock(path, None if num_workers == 1 else worker)
        self._strict = strict
        self._lookup, self._base_rows, self._live_ids = IdLookup([]), 0, None
        self._load(meta, base)

    def _load(self, meta: dict, base: dict | None) -> None:
        """Take the shard lists of a manifest (and, in worker mode, of the merged base)."""
        self._on_disk = meta
        self._shards: list[ShardIndex] = [_shard_index(s, self.path) for s in meta["shards"]]
        self._deleted: set[str] = set(meta.get("deleted", []))
        # Worker mode: the merged main manifest (if any) is a read-only base layer.
        self._base_shards: list[ShardIndex] = [_shard_index(s, self.path) for s in base["shards"]] if base else []
        self._base_deleted: set[str] = set(base.get("deleted", [])) if base else set()
        self.damaged_shards: dict[str, str] = {}
        for shard in self._base_shards + self._shards:
            problem = self._shard_problem(shard)
            if problem and self._strict:
                raise BankCorruptError(f"shard {shard.file} of the Gradient Bank at {self.path} {problem}: {_REPAIR}")
            if problem:
                self.damaged_shards[shard.file] = problem
        self._build_index()

    def _shard_problem(self, shard: ShardIndex) -> str | None:
        """Checks of one shard file when opening: present, of the recorded size, holding the
        listed ids (format 3: its row index, read and checked here; no entry is read)."""
        file = self.path / shard.file
        try:
            size = file.stat().st_size
        except OSError:
            return "is missing"
        if shard.bytes is not None and size != shard.bytes:
            return f"has {size} bytes, the manifest recorded {shard.bytes} (truncated or replaced)"
        try:
            handle = safe_open(str(file), framework="pt")
            stored = None if shard.digest else json.loads((handle.metadata() or {}).get("regrad_ids", "null"))
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            return f"cannot be read ({exc})"
        problem = shard.load(handle) if shard.digest else None
        if problem or (shard.digest is None and stored != shard.ids):
            return problem or "holds other documents than the manifest lists (files swapped or overwritten)"
        self._handles[shard.file] = handle
        return None

    @staticmethod
    def _manifest_name(worker: int, num_workers: int) -> str:
        if not (isinstance(num_workers, int) and num_workers >= 1 and isinstance(worker, int)
                and 0 <= worker < num_workers):
            raise InvalidInputError(f"need 0 <= worker < num_workers, got worker={worker!r}, num_workers={num_workers!r}")
        return _MAIN_MANIFEST if num_workers == 1 else f"manifest.w{worker:03d}.json"

    @classmethod
    def create(cls, path: str | os.PathLike, *, binding: dict, shapes: dict[str, tuple[int, ...]],
               storage_dtype: str = "bf16", shard_size: int = 64, worker: int = 0,
               num_workers: int = 1) -> GradientBank:
        """Creates an empty bank (or this worker's part of one) at ``path`` and takes its writer lock.

        Raises:
            BankError: A bank (or this worker's manifest) already exists there.
            BankLockedError: Another writer holds the bank.
            BankMismatchError: Worker mode and the merged bank there has another binding/layout.
        """
        path = Path(path)
        name = cls._manifest_name(worker, num_workers)
        if path.exists() and not path.is_dir():
            raise BankError(f"{path} is a file: a Gradient Bank is a directory")
        binding, shapes = _norm_binding(binding), _norm_shapes(shapes)
        dtype = _norm_dtype(storage_dtype, shapes)
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
                    shapes={k: list(v) for k, v in shapes.items()}, storage_dtype=dtype,
                    storage=parse_storage(dtype).describe(), shard_size=shard_size, worker=worker,
                    num_workers=num_workers, shards=[], deleted=[], library_version=_library_version())
        lock = _writer_lock(path, None if num_workers == 1 else worker)
        _take(lock, path)
        try:
            if (path / name).exists():  # another writer created it while we were getting here
                raise BankError(f"a Gradient Bank already exists at {path}: use GradientBank.open_or_create")
            atomic_write_json(path / name, meta)
            bank = cls(path, meta, base, worker, num_workers)
        except BaseException:
            lock.release()
            raise
        bank._lock = lock
        return bank

    @classmethod
    def open(cls, path: str | os.PathLike, *, binding: dict | None = None, worker: int = 0,
             num_workers: int = 1, strict: bool = True) -> GradientBank:
        """Opens an existing bank for reading (its first write takes the writer lock); checks
        ``binding`` against the stored one when given, and every shard's size and ids.

        Raises:
            BankError: No bank at ``path`` (or its worker manifests are not merged yet).
            BankMismatchError: ``binding`` differs from the stored one.
            BankCorruptError: The manifest or a shard file is damaged (with ``strict=False`` the
                damaged shards' documents are left out instead, see ``damaged_shards``).
        """
        return cls._open(Path(path), binding, None, None, worker, num_workers, None, strict=strict)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, *, binding: dict, shapes: dict[str, tuple[int, ...]],
                       storage_dtype: str = "bf16", shard_size: int = 64, worker: int = 0,
                       num_workers: int = 1) -> GradientBank:
        """Opens the bank at ``path`` (checking binding, shapes and storage dtype) or creates it,
        and takes its writer lock (a second writer gets :class:`BankLockedError`)."""
        path = Path(path)
        if (path / cls._manifest_name(worker, num_workers)).exists():
            bank = cls._open(path, binding, _norm_shapes(shapes), _norm_dtype(storage_dtype), worker,
                             num_workers, shard_size)
            bank.begin_writing()
            return bank
        return cls.create(path, binding=binding, shapes=shapes, storage_dtype=storage_dtype,
                          shard_size=shard_size, worker=worker, num_workers=num_workers)

    @classmethod
    def _open(cls, path: Path, binding: dict | None, shapes: dict | None, dtype: str | None, worker: int,
              num_workers: int, shard_size: int | None, strict: bool = True) -> GradientBank:
        name = cls._manifest_name(worker, num_workers)
        if path.exists() and not path.is_dir():
            raise BankError(f"{path} is a file: a Gradient Bank is a directory")
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
        return cls(path, meta, base, worker, num_workers, shard_size, strict=strict)

    # ---------------------------------------------------------------- the writer lock
    def begin_writing(self) -> None:
        """Take the writer lock now (every write does so itself; call it to hold the bank while
        writing what belongs with it, e.g. its index). Before the first write; if another writer changed the manifest
        since this object read it, continue from what is on disk now."""
        if self._lock.held:
            return
        _take(self._lock, self.path)
        name = self._manifest_name(self._worker, self._num_workers)
        for torn in [*self.path.glob(f"{self._shard_prefix}-*.tmp"), self.path / f"{name}.tmp"]:
            torn.unlink(missing_ok=True)  # left by a writer killed mid-write (we hold its lock now)
        current = _read_manifest(self.path / name)
        if current != self._on_disk:
            base = (_read_manifest(self.path / _MAIN_MANIFEST)
                    if self._num_workers > 1 and (self.path / _MAIN_MANIFEST).exists() else None)
            self._load(current, base)

    @staticmethod
    def _check_meta(meta: dict, path: Path, binding: dict | None, shapes: dict | None, dtype: str | None) -> None:
        problems = _binding_diff(meta["binding"], binding) if binding is not None else []
        if shapes is not None and _norm_shapes(meta["shapes"]) != shapes:
            stored = _norm_shapes(meta["shapes"])
            bad = sorted(k for k in set(stored) | set(shapes) if stored.get(k) != shapes.get(k))
            problems += [f"shape of {k}: bank has {stored.get(k)}, this run has {shapes.get(k)}" for k in bad[:5]]
        if dtype is not None and _norm_dtype(meta["storage_dtype"]) != dtype:
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
        """The lookup over every readable shard, base shards first (a later shard overwrites);
        what is alive then follows from the deleted sets (:meth:`_position`)."""
        readable = [s for s in self._base_shards + self._shards if s.file not in self.damaged_shards]
        self._lookup = IdLookup(readable)
        self._base_rows = sum(s.rows for s in self._base_shards if s.file not in self.damaged_shards)
        self._live_ids: dict[str, int] | None = None

    def _append_to_index(self, shard: ShardIndex) -> None:
        """A newly written shard (the newest: it overwrites); the full lookup is rebuilt once the
        shards appended since the last build hold many rows."""
        self._lookup.append(shard)
        self._live_ids = None
        if self._lookup.recent > max(_REBUILD_ROWS, self._lookup.total // 8):
            self._build_index()

    def _position(self, doc_id: str) -> int | None:
        """Row (over all shards) of a flushed, live id, or None."""
        if doc_id in self._deleted:
            return None
        row = self._lookup.find(doc_id)
        if row is None or (row < self._base_rows and doc_id in self._base_deleted):
            return None
        return row

    def _locate(self, doc_id: str) -> tuple[ShardIndex, int] | None:
        """(shard, row) of a flushed, live id, or None."""
        row = self._position(doc_id)
        return None if row is None else self._lookup.locate(row)

    def _live(self) -> dict[str, int]:
        """Every flushed, live id -> its row, in the order ids first appeared (O(bank), built when
        asked: for len, ids, compact and verify, never to serve a request)."""
        if self._live_ids is None:
            live: dict[str, int] = {}
            for shard, start in zip(self._lookup.shards, self._lookup.starts):
                if start == self._base_rows:
                    for i in self._base_deleted:
                        live.pop(i, None)
                live.update(zip(shard.ids, range(start, start + shard.rows)))
            if self._lookup.total == self._base_rows:
                for i in self._base_deleted:
                    live.pop(i, None)
            for i in self._deleted:
                live.pop(i, None)
            self._live_ids = live
        return self._live_ids

    def _meta(self) -> dict:
        return dict(format_version=self.FORMAT_VERSION, binding=self._binding,
                    shapes={k: list(v) for k, v in self.shapes.items()}, storage_dtype=self.storage_dtype,
                    storage=self._format.describe(), shard_size=self.shard_size, worker=self._worker,
                    num_workers=self._num_workers, shards=[s.record() for s in self._shards],
                    deleted=sorted(self._deleted), library_version=_library_version())

    def _write_manifest(self) -> None:
        meta = self._meta()  # JSON types only: equal to what reading the file back gives
        atomic_write_json(self.path / self._manifest_name(self._worker, self._num_workers), meta)
        self._on_disk = meta

    def _alive(self) -> None:
        if self._closed:
            raise BankError(f"the Gradient Bank at {self.path} is closed: open it again")

    def __len__(self) -> int:
        live = self._live()
        return len(live) + sum(1 for i in self._pending if i not in live)

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and (doc_id in self._pending or self._position(doc_id) is not None)

    def ids(self) -> list[str]:
        """All stored (flushed or pending) document ids, sorted."""
        return sorted(self._live().keys() | self._pending.keys())

    def text_hash(self, doc_id: str) -> str | None:
        """Hash of the text the stored gradient was computed from (None if not recorded)."""
        if doc_id in self._pending:
            return self._pending[doc_id][2]
        loc = self._locate(doc_id)
        return None if loc is None else loc[0].text_hash(loc[1])

    def nbytes_per_document(self) -> int:
        """Bytes one document's gradient takes on disk (stored parts, tensor data only)."""
        return self._format.nbytes(self.shapes)

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

    def _encode(self, grads: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """Stored parts ``{part: (batch, ...)}`` of validated gradients; refuses values that are
        not finite once stored (e.g. 1e6 in fp16), so nothing non-finite is ever written."""
        parts: dict[str, torch.Tensor] = {}
        for key in self.shapes:
            t = grads[key].reshape(batch, *self.shapes[key])
            encoded = self._format.encode(key, t)
            if not (bool(torch.isfinite(t).all()) and all(bool(torch.isfinite(v).all()) for v in encoded.values()
                                                          if v.is_floating_point())):
                raise BankError(f"gradient {key!r} contains NaN/Inf (in {self.storage_dtype}): it is not stored; "
                                "check the model and the document")
            parts.update(encoded)
        return parts

    def _put(self, doc_id: str, batch: dict[str, torch.Tensor], row: int, text: str | None) -> None:
        self._pending.pop(doc_id, None)  # a re-added id moves to the end
        self._pending[doc_id] = (batch, row, text)

    def _pending_parts(self, ids: list[str]) -> dict[str, torch.Tensor]:
        """Stored parts ``{part: (len(ids), ...)}`` of pending ids, gathered batch by batch."""
        runs: list[tuple[dict[str, torch.Tensor], list[int]]] = []  # consecutive rows of one batch
        for i in ids:
            batch, row, _ = self._pending[i]
            if runs and runs[-1][0] is batch:
                runs[-1][1].append(row)
            else:
                runs.append((batch, [row]))
        return {name: torch.cat([batch[name][torch.tensor(rows)] for batch, rows in runs]) for name in self._layout}

    def _flush_if_due(self) -> None:
        if len(self._pending) >= self.shard_size or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def add(self, doc_id: str, grad: dict[str, torch.Tensor], *, overwrite: bool = False,
            text_hash: str | None = None) -> None:
        """Adds (or with ``overwrite=True`` replaces) one document's gradient.

        Args:
            doc_id: Non-empty document id.
            grad: ``{key: (*shape)}`` with exactly the bank's keys and shapes.
            overwrite: Replace an existing entry instead of raising.
            text_hash: :func:`text_hash` of the text the gradient was computed from.

        Raises:
            BankError: Bad keys/shapes, non-finite values, or duplicate id without ``overwrite``.
        """
        self._alive()
        _check_id(doc_id)
        _check_text_hash(text_hash)
        self._validate(grad, None)
        parts = self._encode(grad, 1)
        self.begin_writing()
        if not overwrite and doc_id in self:
            raise BankError(f"document {doc_id!r} is already in the bank: pass overwrite=True to replace it")
        self._put(doc_id, parts, 0, text_hash)
        self._flush_if_due()

    def add_batch(self, doc_ids: list[str], grads: dict[str, torch.Tensor], *, overwrite: bool = False,
                  text_hashes: list[str] | None = None) -> None:
        """Adds N documents at once; each ``grads`` value is ``(N, *shape)``. All-or-nothing
        validation; a due flush happens after the whole batch (so shards hold whole batches)."""
        self._alive()
        doc_ids = [_check_id(i) for i in doc_ids]
        if len(set(doc_ids)) != len(doc_ids):
            raise BankError("add_batch got the same document id twice in one batch")
        if text_hashes is not None and len(text_hashes) != len(doc_ids):
            raise InvalidInputError(f"got {len(text_hashes)} text hashes for {len(doc_ids)} documents")
        for value in text_hashes or []:
            _check_text_hash(value)
        self._validate(grads, len(doc_ids))
        parts = self._encode(grads, len(doc_ids))
        self.begin_writing()
        if not overwrite and (dup := [i for i in doc_ids if i in self]):
            raise BankError(f"document {dup[0]!r} is already in the bank: pass overwrite=True to replace it")
        for n, doc_id in enumerate(doc_ids):
            self._put(doc_id, parts, n, text_hashes[n] if text_hashes else None)
        self._flush_if_due()

    def flush(self) -> None:
        """Writes pending rows as a new shard (atomic), then the manifest (atomic)."""
        self._last_flush = time.monotonic()
        if self._closed or not self._pending:
            return
        self.begin_writing()
        ids = list(self._pending)
        shard = self._write_shard(ids, self._pending_parts(ids), [self._pending[i][2] for i in ids])
        self._shards.append(shard)
        self._deleted.difference_update(ids)  # re-added after a delete: alive again
        self._write_manifest()
        self._pending.clear()
        self._append_to_index(shard)  # the newest shard wins: no full rebuild per flush

    def _write_shard(self, ids: list[str], parts: dict[str, torch.Tensor], texts: list[str | None]) -> ShardIndex:
        """Write stored parts ``{part: (n, ...)}`` of ``ids`` and their row index as this
        writer's next shard file (atomic)."""
        file = f"{self._shard_prefix}-{self._session}-{self._next_seq:06d}.safetensors"
        self._next_seq += 1
        shard, index = ShardIndex.build(file, ids, _row_digests(parts, len(ids)), texts)
        metadata = {"regrad_index": shard.digest, "regrad_format_version": str(self.FORMAT_VERSION)}
        atomic_write(self.path / file, lambda tmp: save_file({**parts, **index}, str(tmp), metadata=metadata))
        shard.bytes = (self.path / file).stat().st_size
        return shard

    def delete(self, doc_ids: str | Iterable[str]) -> int:
        """Deletes documents (tombstones; :meth:`compact` removes their bytes). Returns how many were deleted.

        Raises:
            UnknownDocumentError: An id is not in the bank (nothing is deleted then).
        """
        self._alive()
        ids = list(dict.fromkeys([doc_ids] if isinstance(doc_ids, str) else doc_ids))
        self.begin_writing()
        for i in ids:
            if i not in self:
                raise UnknownDocumentError(f"unknown document id {i!r}: it is not in the bank at {self.path}")
        tomb = [i for i in ids if self._position(i) is not None]
        for i in ids:
            self._pending.pop(i, None)
        if tomb:
            self._deleted.update(tomb)
            self._write_manifest()
            self._live_ids = None
        return len(ids)

    def compact(self) -> int:
        """Rewrites this writer's shards without deleted/overwritten/damaged rows, then removes
        the old files; returns the bytes freed."""
        self._alive()
        if self._num_workers == 1 and self._worker_manifests(self.path):
            raise BankError(f"the Gradient Bank at {self.path} has unmerged worker manifests that share its shard "
                            "files: run `regrad merge --store <the store above it>` before compacting")
        self.flush()
        self.begin_writing()
        own = {s.file for s in self._shards}
        before = sum((self.path / f).stat().st_size for f in own if (self.path / f).is_file())
        live = [i for i, row in self._live().items() if self._lookup.locate(row)[0].file in own]
        new_shards: list[ShardIndex] = []
        for start in range(0, len(live), self.shard_size):
            ids = live[start:start + self.shard_size]
            entries = [self._read_entry(i) for i in ids]  # stored bytes, copied as they are
            new_shards.append(self._write_shard(ids, {name: torch.stack([e[name] for e in entries])
                                                      for name in self._layout}, [self.text_hash(i) for i in ids]))
        base_ids = {i for s in self._base_shards for i in s.ids}
        self._shards, self._deleted = new_shards, self._deleted & base_ids
        self._write_manifest()
        self._handles = {f: h for f, h in self._handles.items() if f not in own}
        self.damaged_shards = {f: why for f, why in self.damaged_shards.items() if f not in own}
        for f in own:
            (self.path / f).unlink(missing_ok=True)
        self._build_index()
        return before - sum(s.bytes for s in new_shards)

    # ---------------------------------------------------------------- reading
    def _read_entry(self, doc_id: str) -> dict[str, torch.Tensor]:
        """One document's stored parts as stored ``{part: ...}``, checksum- and value-checked."""
        entry, problem = self._load_entry(doc_id)
        if problem:
            raise BankCorruptError(f"{problem}: {_REPAIR}")
        return entry

    def _load_entry(self, doc_id: str) -> tuple[dict[str, torch.Tensor], str | None]:
        """(entry, None), or (partial entry, what is wrong with it) for a damaged one."""
        if doc_id in self._pending:
            batch, row, _ = self._pending[doc_id]
            return {name: v[row] for name, v in batch.items()}, None
        loc = self._locate(doc_id)
        if loc is None:
            raise UnknownDocumentError(f"unknown document id {doc_id!r}: it is not in the bank at {self.path} "
                                       "(build it with `regrad build`, or check the retriever's corpus)")
        shard, row = loc
        handle = self._handles.get(shard.file)
        if handle is None:
            handle = self._handles[shard.file] = safe_open(str(self.path / shard.file), framework="pt")
        try:
            entry = {name: handle.get_slice(name)[row] for name in self._layout}
        except Exception as exc:  # a damaged file: safetensors' own error types
            return {}, f"cannot read the gradient of {doc_id!r} from {self.path / shard.file} ({exc})"
        expected = shard.checksum(row)
        if expected is not None and _digest(entry) != expected:
            return entry, (f"the gradient of {doc_id!r} in {self.path / shard.file} does not match its checksum "
                           "(the file was changed on disk)")
        if not all(bool(torch.isfinite(t).all()) for t in entry.values() if t.is_floating_point()):
            return entry, f"the gradient of {doc_id!r} in {self.path / shard.file} holds NaN/Inf"
        return entry, None

    def get(self, doc_id: str) -> dict[str, torch.Tensor]:
        """One document's gradient as float32 tensors ``{key: (*shape)}`` (dequantised)."""
        self._alive()
        return self._format.decode_sum(self.shapes, [self._read_entry(doc_id)])

    def sum(self, doc_ids: list[str]) -> dict[str, torch.Tensor]:
        """Float32 sum of the stored gradients (zeros for an empty list): ``{key: (*shape)}``.
        Reads and dequantises only these entries: O(len(doc_ids)), whatever the bank's size.

        Raises:
            UnknownDocumentError: An id is not in the bank.
            BankCorruptError: A stored entry is damaged (it is never served).
        """
        self._alive()
        return self._format.decode_sum(self.shapes, [self._read_entry(i) for i in doc_ids])

    def sum_batch(self, id_lists: list[list[str]]) -> dict[str, torch.Tensor]:
        """Per-row sums: each value is ``(B, *shape)``, row b = sum over ``id_lists[b]`` (an id
        in several rows is read once)."""
        self._alive()
        out = {k: torch.zeros((len(id_lists), *s), dtype=torch.float32) for k, s in self.shapes.items()}
        read: dict[str, dict[str, torch.Tensor]] = {}
        for b, ids in enumerate(id_lists):
            entries = [read[i] if i in read else read.setdefault(i, self._read_entry(i)) for i in ids]
            for k, v in self._format.decode_sum(self.shapes, entries).items():
                out[k][b] = v
        return out

    # ---------------------------------------------------------------- verification
    @classmethod
    def verify(cls, path: str | os.PathLike, *, repair: bool = False) -> VerifyReport:
        """Check every shard and every live entry (checksums, finite values).

        With ``repair``, damaged entries and unreadable shards leave the manifest (their
        documents are then missing, and the next ``regrad build`` recomputes them) and the
        bank is compacted, so what remains verifies.

        Raises:
            BankCorruptError: The manifest itself is damaged (nothing to repair from).
        """
        bank = cls._open(Path(path), None, None, None, 0, 1, None, strict=False)
        try:
            report = VerifyReport()
            report.damaged_shards = dict(bank.damaged_shards)
            lost = {i for s in bank._shards if s.file in report.damaged_shards for i in s.ids}
            for doc_id in list(bank._live()):
                report.entries_checked += 1
                problem = bank._load_entry(doc_id)[1]
                if problem:
                    report.damaged[doc_id] = problem
            listed = {s.file for s in bank._base_shards + bank._shards}
            if not bank._worker_manifests(bank.path):  # every shard file belongs to this manifest
                report.stray_files = sorted(p.name for p in bank.path.glob("shard-*.safetensors") if p.name not in listed)
            if repair and (not report.ok or report.stray_files):
                bank.begin_writing()
                bank._shards = [s for s in bank._shards if s.file not in report.damaged_shards]
                # every id of a dropped shard is gone (an older copy elsewhere must not come back)
                bank._deleted.update(lost | set(report.damaged))
                report.damaged.update({i: "in a dropped shard" for i in lost if i not in report.damaged})
                bank._write_manifest()
                bank._build_index()
                bank.compact()
                for name in [*report.damaged_shards, *report.stray_files]:
                    (bank.path / name).unlink(missing_ok=True)
                report.repaired = True
        finally:
            bank.close()
        return report

    @classmethod
    def shard_contents(cls, path: str | os.PathLike, *, worker: int = 0, num_workers: int = 1) -> dict[str, list[str]]:
        """Shard file -> the ids of its rows, for every shard a manifest lists (rows of deleted or
        overwritten documents included): what is on disk, for checks and tools.

        Raises:
            BankError: No such manifest. BankCorruptError: It is damaged.
        """
        path = Path(path)
        meta = _read_manifest(path / cls._manifest_name(worker, num_workers))
        return {s["file"]: _record_ids(path, s) for s in meta["shards"]}

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
        locks = [_writer_lock(path, None)] + [_writer_lock(path, w) for w in sorted(found)]
        try:
            for lock in locks:  # the bank's writer and every worker must be done
                _take(lock, path)
            cls._merge_manifests(path, found)
        finally:
            for lock in locks:
                lock.release()
        return cls.open(path)

    @classmethod
    def _merge_manifests(cls, path: Path, found: dict[int, Path]) -> None:
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
        ids = {s["file"]: _record_ids(path, s) for m in [*metas.values(), main or {"shards": []}] for s in m["shards"]}
        for w in range(n_workers):
            new = [s for s in metas[w]["shards"] if s["file"] not in done]
            rows = {i for s in new for i in ids[s["file"]]}
            for i in rows:
                if i in owner:
                    raise BankError(f"document {i!r} was written by workers {owner[i]} and {w}: workers must build "
                                    "disjoint slices; delete it in one worker (then compact) and merge again")
                owner[i] = w
            shards += new
            deleted |= set(metas[w]["deleted"])
            live |= rows - set(metas[w]["deleted"])
        all_rows = {i for s in shards for i in ids[s["file"]]}
        meta = dict(ref, shards=shards, deleted=sorted((deleted - live) & all_rows), worker=0, num_workers=1,
                    storage=parse_storage(ref["storage_dtype"]).describe(), format_version=cls.FORMAT_VERSION,
                    library_version=_library_version())
        atomic_write_json(path / _MAIN_MANIFEST, meta)
        for p in found.values():
            p.unlink()

    def done_writing(self) -> None:
        """Flush and give the writer lock back (the object stays open for reading; its next
        write takes the lock again). For long-lived readers that write now and then."""
        self.flush()
        self._lock.release()

    def close(self) -> None:
        """Flushes pending rows and releases file handles. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._handles.clear()
            self._closed = True
            self._lock.release()

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
