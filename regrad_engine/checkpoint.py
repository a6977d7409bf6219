"""Meta checkpoints: the meta-learned LoRA factors phi and step sizes alpha, as a directory.

Layout (fixed names):
    meta.safetensors   phi tensors under their keys, alpha under "alpha/<key>"
    manifest.json      format version, base model name + fingerprint, LoRA spec,
                       alpha mode, training mode, step, metrics, library version, and
                       whether documents began with the tokenizer's BOS token in training
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from regrad_engine.errors import CheckpointError
from regrad_engine.files import atomic_write, atomic_write_json
from regrad_engine.lora import Phi
from regrad_engine.prompts import bos_prefix

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ALPHA_PREFIX = "alpha/"
SHIPPED = Path(__file__).resolve().parent / "checkpoints"  # installed with the package


def shipped_checkpoint(name: str) -> Path:
    """A meta checkpoint that ships inside the package (``regrad_engine/checkpoints/NAME``),
    so it is there after ``pip install`` as well as in a source checkout.

    Raises:
        CheckpointError: No shipped checkpoint of that name.
    """
    path = SHIPPED / name
    if not (path / "manifest.json").is_file():
        names = sorted(p.name for p in SHIPPED.iterdir() if (p / "manifest.json").is_file()) if SHIPPED.is_dir() else []
        raise CheckpointError(f"no shipped meta checkpoint {name!r}; shipped: {', '.join(names) or 'none'}")
    return path


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regrad")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class MetaCheckpoint:
    """Meta-learned initialisation for one base model and adaptation space."""

    phi: Phi
    alpha: Phi
    alpha_mode: str
    lora: dict[str, Any]
    base_model: str
    base_fingerprint: str
    mode: str = "parametric"
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    # Whether the meta-training documents began with the tokenizer's BOS token (see
    # ``prompts.encode_documents``); None: not recorded (checkpoints from before regrad recorded it).
    document_bos: bool | None = None

    def fingerprint(self) -> str:
        """Hash of the exact phi and alpha values: what a Gradient Bank is bound to."""
        digest = hashlib.sha256()
        for name in sorted(self.phi):
            digest.update(name.encode())
            digest.update(self.phi[name].detach().float().cpu().contiguous().numpy().tobytes())
        for name in sorted(self.alpha):
            digest.update(name.encode())
            digest.update(self.alpha[name].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "regrad-meta-checkpoint",
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "lora": self.lora,
            "alpha_mode": self.alpha_mode,
            "mode": self.mode,
            "step": self.step,
            "metrics": self.metrics,
            "meta_fingerprint": self.fingerprint(),
            "library_version": library_version(),
        } | ({} if self.document_bos is None else {"document_bos": self.document_bos})

    def save(self, directory: str | Path) -> Path:
        """Write atomically (temp files + rename) so a crash never leaves half a checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.phi.items()}
        tensors.update({_ALPHA_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in self.alpha.items()})
        atomic_write(directory / "meta.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_json(directory / "manifest.json", self.manifest(), indent=2)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> MetaCheckpoint:
        """Read a checkpoint directory.

        Raises:
            CheckpointError: If the directory is not a regrad meta checkpoint.
        """
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists() or not (directory / "meta.safetensors").exists():
            raise CheckpointError(f"no meta checkpoint at {directory}: pass a checkpoint directory (--meta, or "
                                  "--init-from for `regrad train`): one holding manifest.json and meta.safetensors, "
                                  "e.g. the best/ folder `regrad train` writes")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {manifest_path} ({exc}): the checkpoint is damaged; "
                                  "copy it again or retrain") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != "regrad-meta-checkpoint":
            raise CheckpointError(f"{directory} is not a regrad meta checkpoint")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{directory} was written by a newer regrad; upgrade regrad")
        if manifest.get("document_bos") not in (None, True, False):
            raise CheckpointError(f"{manifest_path}: document_bos must be true or false, not "
                                  f"{manifest['document_bos']!r}; restore the file as training wrote it")
        tensors = load_file(directory / "meta.safetensors", device=str(device))
        phi = {k: v for k, v in tensors.items() if not k.startswith(_ALPHA_PREFIX)}
        alpha = {k[len(_ALPHA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_ALPHA_PREFIX)}
        return cls(phi=phi, alpha=alpha, alpha_mode=manifest["alpha_mode"], lora=manifest["lora"],
                   base_model=manifest["base_model"], base_fingerprint=manifest["base_fingerprint"],
                   mode=manifest.get("mode", "parametric"), step=manifest.get("step", 0),
                   metrics=manifest.get("metrics", {}), document_bos=manifest.get("document_bos"))

    def check_base(self, fingerprint: str, name: str = "", *, tokenizer=None) -> None:
        """Refuse to run on a base model other than the one this checkpoint was trained on, or
        (given its ``tokenizer``) with documents encoded otherwise than in its training."""
        if fingerprint != self.base_fingerprint:
            raise CheckpointError(
                f"this meta checkpoint was trained on base model {self.base_model!r} "
                f"(fingerprint {self.base_fingerprint}) but the loaded model {name!r} has fingerprint "
                f"{fingerprint}: load the matching model or train a checkpoint for this one")
        if tokenizer is None:
            return
        bos = bool(bos_prefix(tokenizer))
        if self.document_bos is not None and self.document_bos != bos:
            trained = "beginning" if self.document_bos else "not beginning"
            now = "with" if bos else "without"
            raise CheckpointError(
                f"this meta checkpoint was trained with documents {trained} with the BOS token, but documents "
                f"for {name or self.base_model!r} are now encoded {now} it (this regrad version or this "
                "tokenizer differs from training): its document gradients would not match. Use the tokenizer "
                "and regrad version it was trained with, or train a checkpoint with these")
        if self.document_bos is None and bos:
            log.warning("this meta checkpoint does not record whether its training documents began with the "
                        "BOS token (made before regrad recorded it); regrad begins documents with it for %r: "
                        "a checkpoint trained without it gives weaker gradients (retrain to be sure)",
                        name or self.base_model)


def to_device(tensors: dict[str, Tensor], device, dtype=None) -> dict[str, Tensor]:
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
