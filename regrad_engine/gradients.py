"""Per-document LM-loss gradients w.r.t. the LoRA factors, many documents in one backward.

Each document gets its own copy of phi along a batch dimension, so the gradient w.r.t.
that copy is exactly the document's own gradient: (b, r, i) and (b, o, r). With
``create_graph=True`` the result stays differentiable (meta-learning's inner step).

Memory, without changing a single gradient (parity-tested against the plain path):
* ``loss_chunk``: the LM loss is taken from the final hidden states at the labelled
  positions only, that many positions at a time, each chunk recomputed in backward, so no
  (b, t, vocab) logits exist (0: full logits, the reference path);
* ``checkpoint_layers``: every decoder layer keeps only its input and is recomputed in
  backward (non-reentrant ``torch.utils.checkpoint``, which supports the double backward),
  under the same LoRA factors and attention kernels as its forward;
* a pass that is differentiated twice runs SDPA's math backend: the fused kernels (flash,
  memory-efficient, cuDNN; flash on CPU) have no double backward. Every other pass keeps
  the fast kernels.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from regrad_engine.lora import LoraSpace, Phi, bind_active_factors
from regrad_engine.prompts import IGNORE_INDEX

DEFAULT_LOSS_CHUNK = 2048  # labelled positions per chunk: (2048, 128256) fp32 logits = 1 GiB


def per_sample_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy per sample over labelled positions.

    Args:
        logits: (b, t, vocab).
        labels: (b, t), ``-100`` where no loss is taken.

    Returns:
        (b,) losses; a sample with no labelled token gets 0.
    """
    shift_logits = _upcast(logits[:, :-1])  # (b, t-1, vocab)
    shift_labels = labels[:, 1:]  # (b, t-1)
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # (b, t-1)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def lm_head_loss(hidden: Tensor, head: nn.Module, labels: Tensor, chunk: int = DEFAULT_LOSS_CHUNK) -> Tensor:
    """``per_sample_lm_loss(head(hidden), labels)`` without (b, t, vocab) logits.

    Only labelled positions get logits, ``chunk`` of them at a time; with more than one
    chunk, each is recomputed in backward (twice differentiable), so the first-order pass
    never holds more than one chunk's logits.

    Args:
        hidden: (b, t, h) final hidden states.
        head: The output projection, h -> vocab.
        labels: (b, t), ``-100`` where no loss is taken.
        chunk: Labelled positions per chunk (>= 1).

    Returns:
        (b,) losses; a sample with no labelled token gets 0.
    """
    shift_labels = labels[:, 1:]  # (b, t-1)
    keep = shift_labels != IGNORE_INDEX  # (b, t-1)
    sample, position = keep.nonzero(as_tuple=True)  # (n,) each
    rows = hidden[sample, position]  # (n, h): the hidden state that predicts each label
    targets = shift_labels[sample, position]  # (n,)
    losses = functools.partial(_token_losses, head)
    if rows.size(0) <= chunk:
        token_loss = losses(rows, targets)
    else:
        token_loss = torch.cat([
            checkpoint(bind_active_factors(losses), rows[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
            for s in range(0, rows.size(0), chunk)])  # (n,)
    total = torch.zeros(labels.size(0), dtype=token_loss.dtype, device=token_loss.device)
    return total.index_add(0, sample, token_loss) / keep.sum(dim=1).clamp(min=1)


def _token_losses(head: nn.Module, rows: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(_upcast(head(rows)), targets, reduction="none")  # (n,)


def _upcast(logits: Tensor) -> Tensor:
    """Logits in at least fp32 for the softmax (bf16 under autocast; float64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly ``lm_head(decoder(...).last_hidden_state)``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    get_head, get_decoder = getattr(model, "get_output_embeddings", None), getattr(model, "get_decoder", None)
    return callable(get_head) and callable(get_decoder) and isinstance(get_head(), nn.Linear)


# ---------------------------------------------------------------------- recomputation
@contextmanager
def twice_differentiable_attention() -> Iterator[None]:
    """SDPA's math backend inside the block (for passes run with ``create_graph``).

    The backend flags are process-wide: another thread's attention in the meantime runs
    the math backend too (slower, same results). Eager attention is unaffected.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _enabled_sdpa_backends() -> list[SDPBackend]:
    flags = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
             SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
             SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled}
    return [backend for backend, enabled in flags.items() if enabled()]


def _as_in_forward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` made to run, whenever called, under the LoRA factors and SDPA backends active now:
    a recomputed layer must repeat its forward exactly (same factors, same saved tensors)."""
    backends, bound = _enabled_sdpa_backends(), bind_active_factors(fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(backends):
            return bound(*args, **kwargs)

    return run


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(_as_in_forward(forward), *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder layer of ``model`` stores only its input for backward
    and recomputes its activations there (exact, also for the double backward).

    The layers' ``forward`` is wrapped for the duration of the block and restored in
    ``finally``; a call from another thread meanwhile is checkpointed too, under its own
    factors (still exact). Only the forward needs to run inside the block.

    Raises:
        ValueError: The model has no transformers decoder layers (``GradientCheckpointingLayer``).
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"checkpoint_layers: {type(model).__name__} has no transformers decoder layers "
                         "(GradientCheckpointingLayer) to checkpoint; turn checkpointing off for this model")
    wrapped = [m for m in layers if "forward" not in vars(m)]  # not already wrapped by an enclosing block
    for layer in wrapped:
        layer.forward = _checkpointed(layer.forward)  # an instance attribute over the class's forward
    try:
        yield
    finally:
        for layer in wrapped:
            del layer.forward


# ---------------------------------------------------------------------- losses and gradients
def model_loss(model: nn.Module, space: LoraSpace, phi: Mapping[str, Tensor] | None,
               batch: Mapping[str, Tensor], *, loss_chunk: int = DEFAULT_LOSS_CHUNK,
               checkpoint_layers: bool = False) -> Tensor:
    """(b,) per-sample LM losses of ``batch`` (input_ids, attention_mask, labels) under phi.

    Args:
        loss_chunk: Labelled positions per chunk of the loss (see :func:`lm_head_loss`);
            0 computes the full (b, t, vocab) logits. Models whose logits are not a plain
            linear head (soft-capping, scaling) always take the full path.
        checkpoint_layers: Recompute the decoder layers in backward (:func:`checkpointed_layers`).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with space.activate(phi), checkpointed_layers(model, checkpoint_layers):
        if loss_chunk and _plain_head(model):
            hidden = model.get_decoder()(**inputs).last_hidden_state  # (b, t, h)
            return lm_head_loss(hidden, model.get_output_embeddings(), batch["labels"], loss_chunk)
        logits = model(**inputs).logits  # (b, t, vocab)
    return per_sample_lm_loss(logits, batch["labels"])


def document_gradients(model: nn.Module, space: LoraSpace, phi: Mapping[str, Tensor],
                       batch: Mapping[str, Tensor], *, create_graph: bool = False,
                       loss_chunk: int = DEFAULT_LOSS_CHUNK, checkpoint_layers: bool = False) -> Phi:
    """Gradient of each document's mean LM loss w.r.t. phi, one backward for the batch.

    Args:
        model: The frozen base model (its parameters need not require grad).
        space: The adaptation space installed on ``model``.
        phi: Unbatched factors at which gradients are taken.
        batch: ``input_ids``, ``attention_mask``, ``labels``: (b, t) each.
        create_graph: Keep the graph (differentiable w.r.t. phi) for meta-learning; the
            pass then runs SDPA's math backend (the fused kernels have no double backward).
        loss_chunk: See :func:`model_loss`.
        checkpoint_layers: See :func:`model_loss`.

    Returns:
        Batched gradients: each value (b, *shape) with row j the gradient of document j.
    """
    size = batch["input_ids"].shape[0]
    if create_graph:
        # (b, *shape) views of phi: the graph reaches phi through the expand.
        per_sample = {k: v.unsqueeze(0).expand(size, *v.shape) for k, v in phi.items()}
    else:
        per_sample = {k: v.detach().unsqueeze(0).repeat(size, *([1] * v.dim())).requires_grad_(True)
                      for k, v in phi.items()}
    attention = twice_differentiable_attention() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), attention:
        losses = model_loss(model, space, per_sample, batch, loss_chunk=loss_chunk,
                            checkpoint_layers=checkpoint_layers)  # (b,)
        keys = list(per_sample)
        grads = torch.autograd.grad(losses.sum(), [per_sample[k] for k in keys],
                                    create_graph=create_graph, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(per_sample[k])) for k, g in zip(keys, grads)}
