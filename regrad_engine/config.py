"""Validated configuration for the CLI jobs (pydantic; unknown keys are rejected).

Config files are JSON; every field can be overridden by a CLI flag of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from regrad_engine.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scaling = lora_alpha / r).")
    target_modules: list[str] = Field(["gate_proj", "up_proj", "down_proj"], min_length=1,
                                      description="Names of the linear layers to adapt.")
    layers: list[int] | None = Field(None, description="Block indices to adapt (default: a fifth of the blocks, in the upper middle).")


class MetaTrainConfig(_Strict):
    """Stage 1: meta-learning of phi and alpha."""

    model: str | None = Field(None, description="Base model: HF id, local path or an embedded: alias; omit for the embedded default.")
    data: str = Field(..., description="Directory with corpus.jsonl + train.jsonl/dev.jsonl (see `regrad_engine.data`).")
    out: str = Field(..., description="Checkpoint directory to write (best/ and last/ inside).")
    init_from: str | None = Field(None, description="Continue from this meta checkpoint (domain transfer).")
    resume: bool = Field(True, description="Resume from out/last if it exists.")
    mode: Literal["parametric", "hybrid", "mixed"] = Field(
        "parametric", description="Passages out of (parametric) or in (hybrid) the prompt; mixed: half of each batch each way.")
    k: int = Field(3, ge=1, description="Passages per question (gold among distractors).")
    steps: int = Field(600, ge=1, description="Meta-steps (outer optimiser steps).")
    tasks_per_step: int = Field(4, ge=1, description="Questions per meta-step (meta-batch).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate for phi.")
    alpha_lr: float | None = Field(None, gt=0, description="Learning rate for alpha (default: lr).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    clip: float = Field(0.5, gt=0, description="Gradient-norm clipping.")
    alpha_mode: Literal["tie", "full", "same", "fix"] = Field("tie", description="Step-size granularity.")
    alpha_init: float = Field(1e-2, gt=0, description="Initial step size.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adaptation space.")
    doc_max_tokens: int = Field(200, ge=2, description="Tokens per passage for the inner gradient.")
    qa_max_length: int = Field(1536, ge=16, description="Max tokens of the outer QA sequence.")
    stop_after: int | None = Field(None, ge=1, description="End this run after this many steps (state saved; "
                                   "re-run the same command to resume from out/last).")
    eval_every: int = Field(50, ge=1, description="Dev evaluation (and save) every this many steps.")
    dev_size: int = Field(64, ge=1, description="Dev questions used per evaluation.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA devices that support it (CPU runs in the model's "
                       "dtype unless --cpu-bf16).")
    cpu_bf16: bool = Field(False, description="bf16 autocast for the meta-steps on CPU too: about 2x faster where the "
                           "CPU has native bf16 (AVX512-BF16 or AMX), slower where it has not; dev loss stays in the "
                           "model's dtype so it compares with fp32 runs.")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention the model is loaded with: sdpa (fused kernels; the differentiable inner "
        "pass switches to SDPA's math backend, which has a double backward) or eager.")
    gradient_checkpointing: bool = Field(False, description="Recompute decoder layers in backward instead of "
                                         "storing their activations (less memory, ~1 more forward; exact).")
    loss_chunk: int = Field(2048, ge=0, description="Labelled positions per chunk of the LM loss (no full "
                            "(batch, seq, vocab) logits); 0 computes full logits.")
    micro_batch: int | None = Field(None, ge=1, description="Tasks per forward/backward; a meta-step accumulates "
                                    "the gradient over its micro-batches (the same gradient, less memory). "
                                    "Default: the whole meta-batch at once.")
    device: str = Field("cpu", description="torch device.")
    seed: int = Field(0, description="Seed for initialisation and data order.")

    @model_validator(mode="after")
    def _check(self) -> MetaTrainConfig:
        if self.alpha_mode == "fix" and self.alpha_lr is not None:
            raise ValueError("alpha_lr: alpha_mode='fix' keeps alpha constant; drop alpha_lr (--alpha-lr)")
        return self


def _merge(into: dict, overrides: dict) -> None:
    """Flags over file values, nested sections field by field (``--lora-r`` keeps the file's ``lora.layers``)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_config(cls: type[BaseModel], path: str | None, overrides: dict) -> BaseModel:
    """Build a config from an optional JSON file plus non-None overrides (flags win)."""
    data: dict = {}
    if path:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid UTF-8 JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of config fields, not {type(data).__name__}")
    _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid configuration: {problems}") from err
