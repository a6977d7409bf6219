"""Tests for regrad_engine.bank.GradientBank (CPU, tiny shapes, fixed seeds)."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from regrad_engine.bank import (
    BankError,
    BankMismatchError,
    GradientBank,
    UnknownDocumentError,
)

SHAPES = {
    "model.layers.0.mlp.gate_proj.lora_A": (2, 6),  # (r, in)
    "model.layers.0.mlp.gate_proj.lora_B": (5, 2),  # (out, r)
    "model.layers.1.self_attn.q_proj.lora_A": (2, 4),
    "model.layers.1.self_attn.q_proj.lora_B": (4, 2),
}
BINDING = {"base_model_fingerprint": "abc123", "meta_checkpoint": "meta-v1"}


def make_grads(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]


def new_bank(path, **kw) -> GradientBank:
    kw.setdefault("storage_dtype", "fp32")
    return GradientBank.create(path, binding=BINDING, shapes=SHAPES, **kw)


def assert_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k].float()), k


def shard_files(path) -> list:
    return sorted(path.glob("*.safetensors"))


def test_roundtrip_fp32_exact_and_reopen(tmp_path):
    grads = make_grads(5)
    with new_bank(tmp_path / "b", shard_size=2) as bank:
        for i, g in enumerate(grads):
            bank.add(f"d{i}", g)
        assert len(bank) == 5 and "d4" in bank and "zz" not in bank
        assert_exact(bank.get("d4"), grads[4])  # pending read
    bank = GradientBank.open(tmp_path / "b", binding=BINDING)
    assert bank.ids() == [f"d{i}" for i in range(5)]
    for i, g in enumerate(grads):
        assert_exact(bank.get(f"d{i}"), g)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["storage_dtype"] == "fp32"
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    assert list(GradientBank.shard_contents(tmp_path / "b").values()) == [["d0", "d1"], ["d2", "d3"], ["d4"]]
    assert bank.nbytes_per_document() == 4 * sum(a * b for a, b in SHAPES.values())


def test_roundtrip_bf16_close(tmp_path):
    grads = make_grads(3, seed=1)
    with GradientBank.create(tmp_path, binding=BINDING, shapes=SHAPES) as bank:  # default bf16
        bank.add_batch(["a", "b", "c"], {k: torch.stack([g[k] for g in grads]) for k in SHAPES})
    bank = GradientBank.open(tmp_path)
    assert bank.storage_dtype == "bf16"
    assert bank.nbytes_per_document() == 2 * sum(a * b for a, b in SHAPES.values())
    for name, g in zip("abc", grads):
        got = bank.get(name)
        for k in SHAPES:
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k], g[k], rtol=1e-2, atol=1e-2)


def test_sum_and_sum_batch(tmp_path):
    grads = make_grads(6, seed=2)
    bank = new_bank(tmp_path, shard_size=4)
    for i, g in enumerate(grads):
        bank.add(f"d{i}", g)  # 4 flushed + 2 pending
    ids = ["d0", "d5", "d3"]
    total = bank.sum(ids)
    for k in SHAPES:
        torch.testing.assert_close(total[k], sum(bank.get(i)[k] for i in ids), rtol=0, atol=1e-6)
    zeros = bank.sum([])
    assert all(torch.count_nonzero(v) == 0 and v.shape == SHAPES[k] for k, v in zeros.items())
    lists = [["d1"], [], ["d0", "d2", "d4"]]
    batch = bank.sum_batch(lists)
    for k, s in SHAPES.items():
        assert batch[k].shape == (3, *s)
        for b, lst in enumerate(lists):
            torch.testing.assert_close(batch[k][b], bank.sum(lst)[k], rtol=0, atol=0)


def test_overwrite_update(tmp_path):
    old, new = make_grads(2, seed=3)
    bank = new_bank(tmp_path)
    bank.add("x", old)
    with pytest.raises(BankError, match="overwrite=True"):
        bank.add("x", new)
    bank.flush()
    with pytest.raises(BankError, match="already in the bank"):
        bank.add("x", new)
    bank.add("x", new, overwrite=True)
    assert_exact(bank.get("x"), new)  # pending wins
    bank.close()
    bank = GradientBank.open(tmp_path)
    assert len(bank) == 1
    assert_exact(bank.get("x"), new)  # latest shard wins


def test_delete_and_compact(tmp_path):
    grads = make_grads(8, seed=4)
    bank = new_bank(tmp_path, shard_size=2)
    for i, g in enumerate(grads):
        bank.add(f"d{i}", g)
    bank.add("d7", grads[0], overwrite=True)  # pending overwrite of a flushed row
    bank.flush()
    bank.add("p", grads[1])  # pending only
    assert bank.delete(["d1", "d2", "d3", "p"]) == 4
    assert bank.delete("d4") == 1
    with pytest.raises(UnknownDocumentError, match="unknown document id 'nope'"):
        bank.delete(["d0", "nope"])
    assert "d0" in bank  # nothing deleted by the failed call
    with pytest.raises(KeyError):
        bank.get("d1")
    assert sorted(bank.ids()) == ["d0", "d5", "d6", "d7"]
    files_before = shard_files(tmp_path)
    size_before = sum(f.stat().st_size for f in files_before)
    bank.compact()
    files_after = shard_files(tmp_path)
    assert len(files_after) < len(files_before)
    assert sum(f.stat().st_size for f in files_after) < size_before
    bank.close()
    bank = GradientBank.open(tmp_path)
    assert bank.ids() == ["d0", "d5", "d6", "d7"]
    for i in (0, 5, 6):
        assert_exact(bank.get(f"d{i}"), grads[i])
    assert_exact(bank.get("d7"), grads[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["deleted"] == []
    bank.add("d1", grads[1])  # deleted ids can be added again
    assert_exact(bank.get("d1"), grads[1])


def test_resume_after_kill(tmp_path):
    grads = make_grads(10, seed=5)
    bank = GradientBank.open_or_create(tmp_path, binding=BINDING, shapes=SHAPES, storage_dtype="fp32",
                                       shard_size=4)
    for i in range(6):
        bank.add(f"d{i}", grads[i])  # d0..d3 auto-flushed, d4, d5 pending
    del bank  # "kill": no close()
    gc.collect()
    bank = GradientBank.open_or_create(tmp_path, binding=BINDING, shapes=SHAPES, storage_dtype="fp32",
                                       shard_size=4)
    assert len(bank) == 4
    assert all(f"d{i}" in bank for i in range(4)) and "d4" not in bank and "d5" not in bank
    added = []
    for i in range(10):  # the build loop: skip what is already stored
        if f"d{i}" not in bank:
            bank.add(f"d{i}", grads[i])
            added.append(i)
    assert added == [4, 5, 6, 7, 8, 9]
    bank.close()
    bank = GradientBank.open(tmp_path)
    assert len(bank) == 10
    for i in range(10):
        assert_exact(bank.get(f"d{i}"), grads[i])


def test_binding_mismatch(tmp_path):
    new_bank(tmp_path).close()
    other = dict(BINDING, base_model_fingerprint="def456")
    with pytest.raises(BankMismatchError, match="base_model_fingerprint") as ei:
        GradientBank.open(tmp_path, binding=other)
    assert "abc123" in str(ei.value) and "def456" in str(ei.value) and "meta_checkpoint" not in str(ei.value)
    with pytest.raises(BankMismatchError, match="storage_dtype"):
        GradientBank.open_or_create(tmp_path, binding=BINDING, shapes=SHAPES, storage_dtype="bf16")
    with pytest.raises(BankMismatchError, match="shape of"):
        GradientBank.open_or_create(tmp_path, binding=BINDING, shapes=dict(SHAPES, extra=(1, 2)),
                                    storage_dtype="fp32")
    with pytest.raises(BankError, match="already exists"):
        new_bank(tmp_path)


def test_invalid_input(tmp_path):
    bank = new_bank(tmp_path)
    (g,) = make_grads(1)
    key = "model.layers.0.mlp.gate_proj.lora_B"
    with pytest.raises(BankError, match=key):
        bank.add("a", dict(g, **{key: torch.zeros(2, 5)}))
    with pytest.raises(BankError, match="missing key"):
        bank.add("a", {k: v for k, v in g.items() if k != key})
    with pytest.raises(BankError, match="unexpected key 'bogus'"):
        bank.add("a", dict(g, bogus=torch.zeros(1)))
    with pytest.raises(ValueError, match="non-empty"):
        bank.add("", g)
    with pytest.raises(ValueError, match="must be str"):
        bank.add(3, g)  # type: ignore[arg-type]
    with pytest.raises(BankError, match="fp32, bf16, fp16, int8"):
        GradientBank.create(tmp_path / "x", binding=BINDING, shapes=SHAPES, storage_dtype="int4")
    with pytest.raises(BankError, match="batch"):
        bank.add_batch(["a", "a"], {k: torch.zeros(2, *s) for k, s in SHAPES.items()})
    assert len(bank) == 0


def test_open_missing(tmp_path):
    with pytest.raises(BankError, match="regrad build"):
        GradientBank.open(tmp_path / "nothing")


def test_two_workers_merge(tmp_path):
    grads = make_grads(7, seed=6)
    for w in range(2):
        with GradientBank.open_or_create(tmp_path, binding=BINDING, shapes=SHAPES, storage_dtype="fp32",
                                         shard_size=2, worker=w, num_workers=2) as bank:
            for i in range(w, 7, 2):
                bank.add(f"d{i}", grads[i])
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(BankError, match="merge"):
        GradientBank.open(tmp_path)
    merged = GradientBank.merge(tmp_path)
    assert merged.ids() == sorted(f"d{i}" for i in range(7))
    for i in range(7):
        assert_exact(merged.get(f"d{i}"), grads[i])
    assert not list(tmp_path.glob("manifest.w*.json"))
    assert {f.name[:10] for f in shard_files(tmp_path)} == {"shard-w000", "shard-w001"}


def test_merge_refuses_missing_worker_and_duplicates(tmp_path):
    grads = make_grads(3, seed=7)
    kw = dict(binding=BINDING, shapes=SHAPES, storage_dtype="fp32", num_workers=2)
    with GradientBank.create(tmp_path, worker=0, **kw) as bank:
        bank.add("a", grads[0])
        bank.add("shared", grads[1])
    with pytest.raises(BankError, match="worker"):
        GradientBank.merge(tmp_path)
    with GradientBank.create(tmp_path, worker=1, **kw) as bank:
        bank.add("b", grads[2])
        bank.add("shared", grads[1])
    with pytest.raises(BankError, match="'shared'"):
        GradientBank.merge(tmp_path)
    # different binding in a worker is refused too
    other = tmp_path / "other"
    GradientBank.create(other, worker=0, **kw).close()
    GradientBank.create(other, worker=1, **dict(kw, binding=dict(BINDING, meta_checkpoint="meta-v2"))).close()
    with pytest.raises(BankMismatchError, match="meta_checkpoint"):
        GradientBank.merge(other)


def test_context_manager_flushes_on_exception(tmp_path):
    grads = make_grads(2, seed=8)
    with pytest.raises(RuntimeError, match="boom"):
        with new_bank(tmp_path) as bank:
            bank.add("a", grads[0])
            bank.add("b", grads[1])
            raise RuntimeError("boom")
    bank = GradientBank.open(tmp_path)
    assert bank.ids() == ["a", "b"]
    assert_exact(bank.get("b"), grads[1])
    with pytest.raises(BankError, match="closed"):
        with new_bank(tmp_path / "c") as b2:
            pass
        b2.get("a")


def test_workers_extend_merged_bank(tmp_path):
    grads = make_grads(6, seed=9)
    kw = dict(binding=BINDING, shapes=SHAPES, storage_dtype="fp32", num_workers=2)
    for w in range(2):
        with GradientBank.open_or_create(tmp_path, worker=w, **kw) as bank:
            bank.add(f"d{w}", grads[w])
    GradientBank.merge(tmp_path).close()
    # second round: workers see the merged ids, add new ones, overwrite / delete merged ones
    for w in range(2):
        with GradientBank.open_or_create(tmp_path, worker=w, **kw) as bank:
            assert "d0" in bank and "d1" in bank
            bank.add(f"d{w + 2}", grads[w + 2])
            if w == 0:
                bank.add("d0", grads[5], overwrite=True)
            else:
                bank.delete("d1")
    merged = GradientBank.merge(tmp_path)
    assert merged.ids() == ["d0", "d2", "d3"]
    assert_exact(merged.get("d0"), grads[5])
    assert_exact(merged.get("d3"), grads[3])
