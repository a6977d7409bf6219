"""The row index of a Gradient Bank: which document each shard row holds, its checksum and
text hash, and the lookup of a document id over every shard.

Format 3 keeps a million entries quick to open. The manifest records per shard its rows,
size, ids (``row_ids``: one string, the ids joined by NUL, so parsing it creates one object,
not one per id) and ``index``, a checksum of the shard's row index, which the shard file
carries beside its gradient parts as three tensors::

    __regrad__/id_hashes  int64 (rows,)    a stable 64-bit hash of each id (blake2b)
    __regrad__/sums       int64 (rows, 2)  the 16-byte checksum of each entry's stored parts
    __regrad__/texts      int64 (rows, 2)  the 16-byte hash of the text it was computed from (zeros: none)

(int64, so that safetensors, which lays tensors out by element size, puts the index before
the gradient parts)
(``index`` covers the ids and these three, and is in the shard's header too, so swapped
files are caught by a string compare). :class:`IdLookup` finds an id by binary search over
the hashes; the ids of a shard are split out of ``row_ids`` the first time one is needed.
Shards of format 1 and 2 list ids, checksums and text hashes in the manifest
(:meth:`ShardIndex.from_record` reads both). No IO here beyond reading an open safetensors handle.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

INDEX_PREFIX = "__regrad__/"  # no gradient key may start with it
DIGEST = 16  # bytes of an entry checksum and of a text hash
NO_TEXT = bytes(DIGEST)  # the text hash of an entry stored without one
SEPARATOR = "\0"  # between the ids of ``row_ids`` (no id may contain it)
_FIELDS = ("id_hashes", "sums", "texts")


def id_hash(doc_id: str) -> int:
    """Stable (across processes) signed 64-bit hash of a document id."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _index_digest(joined_ids: str, arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=DIGEST)
    digest.update(joined_ids.encode("utf-8"))
    for field in _FIELDS:
        digest.update(field.encode())
        digest.update(np.ascontiguousarray(arrays[field]).view(np.uint8))
    return digest.hexdigest()


