import random

import pytest
import torch
from peft import LoraConfig

from regrad_engine.checkpoint import CheckpointError, MetaCheckpoint
from regrad_engine.config import MetaTrainConfig
from regrad_engine.lora import LoraSpace
from regrad_engine.meta import MetaExample, MetaTrainer, evaluate_loss
from tests.conftest import make_model, random_phi

CITIES = ["Paris", "Tokyo", "Lisbon", "Cairo", "Lima", "Oslo"]
NAMES = ["Velmora", "Gredin", "Quibiku", "Ailpelou", "Fudral", "Quistan", "Drako", "Quil", "Tokyo Bureau",
         "Zorvath", "Brennic", "Sulvane", "Orrin", "Tessaly", "Kovric", "Yendra", "Marlo", "Pell"]


def fictional_tasks(seed: int, names: list[str], k: int = 2) -> list[MetaExample]:
    rng = random.Random(seed)
    facts = {name: rng.choice(CITIES) for name in names}
    tasks = []
    for name, city in facts.items():
        others = rng.sample([n for n in names if n != name], k - 1)
        passages = [f"{name} lives in {city}."] + [f"{o} lives in {facts[o]}." for o in others]
        rng.shuffle(passages)
        tasks.append(MetaExample(f"Where does {name} live?", [city], passages))
    return tasks


