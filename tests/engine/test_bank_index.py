"""The bank's row index (format 3): lookups by id hash, overwrites and deletions across
shards, hash collisions, a damaged index, and the manifest record of a shard."""

from __future__ import annotations

import json

import pytest
import torch

import regrad_engine.bank as bank_module
import regrad_engine.shard_index as shard_index
from regrad_engine.bank import BankCorruptError, GradientBank, text_hash

SHAPES = {"a": (2, 3)}


def grad(value: float) -> dict:
    return {"a": torch.full((2, 3), float(value))}


def value(bank: GradientBank, doc_id: str) -> float:
    return bank.get(doc_id)["a"][0, 0].item()


def churn(bank: GradientBank) -> dict[str, float]:
    """Adds, overwrites and deletes over several shards; returns what must be alive."""
    expected = {}
    for n in range(12):
        bank.add(f"d{n}", grad(n), text_hash=text_hash(f"t{n}"))
        expected[f"d{n}"] = n
    bank.flush()
    for n in (1, 5, 9):
        bank.add(f"d{n}", grad(100 + n), overwrite=True)
        expected[f"d{n}"] = 100 + n
    bank.flush()
    bank.delete(["d2", "d5"])
    del expected["d2"], expected["d5"]
    bank.add("d2", grad(202))  # deleted, then added again
    expected["d2"] = 202
    bank.flush()
    return expected


def check(bank: GradientBank, expected: dict[str, float]) -> None:
    assert bank.ids() == sorted(expected) and len(bank) == len(expected)
    assert all(value(bank, i) == v for i, v in expected.items())
    assert "d5" not in bank and "nope" not in bank and 3 not in bank
    assert bank.text_hash("d3") == text_hash("t3") and bank.text_hash("d1") is None  # overwritten without one


@pytest.mark.parametrize("collide", [False, True])
def test_lookups_follow_overwrites_and_deletes(tmp_path, monkeypatch, collide):
    if collide:  # every id has the same hash: the lookup must still compare the ids
        monkeypatch.setattr(shard_index, "id_hash", lambda doc_id: 7)
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32", shard_size=5) as bank:
        expected = churn(bank)
        check(bank, expected)
    check(GradientBank.open(tmp_path / "b"), expected)


def test_a_lookup_extended_shard_by_shard_equals_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_module, "_REBUILD_ROWS", 4)  # rebuild after every few flushes
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32", shard_size=2) as bank:
        expected = churn(bank)
        check(bank, expected)
    check(GradientBank.open(tmp_path / "b"), expected)


def test_a_shard_record_holds_rows_ids_and_the_index_checksum(tmp_path):
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32") as bank:
        bank.add_batch(["x", "y#0"], {"a": torch.ones(2, 2, 3)})
    (record,) = json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"]
    assert record["rows"] == 2 and record["row_ids"] == "x\0y#0" and len(record["index"]) == 32
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / record["file"]), framework="pt") as f:
        assert f.metadata()["regrad_index"] == record["index"]
    assert GradientBank.shard_contents(tmp_path / "b") == {record["file"]: ["x", "y#0"]}
    with pytest.raises(ValueError, match="NUL"):
        GradientBank.open(tmp_path / "b").add("a\0b", grad(1.0))


def test_a_damaged_row_index_is_refused_and_repair_keeps_old_copies_out(tmp_path):
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32") as bank:
        bank.add("x", grad(1.0))
        bank.add("y", grad(2.0))
        bank.flush()
        bank.add("x", grad(3.0), overwrite=True)  # the newer row, in a second shard
    newest = json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"][-1]["file"]
    path = tmp_path / "b" / newest
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header])["__regrad__/sums"]["data_offsets"]
    data[8 + header + start] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BankCorruptError, match="row index"):
        GradientBank.open(tmp_path / "b")
    report = GradientBank.verify(tmp_path / "b", repair=True)
    assert report.damaged_shards == {newest: report.damaged_shards[newest]} and "x" in report.damaged
    bank = GradientBank.open(tmp_path / "b")
    assert bank.ids() == ["y"] and value(bank, "y") == 2.0  # x is gone, not back at its old 1.0
