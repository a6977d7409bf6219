"""Per-document LM-loss gradients w.r.t. the LoRA factors, many documents in one backward.

Each document gets its own copy of phi along a batch dimension, so the gradient w.r.t.
that copy is exactly the document's own gradient: (b, r, i) and (b, o, r). With
``create_graph=True`` the result stays differentiable (meta-learning's inner step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from regrad_engine.lora import LoraSpace, Phi
from regrad_engine.prompts import IGNORE_INDEX


def per_sample_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy per sample over labelled positions.

    Args:
        logits: (b, t, vocab).
        labels: (b, t), ``-100`` where no loss is taken.

    Returns:
        (b,) losses; a sample with no labelled token gets 0.
    """
    shift_logits = logits[:, :-1].float()  # (b, t-1, vocab)
    shift_labels = labels[:, 1:]  # (b, t-1)
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # (b, t-1)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def model_loss(model: nn.Module, space: LoraSpace, phi: Mapping[str, Tensor] | None,
               batch: Mapping[str, Tensor]) -> Tensor:
    """(b,) per-sample LM losses of ``batch`` (input_ids, attention_mask, labels) under phi."""
    with space.activate(phi):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_lm_loss(logits, batch["labels"])


def document_gradients(model: nn.Module, space: LoraSpace, phi: Mapping[str, Tensor],
                       batch: Mapping[str, Tensor], *, create_graph: bool = False) -> Phi:
    """Gradient of each document's mean LM loss w.r.t. phi, one backward for the batch.

    Args:
        model: The frozen base model (its parameters need not require grad).
        space: The adaptation space installed on ``model``.
        phi: Unbatched factors at which gradients are taken.
        batch: ``input_ids``, ``attention_mask``, ``labels``: (b, t) each.
        create_graph: Keep the graph (differentiable w.r.t. phi) for meta-learning.

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
    with torch.enable_grad():
        losses = model_loss(model, space, per_sample, batch)  # (b,)
        keys = list(per_sample)
        grads = torch.autograd.grad(losses.sum(), [per_sample[k] for k in keys],
                                    create_graph=create_graph, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(per_sample[k])) for k, g in zip(keys, grads)}