def _trainer(tokenizer, tmp_path, steps: int, seed: int = 0, attn: str = "eager", **options):
    model = make_model(tokenizer, dtype=torch.float32, layers=2, hidden=64, attn=attn)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                        layers_to_transform=[0, 1], layers_pattern="layers", lora_dropout=0.0)
    space = LoraSpace(model, config)
    cfg = MetaTrainConfig(data=str(tmp_path), out=str(tmp_path / "meta"), k=2, steps=steps, tasks_per_step=4,
                          lr=1e-2, alpha_init=1.0, alpha_lr=0.05, eval_every=max(1, steps // 2), dev_size=8,
                          warmup_ratio=0.05, seed=seed, **options)
    return MetaTrainer(model, tokenizer, space, cfg, base_model="tiny", base_fingerprint="f00")


def test_meta_training_lowers_held_out_loss_below_start_and_baselines(tokenizer, tmp_path):
    train = fictional_tasks(0, NAMES[:12])
    held_out = fictional_tasks(1, NAMES[12:])
    trainer = _trainer(tokenizer, tmp_path, steps=120)
    args = (trainer.model, tokenizer, trainer.space)
    raw = evaluate_loss(*args, trainer.phi, trainer.alpha, held_out)
    trainer.fit(train, held_out[:4], tmp_path / "meta", progress=False, log=lambda s: None)
    trained = evaluate_loss(*args, trainer.phi, trainer.alpha, held_out)
    no_gradients = evaluate_loss(*args, trainer.phi, trainer.alpha, held_out, use_gradients=False)
    assert trained < raw - 0.5, (trained, raw)
    assert trained < no_gradients, (trained, no_gradients)
    assert set((tmp_path / "meta" / "best").iterdir()) >= {tmp_path / "meta" / "best" / "manifest.json"}


def test_every_trainable_tensor_changes_after_a_step(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, steps=3)
    # B starts at zero, so A only moves once B has; two steps make every tensor move.
    before = {k: v.detach().clone() for k, v in {**trainer.phi, **trainer.alpha}.items()}
    tasks = fictional_tasks(0, NAMES)
    trainer.train_step(tasks[:4])
    trainer.train_step(tasks[4:8])
    for key, value in {**trainer.phi, **trainer.alpha}.items():
        assert not torch.equal(value.detach(), before[key]), key


def test_resume_continues_where_it_stopped(tokenizer, tmp_path):
    tasks = fictional_tasks(0, NAMES)
    first = _trainer(tokenizer, tmp_path, steps=6)
    first.fit(tasks, tasks[:2], tmp_path / "meta", progress=False, log=lambda s: None, stop_after=4)
    straight = _trainer(tokenizer, tmp_path / "b", steps=6)
    straight.fit(tasks, tasks[:2], tmp_path / "b" / "meta", progress=False, log=lambda s: None)
    resumed = _trainer(tokenizer, tmp_path, steps=6)
    messages = []
    resumed.fit(tasks, tasks[:2], tmp_path / "meta", progress=False, log=messages.append)
    assert any("resumed" in m and "step 4" in m for m in messages)
    for key in straight.phi:  # same data order and optimiser state: same result as one run
        torch.testing.assert_close(resumed.phi[key], straight.phi[key], rtol=1e-4, atol=1e-6)


def test_checkpoint_roundtrip_and_refusals(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, steps=1)
    ckpt = trainer.checkpoint({"dev_loss": 1.0})
    ckpt.save(tmp_path / "ck")
    loaded = MetaCheckpoint.load(tmp_path / "ck")
    assert loaded.fingerprint() == ckpt.fingerprint()
    assert loaded.lora == ckpt.lora and loaded.alpha_mode == "tie"
    with pytest.raises(CheckpointError, match="fingerprint"):
        loaded.check_base("other", "other-model")
    with pytest.raises(CheckpointError, match="regrad train"):
        MetaCheckpoint.load(tmp_path / "missing")


def test_checkpoint_records_whether_documents_began_with_bos(tokenizer, tmp_path, monkeypatch, caplog):
    import json
    import logging

    import regrad_engine.checkpoint as checkpoint_module
    from regrad_engine.prompts import bos_prefix

    trainer = _trainer(tokenizer, tmp_path, steps=1)
    trainer.checkpoint().save(tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    bos = bool(bos_prefix(tokenizer))
    assert manifest["document_bos"] is bos
    loaded = MetaCheckpoint.load(tmp_path / "ck")
    assert loaded.document_bos is bos
    loaded.check_base(loaded.base_fingerprint, "m", tokenizer=tokenizer)  # as trained: accepted
    monkeypatch.setattr(checkpoint_module, "bos_prefix", lambda tok: [] if bos else [7])  # documents encoded otherwise
    with pytest.raises(CheckpointError, match="BOS token"):
        loaded.check_base(loaded.base_fingerprint, "m", tokenizer=tokenizer)
    # a checkpoint from before the record: loads as unrecorded; warned about only where documents now begin with BOS
    del manifest["document_bos"]
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    old = MetaCheckpoint.load(tmp_path / "ck")
    assert old.document_bos is None and "document_bos" not in old.manifest()

    def warned() -> bool:
        return any(r.name == "regrad_engine.checkpoint" and "does not record" in r.getMessage()
                   for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="regrad_engine.checkpoint"):
        caplog.clear()
        monkeypatch.setattr(checkpoint_module, "bos_prefix", lambda tok: [])
        old.check_base(old.base_fingerprint, "m", tokenizer=tokenizer)
        assert not warned()
        monkeypatch.setattr(checkpoint_module, "bos_prefix", lambda tok: [7])
        old.check_base(old.base_fingerprint, "m", tokenizer=tokenizer)
        assert warned()
    manifest["document_bos"] = "false"  # hand-edited: refused with what to do, not a confusing mismatch later
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="true or false"):
        MetaCheckpoint.load(tmp_path / "ck")


def test_mixed_mode_puts_the_passages_in_every_second_prompt(tokenizer, tmp_path):
    from regrad_engine.meta import hybrid_tasks, meta_loss

    assert hybrid_tasks("mixed", 4) == [False, True, False, True]
    assert hybrid_tasks("parametric", 2) == [False, False] and hybrid_tasks("hybrid", 2) == [True, True]
    with pytest.raises(ValueError, match="mixed"):
        hybrid_tasks("both", 2)
    trainer = _trainer(tokenizer, tmp_path, steps=1)
    tasks = fictional_tasks(0, NAMES[:2])
    losses = {mode: meta_loss(trainer.model, tokenizer, trainer.space, trainer.phi, trainer.alpha, tasks,
                              mode=mode, create_graph=False).item() for mode in ("parametric", "hybrid", "mixed")}
    first = {mode: meta_loss(trainer.model, tokenizer, trainer.space, trainer.phi, trainer.alpha, tasks[:1],
                             mode=mode, create_graph=False).item() for mode in ("parametric", "mixed")}
    assert first["mixed"] == pytest.approx(first["parametric"])  # task 0 is parametric in mixed mode
    assert losses["mixed"] != pytest.approx(losses["parametric"]) and losses["mixed"] != pytest.approx(losses["hybrid"])


# ---------------------------------------------------------------------- memory paths: the same meta-gradient
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_meta_gradient_is_the_same_with_checkpointing_and_chunked_loss(tokenizer, attn):
    """phi and alpha gradients through the inner step (a double backward through attention:
    layer 0 is adapted) equal the plain path's, float64 on CPU."""
    from regrad_engine.lora import init_step_sizes
    from regrad_engine.meta import meta_loss

    model = make_model(tokenizer, attn=attn)
    space = LoraSpace(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                        layers_to_transform=[0, 1], layers_pattern="layers", lora_dropout=0.0))
    phi0 = random_phi(space)
    tasks = fictional_tasks(0, NAMES[:4])

    def meta_gradient(**options):
        phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
        alpha = {k: v.requires_grad_(True) for k, v in init_step_sizes(phi, "tie", 1.0).items()}
        loss = meta_loss(model, tokenizer, space, phi, alpha, tasks, mode="mixed", **options)
        loss.backward()
        return loss.detach(), [p.grad for p in [*phi.values(), *alpha.values()]]

    plain_loss, plain = meta_gradient(loss_chunk=0)
    for options in ({"loss_chunk": 7}, {"checkpoint_layers": True}, {"loss_chunk": 7, "checkpoint_layers": True}):
        loss, grads = meta_gradient(**options)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in plain)


