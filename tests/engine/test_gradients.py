import torch

from regrad_engine.gradients import document_gradients, model_loss
from regrad_engine.prompts import encode_documents
from tests.conftest import random_phi

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
