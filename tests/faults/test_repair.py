"""Repair and long-lived writers: what verify/compact/delete/write-back must never do."""

import json

import pytest
import torch

import regrad_engine.files as files
from regrad_engine.bank import GradientBank
from regrad_engine.cli import main
from regrad_engine.errors import BankError, RequestError
from regrad_engine.store import Store, build_store, open_engine
from tests.faults.conftest import DOCS, chunks, shards

SHAPES = {"a": (2, 3)}


def grad(value: float) -> dict:
    return {"a": torch.full((2, 3), value)}


def test_verify_reports_a_truncated_shard_and_repair_exits_zero(store, capsys):
    _, _, root = store
    path = shards(root)[2]
    path.write_bytes(path.read_bytes()[:-50])
    assert main(["verify", "--store", str(root)]) == 1  # a report, not a crash
    out = capsys.readouterr().out
    assert path.name in out and "truncated" in out
    assert main(["verify", "--store", str(root), "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out and not path.exists()
    assert main(["verify", "--store", str(root)]) == 0


def test_repair_never_brings_back_an_older_gradient(tmp_path):
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32") as bank:
        bank.add("x", grad(1.0))
        bank.flush()
        bank.add("x", grad(2.0), overwrite=True)  # the newer row, in a second shard
    newest = tmp_path / "b" / json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"][-1]["file"]
    newest.write_bytes(newest.read_bytes()[:-8])
    report = GradientBank.verify(tmp_path / "b", repair=True)
    assert "x" in report.damaged and report.repaired
    assert "x" not in GradientBank.open(tmp_path / "b")  # gone (a rebuild recomputes it), not the old 1.0


def test_stray_shard_files_are_reported_and_removed(store):
    _, _, root = store
    (root / "bank" / "shard-m-deadbeef-000000.safetensors").write_bytes(b"left by a killed flush")
    report = GradientBank.verify(root / "bank")
    assert report.stray_files == ["shard-m-deadbeef-000000.safetensors"]
    GradientBank.verify(root / "bank", repair=True)
    assert not (root / "bank" / "shard-m-deadbeef-000000.safetensors").exists()


def test_compact_waits_for_the_workers_merge(tmp_path):
    GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32").close()
    for worker in (0, 1):
        with GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32",
                                         worker=worker, num_workers=2) as part:
            part.add(f"w{worker}", grad(3.0 + worker))
    with pytest.raises(BankError, match="merge"):
        GradientBank.open(tmp_path / "b").compact()
    GradientBank.merge(tmp_path / "b")
    bank = GradientBank.open(tmp_path / "b")
    bank.compact()
    assert bank.get("w0")["a"].unique().tolist() == [3.0] and bank.get("w1")["a"].unique().tolist() == [4.0]


def test_a_failed_holder_record_releases_the_lock(tmp_path, monkeypatch):
    GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES).close()
    bank = GradientBank.open(tmp_path / "b")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files, "atomic_write_json", full)
        with pytest.raises(OSError):
            bank.add("x", grad(1.0))
    assert not bank._lock.held
    GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES).close()  # nobody holds it


def test_write_back_records_the_text_and_gives_the_lock_back(store, tmp_path):
    model, meta, root = store
    Store.open(root).delete(["doc1"])
    Store.open(root).index().add([{"id": "doc1", "text": DOCS["doc1"]}])  # indexed, no gradient
    engine = open_engine(root, model=model, write_back=True)
    engine.answer("Where was Fudral Oxby born?", k=1)
    assert "doc1" in GradientBank.open(root / "bank") and not engine.bank._lock.held
    changed = dict(DOCS, doc1="Fudral Oxby moved to Oslo.")
    stats = build_store(root, chunks(changed), model=model, meta_path=str(meta), doc_max_tokens=32,
                        storage_dtype="fp32", progress=False)  # the server keeps running: no lock in the way
    assert (stats.added, stats.changed) == (1, 1)  # the written-back gradient's text is known, so it is replaced


def test_a_non_finite_on_the_fly_gradient_is_refused(store, monkeypatch):
    model, _, root = store
    Store.open(root).delete(["doc0"])
    Store.open(root).index().add([{"id": "doc0", "text": DOCS["doc0"]}])
    engine = open_engine(root, model=model)
    real = engine.document_gradients

    def poisoned(hits, batch_size=8):
        return {d: {k: torch.full_like(v, float("nan")) for k, v in g.items()} for d, g in real(hits, batch_size).items()}

    monkeypatch.setattr(engine, "document_gradients", poisoned)
    with pytest.raises(RequestError, match="non-finite"):
        engine.answer("Where was Velmora Quistan born?", k=1)


def test_delete_after_a_half_done_delete_still_works(store):
    _, _, root = store
    with GradientBank.open(root / "bank") as bank:
        bank.delete(["doc0"])  # a delete killed before it reached the index
    assert "doc0" in Store.open(root).index().ids()
    assert Store.open(root).delete(["doc0"], compact=True) == 1
    assert "doc0" not in Store.open(root).index().ids() and GradientBank.verify(root / "bank").ok


def test_a_missing_index_is_an_error_and_repair_keeps_the_bank(store, capsys):
    import shutil

    from regrad_engine.errors import RetrievalError

    model, _, root = store
    shutil.rmtree(root / "index")
    with pytest.raises(RetrievalError, match="no BM25 index"):
        open_engine(root, model=model)
    assert main(["verify", "--store", str(root), "--repair"]) == 2
    assert "no BM25 index" in capsys.readouterr().err
    assert len(GradientBank.open(root / "bank")) == len(DOCS)  # nothing taken for an orphan
    assert not (root / "index").exists()  # and no empty index made up in its place
