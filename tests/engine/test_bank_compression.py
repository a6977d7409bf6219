"""Compressed Gradient Banks (int8, int8-rank<q>) and the format-3 manifest: error bounds,
sizes from the stored bytes, integrity, verify/compact/merge, and older banks still opening."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from regrad_engine.bank import BankCorruptError, BankError, BankMismatchError, GradientBank, text_hash
from regrad_engine.compression import parse_storage

DATA = Path(__file__).parent / "data"
SHAPES = {
    "l0.lora_A": (4, 24),  # (r, in)
    "l0.lora_B": (20, 4),  # (out, r)
    "l1.bias": (12,),  # 1-D: stored as one row
}
LORA_SHAPES = {"A": (16, 576), "B": (1536, 16)}  # the 135M model's LoRA factors (rank 16)


def make_grads(n: int, shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((n, *s), generator=g) * 10 ** torch.empty(n, *[1] * len(s)).uniform_(-6, 2, generator=g)
            for k, s in shapes.items()}


def new_bank(path, storage: str, shapes=SHAPES, **kw) -> GradientBank:
    return GradientBank.create(path, binding={"m": "x"}, shapes=shapes, storage_dtype=storage, **kw)


def fill(bank: GradientBank, grads: dict[str, torch.Tensor], prefix: str = "d") -> list[str]:
    n = next(iter(grads.values())).shape[0]
    ids = [f"{prefix}{i}" for i in range(n)]
    bank.add_batch(ids, grads, text_hashes=[text_hash(i) for i in ids])
    return ids


def low_rank(n: int, shape, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, shape[0], rank, generator=g) @ torch.randn(n, rank, shape[1], generator=g)


def test_parse_storage_names_and_errors():
    assert parse_storage("BF16").name == "bf16" and parse_storage("float32").name == "fp32"
    assert parse_storage("int8").rank is None and parse_storage("int8-rank7").rank == 7
    for bad in ("int4", "int8-rank0", "int8-rank", "int8-r7", 8):
        with pytest.raises(ValueError, match="int8-rank"):
            parse_storage(bad)


def test_int8_error_is_at_most_half_a_step_per_row(tmp_path):
    grads = make_grads(6)
    with new_bank(tmp_path / "b", "int8") as bank:
        ids = fill(bank, grads)
    bank = GradientBank.open(tmp_path / "b")
    for n, i in enumerate(ids):
        got = bank.get(i)
        for k, s in SHAPES.items():
            x = grads[k][n].reshape(s[0], -1) if len(s) > 1 else grads[k][n].reshape(1, -1)
            # one scale per row along the short side: rows of A, columns of B
            step = (x.abs().amax(dim=1, keepdim=True) if x.shape[0] <= x.shape[1]
                    else x.abs().amax(dim=0, keepdim=True)) / 127
            err = (got[k].reshape(x.shape) - x).abs()
            assert got[k].dtype == torch.float32 and got[k].shape == s
            assert bool((err <= step / 2 * (1 + 1e-5) + 1e-30).all()), k


def test_int8_rank_is_exact_up_to_int8_on_low_rank_and_optimal_otherwise(tmp_path):
    exact = {k: low_rank(4, s, 2, seed=1) if len(s) == 2 else torch.randn(4, *s) for k, s in SHAPES.items()}
    full = make_grads(4, seed=2)
    with new_bank(tmp_path / "b", "int8-rank2") as bank:
        fill(bank, exact, "e")
        fill(bank, full, "f")
    bank = GradientBank.open(tmp_path / "b")
    for n in range(4):
        got = bank.get(f"e{n}")
        for k in SHAPES:
            x = exact[k][n]
            assert (got[k] - x).norm() <= 0.02 * x.norm(), k  # rank 2 holds it: int8 rounding only
        got = bank.get(f"f{n}")
        for k, s in SHAPES.items():
            x = full[k][n]
            if len(s) == 1:  # too small for factors: stored as dense int8
                assert (got[k] - x).norm() <= 0.01 * x.norm()
                continue
            tail = torch.linalg.svdvals(x)[2:].square().sum().sqrt()  # the best rank-2 error
            assert (got[k] - x).norm() <= tail + 0.02 * x.norm(), k


@pytest.mark.parametrize("storage, at_least", [("int8", 1.95), ("int8-rank7", 4.0), ("int8-rank4", 7.0)])
def test_size_against_bf16_from_the_stored_bytes(tmp_path, storage, at_least):
    grads = make_grads(8, LORA_SHAPES, seed=3)
    sizes = {}
    for kind in ("bf16", storage):
        with new_bank(tmp_path / kind, kind, LORA_SHAPES, shard_size=8) as bank:
            fill(bank, grads)
            expected_per_document = bank.nbytes_per_document()
        files = list((tmp_path / kind).glob("shard-*.safetensors"))
        sizes[kind] = sum(f.stat().st_size for f in files)
        assert len(files) == 1 and 8 * expected_per_document < sizes[kind] < 8 * expected_per_document + 4096
    assert sizes["bf16"] / sizes[storage] >= at_least, sizes


@pytest.mark.parametrize("storage", ["int8", "int8-rank2"])
def test_sum_batch_equals_the_sum_of_dequantised_gets(tmp_path, storage):
    grads = make_grads(7, seed=4)
    bank = new_bank(tmp_path / "b", storage, shard_size=4)
    ids = fill(bank, grads)  # 4 flushed, 3 pending: both paths
    lists = [[], ["d1"], ["d0", "d5", "d3"], ["d6", "d6", "d2"]]
    batch = bank.sum_batch(lists)
    for b, row in enumerate(lists):
        for k, s in SHAPES.items():
            expected = sum((bank.get(i)[k] for i in row), torch.zeros(s))
            torch.testing.assert_close(batch[k][b], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    pending = bank.get("d6")
    bank.close()
    reopened = GradientBank.open(tmp_path / "b")
    for k in SHAPES:  # a pending entry is already stored form: the same values before and after its flush
        assert torch.equal(reopened.get("d6")[k], pending[k])
    assert sorted(reopened.ids()) == sorted(ids)


def test_manifest_records_the_kind_and_a_mismatch_is_refused(tmp_path):
    new_bank(tmp_path / "b", "int8-rank3").close()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["storage_dtype"] == "int8-rank3"
    assert manifest["storage"] == {"kind": "int8", "values": "int8", "scales": "fp32",
                                   "scale_per": "row along the short side", "rank": 3}
    assert GradientBank.open(tmp_path / "b").storage_dtype == "int8-rank3"
    with pytest.raises(BankMismatchError, match="int8-rank3.*int8-rank4"):
        GradientBank.open_or_create(tmp_path / "b", binding={"m": "x"}, shapes=SHAPES, storage_dtype="int8-rank4")
    manifest["storage"]["rank"] = 5
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankCorruptError, match="'storage' record"):
        GradientBank.open(tmp_path / "b")


def test_non_finite_gradients_are_refused_in_int8(tmp_path):
    (g,) = [make_grads(1, seed=5)]
    g["l0.lora_A"][0, 1, 2] = float("inf")
    with new_bank(tmp_path / "b", "int8-rank2") as bank:
        with pytest.raises(BankError, match="NaN/Inf"):
            bank.add_batch(["x"], g)
        assert len(bank) == 0


def flip_bit(shard: Path, part: str, row: int) -> None:
    """Flip one bit in row ``row`` of a stored part, found through the safetensors header."""
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[part]["data_offsets"]
    rows = json.loads(data[8:8 + header_len])[part]["shape"][0]
    data[8 + header_len + start + row * (end - start) // rows] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_flipped_int8_byte_is_caught_and_repaired(tmp_path):
    with new_bank(tmp_path / "b", "int8-rank2") as bank:
        ids = fill(bank, make_grads(6, seed=6))
    flip_bit(next((tmp_path / "b").glob("shard-*.safetensors")), "l0.lora_B::v", 2)
    bank = GradientBank.open(tmp_path / "b")
    with pytest.raises(BankCorruptError, match="d2.*checksum"):
        bank.sum(["d0", "d2"])
    report = GradientBank.verify(tmp_path / "b")
    assert list(report.damaged) == ["d2"] and not report.ok
    assert GradientBank.verify(tmp_path / "b", repair=True).repaired
    bank = GradientBank.open(tmp_path / "b")
    assert GradientBank.verify(tmp_path / "b").ok and sorted(bank.ids()) == [i for i in ids if i != "d2"]


def test_a_nan_scale_behind_a_valid_checksum_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from regrad_engine.bank import entry_checksum
    from regrad_engine.shard_index import INDEX_PREFIX, ShardIndex

    with new_bank(tmp_path / "b", "int8") as bank:
        fill(bank, make_grads(2, seed=7))
    shard = next((tmp_path / "b").glob("shard-*.safetensors"))
    parts = {k: v for k, v in load_file(shard).items() if not k.startswith(INDEX_PREFIX)}
    parts["l0.lora_A::scale"][1, 0] = float("nan")
    sums = b"".join(bytes.fromhex(entry_checksum({k: v[row] for k, v in parts.items()})) for row in range(2))
    index, tensors = ShardIndex.build(shard.name, ["d0", "d1"], sums, [None, None])  # a forged, valid index
    save_file({**parts, **tensors}, shard, metadata={"regrad_index": index.digest})
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0].update(index=index.digest, bytes=shard.stat().st_size)
    path.write_text(json.dumps(manifest))
    bank = GradientBank.open(tmp_path / "b")
    assert bank.get("d0")["l0.lora_A"].isfinite().all()
    with pytest.raises(BankCorruptError, match="d1.*NaN"):
        bank.get("d1")


def test_compact_copies_compressed_bytes_unchanged(tmp_path):
    grads = make_grads(6, seed=8)
    bank = new_bank(tmp_path / "b", "int8-rank2", shard_size=2)
    fill(bank, grads)
    bank.flush()
    before = {i: bank.get(i) for i in ("d0", "d3", "d5")}
    bank.delete(["d1", "d2", "d4"])
    bank.compact()
    bank.close()
    bank = GradientBank.open(tmp_path / "b")
    assert list(GradientBank.shard_contents(tmp_path / "b").values()) == [["d0", "d3"], ["d5"]]
    assert sorted(bank.ids()) == ["d0", "d3", "d5"] and GradientBank.verify(tmp_path / "b").ok
    for i, values in before.items():
        for k in SHAPES:
            assert torch.equal(bank.get(i)[k], values[k])  # no second rounding
    assert bank.text_hash("d3") == text_hash("d3")


def test_two_workers_merge_a_compressed_bank(tmp_path):
    grads = make_grads(5, seed=9)
    kw = dict(binding={"m": "x"}, shapes=SHAPES, storage_dtype="int8", num_workers=2)
    for w in range(2):
        with GradientBank.open_or_create(tmp_path, worker=w, **kw) as bank:
            for i in range(w, 5, 2):
                bank.add(f"d{i}", {k: v[i] for k, v in grads.items()})
    with pytest.raises(BankMismatchError, match="storage_dtype"):
        GradientBank.open_or_create(tmp_path, **dict(kw, storage_dtype="int8-rank2", worker=0))
    merged = GradientBank.merge(tmp_path)
    assert merged.ids() == [f"d{i}" for i in range(5)] and merged.storage_dtype == "int8"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["storage"]["kind"] == "int8" and manifest["format_version"] == 3
    for i in range(5):
        for k in SHAPES:
            torch.testing.assert_close(merged.get(f"d{i}")[k], grads[k][i], rtol=0,
                                       atol=float(grads[k][i].abs().max()) / 200)


def test_a_format_2_bank_opens_verifies_and_is_extended(tmp_path):
    """tests/engine/data/bank_v2 was written by the format-2 bank (regrad before compressed kinds)."""
    path = tmp_path / "bank"
    shutil.copytree(DATA / "bank_v2", path)
    expected = json.loads((DATA / "bank_v2_expected.json").read_text())
    bank = GradientBank.open(path, binding={"model": "tiny"})
    assert bank.storage_dtype == "bf16" and bank.ids() == ["d0", "d1", "d2"]
    for doc_id, values in expected.items():
        for k, v in values.items():
            assert torch.equal(bank.get(doc_id)[k], torch.tensor(v))
    assert bank.text_hash("d0") == text_hash("text d0") and bank.text_hash("d1") is None
    assert GradientBank.verify(path).ok
    bank.add("d4", {k: torch.ones(s) for k, s in bank.shapes.items()}, text_hash=text_hash("four"))
    bank.close()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and ["ids" in s for s in manifest["shards"]] == [True, True, False]
    bank = GradientBank.open(path)
    assert bank.ids() == ["d0", "d1", "d2", "d4"] and bank.text_hash("d1") is None
    assert bank.text_hash("d4") == text_hash("four") and GradientBank.verify(path).ok
    for doc_id, values in expected.items():
        for k, v in values.items():
            assert torch.equal(bank.get(doc_id)[k], torch.tensor(v))


def test_text_hashes_must_be_what_text_hash_gives(tmp_path):
    with new_bank(tmp_path / "b", "int8") as bank:
        with pytest.raises(ValueError, match="32 hex digits"):
            bank.add("x", {k: torch.ones(s) for k, s in SHAPES.items()}, text_hash="not a hash")


def test_regrad_build_takes_the_storage_kind():
    from regrad_engine.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["build", "--store", "s", "--storage", "INT8-rank7"]).storage_dtype == "int8-rank7"
    assert parser.parse_args(["build", "--store", "s", "--storage-dtype", "fp16"]).storage_dtype == "fp16"
    assert parser.parse_args(["build", "--store", "s"]).storage_dtype == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "--store", "s", "--storage", "int4"])


def test_a_compressed_store_builds_serves_and_verifies(tokenizer, tmp_path):
    from tests.conftest import make_loaded_with_meta

    from regrad_engine.cli import main
    from regrad_engine.data import Chunk
    from regrad_engine.store import Store, build_store, open_engine

    chunks = [Chunk("a", "Velmora Quistan was born in Lisbon and plays the violin.", "a", 0),
              Chunk("b", "Fudral Oxby was born in Nairobi and plays the harmonica.", "b", 0)]
    model = make_loaded_with_meta(tokenizer, tmp_path / "meta")
    answers = {}
    for kind in ("fp32", "int8-rank2"):
        build_store(tmp_path / kind, chunks, model=model, meta_path=str(tmp_path / "meta"), doc_max_tokens=32,
                    storage_dtype=kind, progress=False)
        engine = open_engine(tmp_path / kind, model=model, on_the_fly=False)
        assert engine.bank.storage_dtype == kind
        answers[kind] = engine.answer("Who plays the harmonica?", k=1)
        assert main(["verify", "--store", str(tmp_path / kind)]) == 0
    assert answers["int8-rank2"].sources[0].id == answers["fp32"].sources[0].id == "b"
    with pytest.raises(BankMismatchError, match="storage_dtype"):  # a store keeps its kind
        build_store(tmp_path / "int8-rank2", chunks, model=model, meta_path=str(tmp_path / "meta"),
                    doc_max_tokens=32, storage_dtype="bf16", progress=False)
    assert Store.open(tmp_path / "int8-rank2").compact() >= 0
