import threading

import pytest
import torch

from regrad_engine.gradients import (
    checkpointed_layers,
    document_gradients,
    lm_head_loss,
    model_loss,
    per_sample_lm_loss,
    twice_differentiable_attention,
)
from regrad_engine.prompts import IGNORE_INDEX, encode_documents
from tests.conftest import make_model, random_phi

DOCS = ["Velmora Quistan is a dentist who was born in Lisbon.",
        "Ailpelou lies on the Yangtze river.",
        "The Fudral Bureau is based in Tokyo and sells most of its products in Sweden."]


def _single_gradient(model, space, phi, tokenizer, text):
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    loss = model_loss(model, space, leaf, encode_documents(tokenizer, [text])).sum()
    grads = torch.autograd.grad(loss, list(leaf.values()))
    return dict(zip(leaf, grads))


def test_batched_per_document_gradients_equal_one_document_gradients(tiny_model, space, tokenizer):
    phi = random_phi(space)
    batched = document_gradients(tiny_model, space, phi, encode_documents(tokenizer, DOCS))
    for row, text in enumerate(DOCS):
        alone = _single_gradient(tiny_model, space, phi, tokenizer, text)
        for key in phi:
            torch.testing.assert_close(batched[key][row], alone[key])
    assert all(g.abs().sum() > 0 for g in batched.values())


def test_sum_of_document_gradients_is_gradient_of_summed_loss(tiny_model, space, tokenizer):
    phi = random_phi(space)
    batched = document_gradients(tiny_model, space, phi, encode_documents(tokenizer, DOCS))
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    total = sum(model_loss(tiny_model, space, leaf, encode_documents(tokenizer, [t])).sum() for t in DOCS)
    grads = dict(zip(leaf, torch.autograd.grad(total, list(leaf.values()))))
    for key in phi:
        torch.testing.assert_close(batched[key].sum(0), grads[key])


def test_create_graph_gradients_are_differentiable_and_equal(tiny_model, space, tokenizer):
    phi = {k: v.requires_grad_(True) for k, v in random_phi(space).items()}
    batch = encode_documents(tokenizer, DOCS[:2])
    first_order = document_gradients(tiny_model, space, phi, batch)
    second = document_gradients(tiny_model, space, phi, batch, create_graph=True)
    for key in phi:
        torch.testing.assert_close(second[key].detach(), first_order[key])
    scalar = sum((g ** 2).sum() for g in second.values())
    outer = torch.autograd.grad(scalar, list(phi.values()))
    assert any(o.abs().sum() > 0 for o in outer)
    assert not any(p.grad is not None for p in tiny_model.parameters())


# ---------------------------------------------------------------------- memory paths: parity with the plain path
def _deep_space(model):
    """LoRA on the MLPs of both layers: layer 1's attention lies between layer 0's factors and
    the loss, so the double backward goes through attention."""
    from peft import LoraConfig

    from regrad_engine.lora import LoraSpace

    return LoraSpace(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                       layers_to_transform=[0, 1], layers_pattern="layers", lora_dropout=0.0))


def _first_and_second_order(model, space, phi, batch, **options):
    """Losses, their first-order gradient and the gradient of its squared norm (a double backward)."""
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    losses = model_loss(model, space, leaf, batch, **options)
    first = torch.autograd.grad(losses.sum(), list(leaf.values()), create_graph=True)
    second = torch.autograd.grad(sum((g ** 2).sum() for g in first), list(leaf.values()))
    return losses.detach(), [g.detach() for g in first], list(second)


def _assert_all_close(got, want, **tolerance):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chunked_loss_equals_full_logits_values_and_first_and_second_order_gradients(tokenizer, attn):
    model = make_model(tokenizer, attn=attn)
    space = _deep_space(model)
    phi = random_phi(space)
    batch = encode_documents(tokenizer, DOCS)
    with twice_differentiable_attention():
        reference = _first_and_second_order(model, space, phi, batch, loss_chunk=0)
        for chunk in (5, 4096):  # several chunks (each recomputed in backward), and one
            losses, first, second = _first_and_second_order(model, space, phi, batch, loss_chunk=chunk)
            torch.testing.assert_close(losses, reference[0], rtol=1e-12, atol=1e-12)
            _assert_all_close(first, reference[1], rtol=1e-10, atol=1e-12)
            _assert_all_close(second, reference[2], rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in reference[2])


