"""The adaptation space: LoRA factors run as per-request inputs, never written into the model.

Legend (shapes in comments):
    b: batch of samples (documents, tasks or requests), each with its own factors
    t: sequence length, r: LoRA rank, i: in_features, o: out_features

A ``phi`` is a flat ``dict[str, Tensor]`` with two entries per adapted linear layer:
``"<module>.lora_A"`` (r, i) and ``"<module>.lora_B"`` (o, r); a *batched* phi has a
leading batch dimension on every tensor: (b, r, i) and (b, o, r). Gradients and the
Gradient Bank use exactly the same keys.

``LoraSpace`` installs forward hooks on the target ``nn.Linear`` modules once. A hook adds
``scaling * (x @ A^T) @ B^T`` to the layer output only while ``LoraSpace.activate(phi)`` is
in force in the *current context* (a ``ContextVar``), so concurrent requests in other
threads or asyncio tasks never see each other's factors and no shared parameter is ever
mutated. Threads started by a request (e.g. streaming generation) must run inside
``contextvars.copy_context()`` to inherit the active factors; code that runs the model again
later, elsewhere (activation checkpointing recomputes layers in backward, on CUDA in autograd's
own threads), wraps it with :func:`bind_active_factors`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import Tensor, nn

Phi = dict[str, Tensor]
AlphaMode = Literal["tie", "full", "same", "fix"]
ALPHA_MODES: tuple[str, ...] = ("tie", "full", "same", "fix")
_SHARED_ALPHA_KEY = "*"
_F = TypeVar("_F", bound=Callable[..., Any])

# (space, factors) active in this context, or None: read by every installed hook.
_ACTIVE: ContextVar[tuple[LoraSpace, Mapping[str, Tensor]] | None] = ContextVar(
    "regrad_active_lora", default=None
)


def default_lora_config(num_layers: int, *, r: int = 16, lora_alpha: int = 32, num_adapted: int | None = None) -> LoraConfig:
    """The default adaptation space: MLP gate/up/down of a block of upper-middle layers.

    The paper adapts the upper half of the layers; on CPU we adapt a block of a fifth of
    the layers ending about a seventh below the top (layers 20-25 of SmolLM2-135M's 30),
    which keeps the double backward of meta-learning short (a meta-step costs about half
    of what 8 layers from layer 18 cost) while staying in the upper-middle block.

    Args:
        num_layers: Number of transformer blocks of the base model.
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scaling = lora_alpha / r).
        num_adapted: How many layers to adapt (default: a fifth, at least 1).

    Returns:
        A peft ``LoraConfig`` with ``layers_to_transform`` set.
    """
    count = num_adapted or max(1, num_layers // 5)
    end = max(count, num_layers - max(1, num_layers // 7))
    layers = list(range(end - count, end))
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        layers_to_transform=layers,
        layers_pattern="layers",
        lora_dropout=0.0,
    )


def lora_config_to_dict(config: LoraConfig) -> dict[str, Any]:
    """The parts of a ``LoraConfig`` that define the adaptation space (for manifests)."""
    targets = config.target_modules
    layers = config.layers_to_transform
    return {
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "layers_to_transform": list(layers) if isinstance(layers, (list, tuple, range)) else layers,
        "layers_pattern": config.layers_pattern,
    }


def lora_config_from_dict(spec: Mapping[str, Any]) -> LoraConfig:
    """Inverse of :func:`lora_config_to_dict`."""
    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        target_modules=spec["target_modules"],
        layers_to_transform=spec["layers_to_transform"],
        layers_pattern=spec["layers_pattern"],
        lora_dropout=0.0,
    )


class LoraSpace:
    """LoRA factors for the target linear layers of a model, applied through hooks.

    Args:
        model: A causal LM (any ``nn.Module``); its parameters are never modified.
        config: peft ``LoraConfig`` selecting the target modules (``target_modules``,
            ``layers_to_transform``, ``layers_pattern``), the rank and the scaling.

    Raises:
        ValueError: If no ``nn.Linear`` matches the config, or the model already carries
            a different space.
    """

    def __init__(self, model: nn.Module, config: LoraConfig) -> None:
        if config.lora_dropout:
            raise ValueError("lora_dropout must be 0: ReGrad gradients must be deterministic")
        self.config = config
        self.rank = int(config.r)
        self.scaling = float(config.lora_alpha) / self.rank
        self.modules: dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and check_target_module_exists(config, name):
                self.modules[name] = module
        if not self.modules:
            raise ValueError(
                f"no nn.Linear of the model matches target_modules={config.target_modules} "
                f"layers_to_transform={config.layers_to_transform}: check the module names "
                "with `model.named_modules()`"
            )
        if getattr(model, "_regrad_space", None) is not None:
            raise ValueError("this model already has a LoraSpace: reuse it or call .remove() first")
        model._regrad_space = self  # type: ignore[attr-defined]
        self._model = model
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.modules.items()]

    @classmethod
    def attach(cls, model: nn.Module, config: LoraConfig | Mapping[str, Any]) -> LoraSpace:
        """The space of ``config`` on ``model``: the one already installed there if it is the
        same space (engines over one model share it), else a new one.

        Args:
            config: A peft ``LoraConfig`` or a checkpoint's LoRA spec (``MetaCheckpoint.lora``).

        Raises:
            ValueError: The model already carries a space of another configuration.
        """
        if not isinstance(config, LoraConfig):
            config = lora_config_from_dict(config)
        space = getattr(model, "_regrad_space", None)
        if space is None:
            return cls(model, config)
        if lora_config_to_dict(space.config) != lora_config_to_dict(config):
            raise ValueError(f"this model already carries a LoRA space {lora_config_to_dict(space.config)}, "
                             f"not {lora_config_to_dict(config)}: load the model again for a checkpoint "
                             "of another space (or call .remove() on the old space first)")
        return space

    # ------------------------------------------------------------------ structure
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every LoRA tensor (unbatched)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, m in self.modules.items():
            shapes[f"{name}.lora_A"] = (self.rank, m.in_features)
            shapes[f"{name}.lora_B"] = (m.out_features, self.rank)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def spec(self) -> dict[str, Any]:
        """JSON-able description of the space, stored in checkpoints and banks."""
        return {**lora_config_to_dict(self.config), "modules": list(self.modules)}

    def init_phi(self, *, seed: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Phi:
        """Fresh factors initialised as peft does: A Kaiming-uniform, B zeros."""
        gen = torch.Generator().manual_seed(seed)
        phi: Phi = {}
        for key, shape in self.shapes.items():
            if key.endswith("lora_A"):
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
                tensor = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            else:
                tensor = torch.zeros(shape)
            phi[key] = tensor.to(device=device, dtype=dtype)
        return phi

    def remove(self) -> None:
        """Remove the hooks; the model is back to its plain self."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._model._regrad_space = None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ running
    @contextmanager
    def activate(self, phi: Mapping[str, Tensor] | None) -> Iterator[None]:
        """Run the model with these factors (batched or not) inside the block.

        ``None`` runs the plain base model. Nothing is written into the model; leaving
        the block (normally or by an exception) restores the previous context.
        """
        if phi is not None:
            self.check_phi(phi)
        token = _ACTIVE.set((self, phi) if phi is not None else None)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def check_phi(self, phi: Mapping[str, Tensor]) -> None:
        """Raise ValueError if ``phi`` has missing keys or wrong shapes."""
        for key, shape in self.shapes.items():
            if key not in phi:
                raise ValueError(f"LoRA factors lack {key!r}: they were made for another space")
            got = tuple(phi[key].shape)
            if got != shape and got[1:] != shape:
                raise ValueError(f"LoRA factor {key!r} has shape {got}, expected {shape} or (b, *{shape})")

    def _make_hook(self, name: str):
        key_a, key_b = f"{name}.lora_A", f"{name}.lora_B"

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            active = _ACTIVE.get()
            if active is None or active[0] is not self:
                return None
            factors = active[1]
            x = inputs[0]  # (b, t, i)
            a = factors[key_a].to(x.dtype)  # (r, i) or (b, r, i)
            b = factors[key_b].to(x.dtype)  # (o, r) or (b, o, r)
            # (b, t, i) @ (b?, i, r) -> (b, t, r); @ (b?, r, o) -> (b, t, o)
            delta = (x @ a.transpose(-1, -2)) @ b.transpose(-1, -2)
            return output + self.scaling * delta

        return hook


