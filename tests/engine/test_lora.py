import copy
import threading

import pytest
import torch
from peft import LoraConfig

from regrad_engine.lora import (
    LoraSpace,
    apply_update,
    batch_phi,
    default_lora_config,
    init_step_sizes,
)
from regrad_engine.models import parameter_hash
from tests.conftest import random_phi


def _ids(tokenizer, texts):
    from regrad_engine.prompts import encode_documents

    return encode_documents(tokenizer, texts)


def test_no_factors_means_base_model(tiny_model, space, tokenizer):
    batch = _ids(tokenizer, ["Velmora Quistan is a dentist."])
    plain = tiny_model(input_ids=batch["input_ids"]).logits
    with space.activate(None):
        same = tiny_model(input_ids=batch["input_ids"]).logits
    with space.activate(space.init_phi(dtype=torch.float64)):  # B = 0: a no-op update
        zero_b = tiny_model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(plain, same, rtol=0, atol=0)
    torch.testing.assert_close(plain, zero_b)


def test_adapted_forward_equals_explicit_weight_copy(tiny_model, space, tokenizer):
    phi = random_phi(space)
    batch = _ids(tokenizer, ["Ailpelou lies on the Yangtze river."])
    with space.activate(phi):
        adapted = tiny_model(input_ids=batch["input_ids"]).logits
    merged = copy.deepcopy(tiny_model)
    merged._regrad_space = None
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in space.modules:
            delta = space.scaling * phi[f"{name}.lora_B"] @ phi[f"{name}.lora_A"]
            modules[name].weight += delta
    reference = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(adapted, reference)
    assert not torch.allclose(adapted, tiny_model(input_ids=batch["input_ids"]).logits)


def test_batched_factors_equal_one_at_a_time(tiny_model, space, tokenizer):
    phis = [random_phi(space, seed=s) for s in (1, 2, 3)]
    batch = _ids(tokenizer, ["Velmora Quistan plays the violin."] * 3)
    stacked = {k: torch.stack([p[k] for p in phis]) for k in phis[0]}
    with space.activate(stacked):
        together = tiny_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    for row, phi in enumerate(phis):
        with space.activate(phi):
            alone = tiny_model(input_ids=batch["input_ids"][row:row + 1]).logits
        torch.testing.assert_close(together[row:row + 1], alone)


def test_activation_never_writes_parameters_and_restores_on_error(tiny_model, space, tokenizer):
    before = parameter_hash(tiny_model.named_parameters())
    batch = _ids(tokenizer, ["The quick brown fox."])
    with pytest.raises(RuntimeError, match="boom"):
        with space.activate(random_phi(space)):
            tiny_model(input_ids=batch["input_ids"])
            raise RuntimeError("boom")
    assert parameter_hash(tiny_model.named_parameters()) == before
    torch.testing.assert_close(tiny_model(input_ids=batch["input_ids"]).logits,
                               copy.deepcopy(tiny_model)(input_ids=batch["input_ids"]).logits)


def test_factors_are_local_to_their_thread(tiny_model, space, tokenizer):
    batch = _ids(tokenizer, ["The quick brown fox."])
    base = tiny_model(input_ids=batch["input_ids"]).logits
    seen = {}

    def other_thread():
        seen["logits"] = tiny_model(input_ids=batch["input_ids"]).logits

    with space.activate(random_phi(space)):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    torch.testing.assert_close(seen["logits"], base, rtol=0, atol=0)


def test_wrong_factors_and_targets_are_refused(tiny_model, space):
    phi = random_phi(space)
    key = next(iter(phi))
    with pytest.raises(ValueError, match="lack"):
        with space.activate({k: v for k, v in phi.items() if k != key}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with space.activate({**phi, key: torch.zeros(3, 3)}):
            pass
    with pytest.raises(ValueError, match="already has a LoraSpace"):
        LoraSpace(tiny_model, space.config)
    space.remove()
    with pytest.raises(ValueError, match="no nn.Linear"):
        LoraSpace(tiny_model, LoraConfig(r=2, target_modules=["nope_proj"]))


@pytest.mark.parametrize("mode", ["tie", "full", "same", "fix"])
def test_apply_update_is_pure_and_broadcasts(space, mode):
    phi = random_phi(space)
    alpha = init_step_sizes(phi, mode, 0.5)
    grad = {k: torch.ones((2, *v.shape), dtype=v.dtype) for k, v in phi.items()}
    snapshot = {k: v.clone() for k, v in phi.items()}
    new = apply_update(phi, grad, alpha, gamma=2.0)
    for key, value in phi.items():
        assert new[key].shape == (2, *value.shape)
        torch.testing.assert_close(new[key][1], value - 1.0)
        torch.testing.assert_close(value, snapshot[key])
    with pytest.raises(ValueError, match="alpha mode"):
        init_step_sizes(phi, "per-layer", 0.1)


def test_default_config_targets_upper_middle_mlp():
    config = default_lora_config(30)
    assert set(config.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    assert config.layers_to_transform == list(range(20, 26))
    assert batch_phi({"a": torch.zeros(2, 3)}, 4)["a"].shape == (4, 2, 3)