def _unhex(values: list | str | None, field: str) -> bytes | None:
    """Format 2 lists hex digests (None: no text hash); the first format-3 banks packed them
    as one hex string."""
    if values is None:
        return None
    try:
        if isinstance(values, str):
            return bytes.fromhex(values)
        return b"".join(NO_TEXT if v is None else bytes.fromhex(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"its '{field}' holds a value that is not a hex digest") from None


def record_problem(record: Any) -> str | None:
    """What is wrong with one shard record of a manifest, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return f"shard record {record!r} lacks file/ids"
    if "index" in record:  # format 3
        if not (isinstance(record["index"], str) and isinstance(record.get("row_ids"), str)
                and isinstance(record.get("rows"), int) and record["rows"] > 0):
            return f"shard record {str(record)[:200]} lacks file/ids (rows, row_ids and index)"
        if record["row_ids"].count(SEPARATOR) != record["rows"] - 1:
            return f"shard {record['file']}: 'row_ids' does not hold 'rows' ids"
        return None
    if not isinstance(record.get("ids"), list):
        return f"shard record {record!r} lacks file/ids"
    for field in ("sums", "texts"):
        value = record.get(field)
        if isinstance(value, str):
            fits = len(value) == 2 * DIGEST * len(record["ids"])
        else:
            fits = field not in record or isinstance(value, list) and len(value) == len(record["ids"])
        if not fits:
            return f"shard {record['file']}: '{field}' does not hold one value per id"
    return None


class ShardIndex:
    """The rows of one shard: ids, checksums and text hashes (``None`` where a bank too old
    recorded none). A format-3 shard reads its hashes, checksums and text hashes from its
    file (:meth:`load`)."""

    def __init__(self, file: str, ids: list[str] | None, rows: int, size: int | None, digest: str | None,
                 joined: str | None = None, sums: bytes | None = None, texts: bytes | None = None) -> None:
        self.file, self.rows, self.bytes, self.digest = file, rows, size, digest
        self.sums, self.texts = sums, texts
        self._ids, self._joined = ids, joined
        self._hashes: np.ndarray | None = None  # format 3: from the file (load); else computed when needed

    # ------------------------------------------------------------------ manifest records
    @classmethod
    def from_record(cls, record: dict) -> ShardIndex:
        """Raises ValueError for a checksum or text hash that is not hex."""
        if "index" in record:
            return cls(record["file"], None, record["rows"], record.get("bytes"), record["index"],
                       joined=record["row_ids"])
        ids = list(record["ids"])
        return cls(record["file"], ids, len(ids), record.get("bytes"), None, sums=_unhex(record.get("sums"), "sums"),
                   texts=_unhex(record.get("texts"), "texts"))

    def record(self) -> dict:
        if self.digest is not None:
            return {"file": self.file, "rows": self.rows, "bytes": self.bytes, "index": self.digest,
                    "row_ids": self._joined}
        out: dict[str, Any] = {"file": self.file, "ids": self._ids}  # an older shard keeps its old record
        if self.bytes is not None:
            out["bytes"] = self.bytes
        if self.sums is not None:
            out["sums"] = self.sums.hex()
        if self.texts is not None:
            out["texts"] = self.texts.hex()
        return out

    # ------------------------------------------------------------------ shard files
    @classmethod
    def build(cls, file: str, ids: list[str], sums: bytes, texts: Sequence[str | None]
              ) -> tuple[ShardIndex, dict[str, torch.Tensor]]:
        """A new format-3 shard's index and the tensors that store it (size set once written)."""
        joined = SEPARATOR.join(ids)
        arrays = {
            "id_hashes": np.array([id_hash(i) for i in ids], dtype=np.int64),
            "sums": np.frombuffer(sums, dtype=np.int64).reshape(len(ids), DIGEST // 8),
            "texts": np.frombuffer(b"".join(NO_TEXT if t is None else bytes.fromhex(t) for t in texts),
                                   dtype=np.int64).reshape(len(ids), DIGEST // 8),
        }
        shard = cls(file, None, len(ids), None, _index_digest(joined, arrays), joined=joined)
        shard._take(arrays)
        shard._ids = list(ids)
        return shard, {INDEX_PREFIX + k: torch.from_numpy(v.copy()) for k, v in arrays.items()}

    def load(self, handle: Any) -> str | None:
        """Read a format-3 shard's index from its open file and check it; what is wrong, or None."""
        if self.digest is None:
            return None  # format 1/2: the manifest had it all
        if (handle.metadata() or {}).get("regrad_index") != self.digest:
            return "holds other documents than the manifest lists (files swapped or overwritten)"
        try:
            arrays = {k: handle.get_tensor(INDEX_PREFIX + k).numpy() for k in _FIELDS}
        except Exception as exc:  # safetensors' own error types
            return f"has no readable row index ({exc})"
        if _index_digest(self._joined, arrays) != self.digest or len(arrays["id_hashes"]) != self.rows:
            return "has a row index that does not match its checksum (the file was changed on disk)"
        self._take(arrays)
        return None

    def _take(self, arrays: dict[str, np.ndarray]) -> None:
        self._hashes = arrays["id_hashes"]
        self.sums, self.texts = arrays["sums"].tobytes(), arrays["texts"].tobytes()

    # ------------------------------------------------------------------ rows
    @property
    def ids(self) -> list[str]:
        """Every row's id, in row order (known even when the shard file is damaged)."""
        if self._ids is None:
            self._ids = self._joined.split(SEPARATOR)
        return self._ids

    def id(self, row: int) -> str:
        return self.ids[row]

    @property
    def hashes(self) -> np.ndarray:
        """:func:`id_hash` of every row's id: (rows,) int64."""
        if self._hashes is None:
            self._hashes = np.fromiter((id_hash(i) for i in self.ids), dtype=np.int64, count=self.rows)
        return self._hashes

    def checksum(self, row: int) -> bytes | None:
        return None if self.sums is None else self.sums[row * DIGEST:(row + 1) * DIGEST]

    def text_hash(self, row: int) -> str | None:
        if self.texts is None:
            return None
        value = self.texts[row * DIGEST:(row + 1) * DIGEST]
        return None if value == NO_TEXT else value.hex()


class IdLookup:
    """Every row of a sequence of shards, found by id: a sorted array of id hashes. Rows are
    numbered in shard order; for an id held by several shards the last one is found (a later
    shard overwrites). Shards appended after a build go to a dict until the next build."""

    def __init__(self, shards: Sequence[ShardIndex]) -> None:
        self.shards: list[ShardIndex] = list(shards)
        self.starts: list[int] = []
        total = 0
        for shard in self.shards:
            self.starts.append(total)
            total += shard.rows
        self.total = total
        hashes = np.concatenate([s.hashes for s in self.shards]) if self.shards else np.empty(0, np.int64)
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in row order
        self._hashes, self._rows = hashes[order], order
        self._recent: dict[str, int] = {}

    def append(self, shard: ShardIndex) -> None:
        self.shards.append(shard)
        self.starts.append(self.total)
        self._recent.update(zip(shard.ids, range(self.total, self.total + shard.rows)))
        self.total += shard.rows

    @property
    def recent(self) -> int:
        """Rows appended since the build (kept in a dict)."""
        return len(self._recent)

    def find(self, doc_id: str) -> int | None:
        """The last row holding ``doc_id``, or None."""
        row = self._recent.get(doc_id)
        if row is not None:
            return row
        h = id_hash(doc_id)
        lo, hi = np.searchsorted(self._hashes, h, "left"), np.searchsorted(self._hashes, h, "right")
        for j in range(int(hi) - 1, int(lo) - 1, -1):  # more than one only for an overwritten id
            row = int(self._rows[j])
            shard, offset = self.locate(row)
            if shard.id(offset) == doc_id:
                return row
        return None

    def locate(self, row: int) -> tuple[ShardIndex, int]:
        j = bisect.bisect_right(self.starts, row) - 1
        return self.shards[j], row - self.starts[j]