def bind_active_factors(fn: _F) -> _F:
    """``fn`` made to run under the factors active *now*, wherever and whenever it is called.

    Activation checkpointing recomputes a layer during backward, after the ``activate``
    block has ended and (on CUDA) in another thread: the recomputation must see the same
    factors as the forward pass, or its gradients are silently those of another model.
    """
    active = _ACTIVE.get()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _ACTIVE.set(active)
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return run  # type: ignore[return-value]


# ---------------------------------------------------------------------- step sizes
def init_step_sizes(phi: Mapping[str, Tensor], mode: AlphaMode = "tie", init: float = 1e-2) -> Phi:
    """Step sizes alpha for :func:`apply_update`.

    Args:
        phi: Unbatched factors the sizes apply to.
        mode: ``"tie"`` one scalar per tensor (default), ``"full"`` one per element,
            ``"same"`` one scalar for all, ``"fix"`` one constant not meant to be trained.
        init: Initial value.

    Returns:
        Dict of step-size tensors (key ``"*"`` for the shared scalar of same/fix).
    """
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {ALPHA_MODES}, got {mode!r}")
    if mode in ("same", "fix"):
        ref = next(iter(phi.values()))
        return {_SHARED_ALPHA_KEY: torch.tensor(float(init), dtype=ref.dtype, device=ref.device)}
    if mode == "tie":
        return {k: torch.tensor(float(init), dtype=v.dtype, device=v.device) for k, v in phi.items()}
    return {k: torch.full_like(v, float(init)) for k, v in phi.items()}


def apply_update(phi: Mapping[str, Tensor], grad_sum: Mapping[str, Tensor],
                 alpha: Mapping[str, Tensor], gamma: float = 1.0) -> Phi:
    """phi' = phi - gamma * alpha (.) grad_sum: the one update rule of every stage.

    Pure: returns new tensors and differentiates through phi, alpha and grad_sum.
    ``grad_sum`` may be batched (b, *shape): the result is then batched too, one set of
    factors per sample, while phi and alpha broadcast.
    """
    shared = alpha.get(_SHARED_ALPHA_KEY)
    out: Phi = {}
    for key, value in phi.items():
        step = alpha[key] if shared is None else shared
        grad = grad_sum[key].to(value.dtype)
        out[key] = value - gamma * step * grad
    return out


def batch_phi(phi: Mapping[str, Tensor], batch_size: int) -> Phi:
    """Repeat unbatched factors along a new batch dimension (a view, no copy)."""
    return {k: v.unsqueeze(0).expand(batch_size, *v.shape) for k, v in phi.items()}
