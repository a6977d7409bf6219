"""How a Gradient Bank stores one gradient: dense floats, or int8 with per-row scales,
optionally as a low-rank product (the bank's ``storage_dtype``).

Kinds (``parse_storage``):
    fp32, bf16, fp16   every value in that float type (the stored tensor is named like the key)
    int8               int8 values, one fp32 scale per row (absmax / 127); ~2x smaller than bf16
    int8-rank<q>       the best rank-q approximation (SVD) ``u.T @ v``, ``u`` (q, m) and ``v``
                       (q, n) in int8 with one fp32 scale per row; 32/q x smaller than bf16 for
                       a LoRA rank of 16 (q=7: 4.4x)

Legend: a key's tensor is viewed as a matrix (m, n) = (shape[0], prod(shape[1:])) (a 1-D
tensor as (1, n)). "Rows" for int8 scales run along the short side: a LoRA A gradient (r, in)
gets one scale per rank row, a LoRA B gradient (out, r) one per rank column, so scales cost
a few bytes per tensor. A key whose rank-q form would not be smaller than its int8 form is
stored as dense int8. Encoding works on batches ``(N, *shape)``; decoding sums entries,
O(k) in the number of entries and independent of the bank's size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StorageFormat", "parse_storage", "STORAGE_KINDS"]

FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
_RANK_RE = re.compile(r"^int8-rank([1-9][0-9]*)$")
STORAGE_KINDS = "fp32, bf16, fp16, int8, int8-rank<q> (e.g. int8-rank7)"
_QMAX = 127


def parse_storage(spec: str) -> StorageFormat:
    """The storage format a ``storage_dtype`` string names.

    Raises:
        ValueError: Not a string, or not one of :data:`STORAGE_KINDS` (the bank turns it into
            its ``InvalidInputError``).
    """
    if not isinstance(spec, str):
        raise ValueError(f"storage_dtype must be a string ({STORAGE_KINDS}), got {spec!r}")
    name = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if name in FLOAT_DTYPES or name == "int8":
        return StorageFormat(name)
    match = _RANK_RE.match(name)
    if match:
        return StorageFormat("int8", int(match.group(1)))
    raise ValueError(f"unknown storage_dtype {spec!r}: use one of {STORAGE_KINDS}")


def _matrix(shape: Sequence[int]) -> tuple[int, int]:
    """The (m, n) matrix a tensor of ``shape`` is stored as."""
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def quantize_rows(x: Tensor, rows_last: bool) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of a batch of matrices (N, m, n) with one fp32 scale per row.

    ``rows_last`` puts the rows along the last axis (one scale per row of m); otherwise the
    rows are the columns (one scale per column of n). Returns (int8 (N, m, n), scales (N, m
    or n)); an all-zero row gets scale 0.
    """
    dim = -1 if rows_last else -2
    scale = x.abs().amax(dim=dim) / _QMAX  # (N, m) or (N, n)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(dim)
    return (x / safe).round().clamp(-_QMAX, _QMAX).to(torch.int8), scale


def dequantize_rows(q: Tensor, scale: Tensor, rows_last: bool) -> Tensor:
    """Inverse of :func:`quantize_rows` (float32), for one matrix or a batch."""
    return q.to(torch.float32) * scale.unsqueeze(-1 if rows_last else -2)


