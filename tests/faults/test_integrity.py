"""A damaged bank is never served: flipped bytes, NaN, swapped or truncated shards, broken manifests."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from regrad_engine.bank import GradientBank, entry_checksum
from regrad_engine.cli import main
from regrad_engine.errors import BankCorruptError, BankError, StoreError
from regrad_engine.shard_index import INDEX_PREFIX, ShardIndex
from regrad_engine.store import build_store, open_engine
from tests.faults.conftest import DOCS, chunks, shards

QUESTION = "Where was Velmora Quistan born?"


def flip_a_byte(path, at=-20):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_never_served_and_verify_repairs_it(store, capsys):
    model, meta, root = store
    before = open_engine(root, model=model).answer(QUESTION, k=1)
    damaged = shards(root)[0]  # doc0's gradient
    flip_a_byte(damaged)
    engine = open_engine(root, model=model)  # the header is intact: opening is fine
    with pytest.raises(BankCorruptError, match=r"doc0.*checksum.*regrad verify"):
        engine.answer(QUESTION, k=1)
    assert main(["verify", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    assert "doc0" in out and "checksum" in out and "--repair" in out
    assert main(["verify", "--store", str(root), "--repair"]) == 0
    assert "doc0" in capsys.readouterr().out
    assert not damaged.exists()  # compacted away
    assert GradientBank.verify(root / "bank").ok
    stats = build_store(root, chunks(), model=model, meta_path=str(meta), doc_max_tokens=32, storage_dtype="fp32",
                        progress=False)
    assert (stats.added, stats.skipped) == (1, len(DOCS) - 1)  # exactly the dropped one is recomputed
    again = open_engine(root, model=model).answer(QUESTION, k=1)
    assert again.text == before.text and [h.id for h in again.sources] == [h.id for h in before.sources]


def test_nan_stored_behind_a_valid_checksum_is_refused(store):
    model, _, root = store
    path = shards(root)[0]
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(INDEX_PREFIX)}
    key = sorted(tensors)[0]
    tensors[key][0].view(-1)[0] = float("nan")
    checksum = bytes.fromhex(entry_checksum({k: v[0] for k, v in tensors.items()}))
    index, index_tensors = ShardIndex.build(path.name, ["doc0"], checksum, [None])  # a valid row index
    save_file({**tensors, **index_tensors}, path, metadata={"regrad_index": index.digest})
    manifest_path = root / "bank" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0].update(index=index.digest, bytes=path.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BankCorruptError, match="NaN"):
        open_engine(root, model=model).answer(QUESTION, k=1)


def test_non_finite_gradients_are_refused_at_write_time(tmp_path):
    shapes = {"a": (2, 3)}
    with GradientBank.create(tmp_path / "b", binding={}, shapes=shapes, storage_dtype="fp16") as bank:
        with pytest.raises(BankError, match="NaN/Inf"):
            bank.add("x", {"a": torch.full((2, 3), float("nan"))})
        with pytest.raises(BankError, match="NaN/Inf"):  # finite in fp32, inf once stored in fp16
            bank.add("y", {"a": torch.full((2, 3), 1e6)})
        assert len(bank) == 0


def test_swapped_shards_are_refused_when_opening(store):
    model, _, root = store
    first, second = shards(root)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(BankCorruptError, match="swapped"):
        open_engine(root, model=model)


def test_a_truncated_shard_is_refused_when_opening(store):
    model, _, root = store
    path = shards(root)[3]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BankCorruptError, match="truncated"):
        open_engine(root, model=model)
    report = GradientBank.verify(root / "bank", repair=True)
    assert list(report.damaged_shards) == [path.name] and report.repaired
    assert GradientBank.verify(root / "bank").ok and "doc3" not in GradientBank.open(root / "bank")


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("shapes"), "no 'shapes'"),
    (lambda m: m["shards"][0].pop("index"), "lacks file/ids"),
    (lambda m: m["shards"][0].update(rows="1"), "lacks file/ids"),
])
def test_a_broken_manifest_is_named(store, damage, message):
    model, _, root = store
    path = root / "bank" / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BankCorruptError, match=message):
        open_engine(root, model=model)


def test_unreadable_manifest_and_store_file_give_messages(store, capsys):
    model, _, root = store
    (root / "regrad.json").write_text("{oops")
    assert main(["verify", "--store", str(root)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    with pytest.raises(StoreError):
        open_engine(root, model=model)
    (root / "regrad.json").unlink()
    (root / "bank" / "manifest.json").write_text("not json")
    with pytest.raises(BankCorruptError, match="not valid JSON"):
        GradientBank.open(root / "bank")