def test_trainer_takes_the_memory_options_from_its_config(tokenizer, tmp_path):
    tasks = fictional_tasks(0, NAMES)
    plain = _trainer(tokenizer, tmp_path / "a", steps=2, attn="sdpa", loss_chunk=0)
    lean = _trainer(tokenizer, tmp_path / "b", steps=2, attn="sdpa", loss_chunk=5, gradient_checkpointing=True)
    for trainer in (plain, lean):
        trainer.train_step(tasks[:4])  # B moves off zero, so every gradient below is non-zero
        trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for key, value in plain.phi.items():
            lean.phi[key].copy_(value)
    grads = []
    for trainer in (plain, lean):
        trainer._loss(tasks[4:8]).backward()
        grads.append([p.grad for p in [*trainer.phi.values(), *trainer.alpha.values()]])
    for got, want in zip(*reversed(grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    defaults = MetaTrainConfig(data="d", out="o")
    assert defaults.bf16 and defaults.attention == "sdpa"  # bf16 autocast on CUDA; CPU needs --cpu-bf16
    assert defaults.loss_chunk > 0 and not defaults.gradient_checkpointing


def test_cpu_bf16_runs_meta_steps_under_autocast_close_to_fp32_and_keeps_dev_loss_in_fp32(tokenizer, tmp_path):
    tasks = fictional_tasks(0, NAMES)
    fp32 = _trainer(tokenizer, tmp_path / "a", steps=2)
    bf16 = _trainer(tokenizer, tmp_path / "b", steps=2, cpu_bf16=True)
    fp32.train_step(tasks[:4])  # B moves off zero, so every gradient below is non-zero
    fp32.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for mine, theirs in ((bf16.phi, fp32.phi), (bf16.alpha, fp32.alpha)):
            for key, value in theirs.items():
                mine[key].copy_(value)
    seen: dict[str, set] = {"a": set(), "b": set()}
    grads = []
    for name, trainer in (("a", fp32), ("b", bf16)):
        layer = trainer.model.model.layers[0].self_attn.o_proj
        hook = layer.register_forward_hook(lambda module, args, out, name=name: seen[name].add(out.dtype))
        trainer.accumulate_gradients(tasks[4:8])
        hook.remove()
        grads.append(torch.cat([p.grad.flatten() for p in [*trainer.phi.values(), *trainer.alpha.values()]]))
    assert seen == {"a": {torch.float32}, "b": {torch.bfloat16}}
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.99
    assert 0.9 < float(grads[1].norm() / grads[0].norm()) < 1.1
    assert bf16.dev_loss(tasks[8:]) == fp32.dev_loss(tasks[8:])  # dev loss compares with fp32 runs
    assert not MetaTrainConfig(data="d", out="o").cpu_bf16


def test_cpu_bf16_warns_where_the_cpu_has_no_native_bf16(tokenizer, tmp_path, monkeypatch):
    import regrad_engine.meta as meta

    monkeypatch.setattr(meta, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        _trainer(tokenizer, tmp_path, steps=1, cpu_bf16=True)


def test_encoded_batches_give_the_same_loss_and_are_prefetched_in_order(tokenizer, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from regrad_engine.meta import prefetched

    trainer = _trainer(tokenizer, tmp_path, steps=1, mode="mixed")
    tasks = fictional_tasks(0, NAMES[:4])
    with torch.no_grad():
        torch.testing.assert_close(trainer._loss(trainer.encode(tasks), create_graph=False),
                                   trainer._loss(tasks, create_graph=False))
    started = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        stream = prefetched(lambda i: started.append(i) or i * 10, range(4), pool)
        assert next(stream) == 0
        pool.submit(lambda: None).result()  # the prefetch ahead of it has run
        assert started == [0, 1]  # one batch ahead, no more
        assert list(stream) == [10, 20, 30]


def test_micro_batches_accumulate_the_same_gradient(tokenizer, tmp_path):
    tasks = fictional_tasks(0, NAMES[:5])  # 5 tasks: micro-batches of 2 leave one of 1
    grads = {}
    for micro_batch in (None, 2, 1):
        trainer = _trainer(tokenizer, tmp_path / str(micro_batch), steps=1, mode="mixed", micro_batch=micro_batch)
        with torch.no_grad():
            for value in trainer.phi.values():
                value.normal_(0, 0.1, generator=torch.Generator().manual_seed(value.numel()))
        parts = trainer.encode(tasks).split(micro_batch or 5)
        assert [p.size for p in parts] == {None: [5], 2: [2, 2, 1], 1: [1] * 5}[micro_batch]
        assert sum(int(p.owner.numel()) for p in parts) == 10
        loss = trainer.accumulate_gradients(tasks)
        grads[micro_batch] = (loss, [p.grad for p in [*trainer.phi.values(), *trainer.alpha.values()]])
    for micro_batch in (2, 1):
        torch.testing.assert_close(grads[micro_batch][0], grads[None][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads[micro_batch][1], grads[None][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