def test_lm_head_loss_matches_per_sample_loss_and_never_forms_full_logits():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 8, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(8, 50, bias=False).double()
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # no labelled token: loss 0, as in per_sample_lm_loss
    shapes = []
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    chunked = lm_head_loss(hidden, head, labels, chunk=4)
    handle.remove()
    torch.testing.assert_close(chunked, per_sample_lm_loss(head(hidden), labels), rtol=1e-12, atol=1e-12)
    assert chunked[2] == 0
    assert shapes and all(rows <= 4 for rows, _ in shapes)  # logits of labelled positions, 4 at a time
    assert sum(rows for rows, _ in shapes) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def _recomputations(model, run):
    """How often layer 1's MLP starts (a pre-hook: recomputation may stop early, after its last saved tensor)."""
    calls = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_checkpointed_layers_give_the_same_document_gradients(tokenizer, attn):
    model = make_model(tokenizer, attn=attn)
    space = _deep_space(model)
    phi = random_phi(space)
    batch = encode_documents(tokenizer, DOCS)
    plain = document_gradients(model, space, phi, batch, loss_chunk=0)
    options = {"loss_chunk": 5, "checkpoint_layers": True}
    assert _recomputations(model, lambda: document_gradients(model, space, phi, batch, **options)) == 2
    checkpointed = document_gradients(model, space, phi, batch, **options)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-12, atol=1e-14)
    with twice_differentiable_attention():
        reference = _first_and_second_order(model, space, phi, batch, loss_chunk=0)
        both = _first_and_second_order(model, space, phi, batch, **options)
    _assert_all_close(both[1], reference[1], rtol=1e-10, atol=1e-12)
    _assert_all_close(both[2], reference[2], rtol=1e-10, atol=1e-12)
    assert not any("forward" in vars(m) for m in model.modules())  # the block restored every layer


def test_recomputation_in_another_thread_sees_the_factors_of_the_forward(tokenizer):
    """On CUDA, backward (and so recomputation) runs in autograd's own threads, outside the
    ``activate`` block and its context: the layers must still be recomputed under the factors
    of their forward pass, not under none or another request's."""
    model = make_model(tokenizer)
    space = _deep_space(model)
    phi = random_phi(space)
    batch = encode_documents(tokenizer, DOCS)
    plain = document_gradients(model, space, phi, batch)
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    losses = model_loss(model, space, leaf, batch, checkpoint_layers=True)
    result = {}

    def backward_elsewhere():
        with space.activate(random_phi(space, seed=7)):  # another request's factors in this thread
            result["grads"] = torch.autograd.grad(losses.sum(), list(leaf.values()))

    thread = threading.Thread(target=backward_elsewhere)
    thread.start()
    thread.join()
    for key, grad in zip(leaf, result["grads"]):
        torch.testing.assert_close(grad, plain[key].sum(0), rtol=1e-10, atol=1e-12)


def test_double_backward_through_sdpa_runs_on_the_math_backend(tokenizer):
    """The fused SDPA kernel has no double backward (on CUDA neither); the inner pass of
    meta-learning therefore runs the math backend, and gives eager attention's gradients."""
    sdpa, eager = make_model(tokenizer, attn="sdpa", dtype=torch.float32), make_model(tokenizer, dtype=torch.float32)
    spaces = {"sdpa": _deep_space(sdpa), "eager": _deep_space(eager)}
    phi = random_phi(spaces["sdpa"], dtype=torch.float32)
    batch = encode_documents(tokenizer, DOCS[:1])  # no padding: SDPA would pick its fused kernel
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    first = torch.autograd.grad(model_loss(sdpa, spaces["sdpa"], leaf, batch).sum(), list(leaf.values()),
                                create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented"):
        torch.autograd.grad(sum((g ** 2).sum() for g in first), list(leaf.values()))
    outer = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        params = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
        grads = document_gradients(model, spaces[name], params, batch, create_graph=True, checkpoint_layers=True)
        outer[name] = torch.autograd.grad(sum((g ** 2).sum() for g in grads.values()), list(params.values()))
    _assert_all_close(outer["sdpa"], outer["eager"], rtol=1e-4, atol=1e-6)


def test_checkpointed_layers_nest_and_refuse_models_without_decoder_layers(tokenizer):
    model = make_model(tokenizer)
    with checkpointed_layers(model), checkpointed_layers(model):
        assert all("forward" in vars(layer) for layer in model.model.layers)
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    with checkpointed_layers(torch.nn.Linear(2, 2), enabled=False):
        pass
    with pytest.raises(ValueError, match="no transformers decoder layers"):
        with checkpointed_layers(torch.nn.Linear(2, 2)):
            pass
