"""Content-aware rebuilds: changed text is recomputed (and only it), --update forces all, compact frees the disk."""

import json

import torch

from regrad_engine.bank import GradientBank
from regrad_engine.cli import main
from regrad_engine.store import Store, build_store
from tests.faults.conftest import DOCS, chunks, write_corpus


def bank_bytes(root) -> int:
    return sum(p.stat().st_size for p in (root / "bank").glob("*.safetensors"))


def test_a_changed_text_is_recomputed_and_only_it(store, tiny, tmp_path):
    model, meta, root = store
    before = {i: GradientBank.open(root / "bank").get(i) for i in DOCS}
    changed = dict(DOCS, doc2="Ailpelou Trask moved to Lima and now plays the trumpet.")
    stats = build_store(root, chunks(changed), model=model, meta_path=str(meta), doc_max_tokens=32,
                        storage_dtype="fp32", progress=False)
    assert (stats.added, stats.changed, stats.skipped) == (1, 1, len(DOCS) - 1)
    bank = GradientBank.open(root / "bank")
    assert any(not torch.equal(bank.get("doc2")[k], v) for k, v in before["doc2"].items())
    for doc_id in DOCS:
        if doc_id != "doc2":
            assert all(torch.equal(bank.get(doc_id)[k], v) for k, v in before[doc_id].items())
    fresh = tmp_path / "fresh"  # the new gradient is the one a build from scratch computes
    build_store(fresh, chunks({"doc2": changed["doc2"]}), model=model, meta_path=str(meta), doc_max_tokens=32,
                storage_dtype="fp32", progress=False)
    expected = GradientBank.open(fresh / "bank").get("doc2")
    assert all(torch.equal(bank.get("doc2")[k], v) for k, v in expected.items())
    assert Store.open(root).index().get("doc2").text == changed["doc2"]  # the index has the new text too
    again = build_store(root, chunks(changed), model=model, meta_path=str(meta), doc_max_tokens=32,
                        storage_dtype="fp32", progress=False)
    assert (again.added, again.skipped) == (0, len(DOCS))


def test_update_forces_all_and_compact_returns_the_disk(tiny, tmp_path, capsys, monkeypatch):
    model, meta = tiny
    import regrad_engine.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: model)
    root = tmp_path / "store"
    corpus = write_corpus(tmp_path / "c.jsonl")
    build = ["build", "--corpus", str(corpus), "--meta", str(meta), "--store", str(root), "--chunk-tokens", "32",
             "--storage-dtype", "fp32"]
    assert main(build) == 0
    count = len(GradientBank.open(root / "bank"))
    size = bank_bytes(root)
    capsys.readouterr()
    assert main([*build, "--update"]) == 0
    assert f"added {count} gradients" in capsys.readouterr().out
    assert bank_bytes(root) > 1.9 * size  # the replaced gradients are still on disk
    assert main(["compact", "--store", str(root)]) == 0
    assert "MB freed" in capsys.readouterr().out
    assert bank_bytes(root) < 1.05 * size
    assert GradientBank.verify(root / "bank").ok


def test_delete_with_compact_takes_the_gradient_off_the_disk(store, capsys):
    _, _, root = store
    doc0_file = json.loads((root / "bank" / "manifest.json").read_text())["shards"][0]["file"]
    assert main(["delete", "--store", str(root), "doc0", "--compact"]) == 0
    assert "off the disk" in capsys.readouterr().out
    manifest = json.loads((root / "bank" / "manifest.json").read_text())
    assert manifest["deleted"] == [] and "doc0" not in {i for ids in GradientBank.shard_contents(root / "bank").values()
                                                       for i in ids}
    assert not (root / "bank" / doc0_file).exists()
    assert "doc0" not in Store.open(root).index().ids()