@dataclass(frozen=True)
class StorageFormat:
    """One storage kind (see the module docstring): ``kind`` and, for int8, an optional ``rank``."""

    kind: str  # "fp32", "bf16", "fp16" or "int8"
    rank: int | None = None  # int8 only: store rank-`rank` factors instead of the full matrix

    @property
    def name(self) -> str:
        """The ``storage_dtype`` string (what the manifest and the CLI say)."""
        return self.kind if self.rank is None else f"{self.kind}-rank{self.rank}"

    @property
    def dense(self) -> bool:
        """Stored as plain floats (bytes as written by earlier versions of the bank)."""
        return self.kind in FLOAT_DTYPES

    def describe(self) -> dict:
        """The manifest's record of the format (kind and parameters)."""
        if self.dense:
            return {"kind": self.kind}
        return {"kind": self.kind, "values": "int8", "scales": "fp32", "scale_per": "row along the short side",
                "rank": self.rank}

    def low_rank(self, shape: Sequence[int]) -> bool:
        """Whether ``shape`` is stored as rank-q factors (smaller than dense int8)."""
        m, n = _matrix(shape)
        return self.rank is not None and self.rank * (m + n) < m * n

    def parts(self, key: str, shape: Sequence[int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored tensors of one key for one document: name -> (shape, dtype)."""
        if self.dense:
            return {key: (tuple(shape), FLOAT_DTYPES[self.kind])}
        m, n = _matrix(shape)
        if self.low_rank(shape):
            q = self.rank
            return {f"{key}::u": ((q, m), torch.int8), f"{key}::u_scale": ((q,), torch.float32),
                    f"{key}::v": ((q, n), torch.int8), f"{key}::v_scale": ((q,), torch.float32)}
        return {key: ((m, n), torch.int8), f"{key}::scale": ((min(m, n),), torch.float32)}

    def layout(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored tensor of a bank with these shapes.

        Raises:
            ValueError: A key's stored name collides with another key's.
        """
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for key, shape in shapes.items():
            for name, spec in self.parts(key, shape).items():
                if name in out or (name != key and name in shapes):
                    raise ValueError(f"key {name!r} collides with a stored part of another key in "
                                            f"{self.name} storage: rename the key or use bf16")
                out[name] = spec
        return out

    def nbytes(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Bytes one document takes (tensor data only)."""
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in self.layout(shapes).values())

    # ------------------------------------------------------------------ encode / decode
    def encode(self, key: str, values: Tensor) -> dict[str, Tensor]:
        """Stored parts of a batch of one key's gradients ``(N, *shape)`` (any float dtype)."""
        shape = tuple(values.shape[1:])
        if self.dense:
            return {key: values.detach().to(device="cpu", dtype=FLOAT_DTYPES[self.kind], copy=True)}
        m, n = _matrix(shape)
        x = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1, m, n)  # (N, m, n)
        if not self.low_rank(shape):
            q, scale = quantize_rows(x, rows_last=m <= n)
            return {key: q, f"{key}::scale": scale}
        u_full, s, vh = torch.linalg.svd(x, full_matrices=False)  # (N, m, p), (N, p), (N, p, n)
        root = s[:, :self.rank].sqrt()  # (N, q): split each singular value between the factors
        u = (u_full[:, :, :self.rank] * root.unsqueeze(1)).transpose(1, 2)  # (N, q, m)
        v = vh[:, :self.rank] * root.unsqueeze(2)  # (N, q, n)
        uq, us = quantize_rows(u.contiguous(), rows_last=True)
        vq, vs = quantize_rows(v.contiguous(), rows_last=True)
        return {f"{key}::u": uq, f"{key}::u_scale": us, f"{key}::v": vq, f"{key}::v_scale": vs}

    def decode_sum(self, shapes: Mapping[str, Sequence[int]], entries: Sequence[Mapping[str, Tensor]]
                   ) -> dict[str, Tensor]:
        """Float32 sum of stored entries ``{key: (*shape)}`` (zeros for none)."""
        out: dict[str, Tensor] = {}
        factored: dict[tuple[int, ...], list[str]] = {}  # shape -> its low-rank keys, multiplied together
        for key, shape in shapes.items():
            shape = tuple(shape)
            if not entries:
                out[key] = torch.zeros(shape, dtype=torch.float32)
            elif self.dense:
                total = entries[0][key].to(torch.float32, copy=True)
                for entry in entries[1:]:
                    total += entry[key].to(torch.float32)
                out[key] = total
            elif self.low_rank(shape):
                factored.setdefault(shape, []).append(key)
            else:
                m, n = _matrix(shape)
                total = dequantize_rows(entries[0][key], entries[0][f"{key}::scale"], m <= n)
                for entry in entries[1:]:
                    total += dequantize_rows(entry[key], entry[f"{key}::scale"], m <= n)
                out[key] = total.reshape(shape)
        for shape, keys in factored.items():  # sum of k products = one (m, k*q) @ (k*q, n) per key, batched
            u = torch.stack([torch.cat([dequantize_rows(e[f"{k}::u"], e[f"{k}::u_scale"], True) for e in entries])
                             for k in keys])  # (keys, k*q, m)
            v = torch.stack([torch.cat([dequantize_rows(e[f"{k}::v"], e[f"{k}::v_scale"], True) for e in entries])
                             for k in keys])  # (keys, k*q, n)
            for key, product in zip(keys, u.transpose(1, 2) @ v):
                out[key] = product.reshape(shape)
        return {key: out[key] for key in shapes}
