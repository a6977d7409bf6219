"""I/O faults end in a message that says what to do: disk full, read-only store, a file for a directory,
a byte-order mark, a missing checkpoint; shards are as readable as the manifest."""

import errno
import json
import os
import stat

import pytest

from regrad_engine import files
from regrad_engine.cli import main
from regrad_engine.data import read_corpus
from tests.faults.conftest import DOCS, write_corpus


@pytest.fixture()
def cli_model(tiny, monkeypatch):
    import regrad_engine.cli as cli

    model, meta = tiny
    monkeypatch.setattr(cli, "_load", lambda *a, **k: model)
    return model, meta


def build_argv(corpus, meta, store, chunk_tokens=64):
    return ["build", "--corpus", str(corpus), "--meta", str(meta), "--store", str(store), "--chunk-tokens",
            str(chunk_tokens), "--storage-dtype", "fp32"]


def test_disk_full_during_a_build(cli_model, tmp_path, capsys, monkeypatch):
    _, meta = cli_model
    real = files.atomic_write

    def full(path, data):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr("regrad_engine.bank.atomic_write", full)
    assert main(build_argv(write_corpus(tmp_path / "c.jsonl"), meta, tmp_path / "store")) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "run the same command again" in err and "Traceback" not in err
    monkeypatch.undo()


def test_a_read_only_store(store, cli_model, tmp_path, capsys, monkeypatch):
    _, meta, root = store

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(files.WriterLock, "acquire", refuse)  # as root, chmod cannot make a directory read-only
    corpus = write_corpus(tmp_path / "c.jsonl", dict(DOCS, extra="A brand new document about Velmora Quistan."))
    assert main(build_argv(corpus, meta, root, 32)) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(["delete", "--store", str(root), "doc1"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_a_store_that_is_a_file_and_a_missing_checkpoint(cli_model, tmp_path, capsys):
    _, meta = cli_model
    (tmp_path / "file").write_text("")
    corpus = write_corpus(tmp_path / "c.jsonl")
    assert main(build_argv(corpus, meta, tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["ask", "--store", str(tmp_path / "file"), "Who?"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(build_argv(corpus, tmp_path / "no-such-checkpoint", tmp_path / "s")) == 2
    err = capsys.readouterr().err
    assert "no meta checkpoint" in err and "--meta" in err


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS.items()), encoding="utf-8-sig")
    assert [d["id"] for d in read_corpus(path)] == list(DOCS)


def test_shards_are_as_readable_as_the_manifest(store):
    _, _, root = store
    manifest_mode = stat.S_IMODE(os.stat(root / "bank" / "manifest.json").st_mode)
    for shard in (root / "bank").glob("*.safetensors"):
        assert stat.S_IMODE(os.stat(shard).st_mode) == manifest_mode


def test_disk_full_while_writing_the_index_then_the_same_command_finishes(cli_model, tmp_path, capsys, monkeypatch):
    _, meta = cli_model
    from regrad_engine.retrieval.bm25 import BM25Index
    from regrad_engine.store import Store

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "docs.jsonl"))

    argv = build_argv(write_corpus(tmp_path / "c.jsonl"), meta, tmp_path / "store")
    with monkeypatch.context() as patch:
        patch.setattr(BM25Index, "_append", full)
        assert main(argv) == 2
        assert "disk is full" in capsys.readouterr().err
    _, no_gradient, orphans = Store.open(tmp_path / "store").verify()
    assert orphans and not no_gradient  # the gradients were kept; the index is what is missing
    assert main(argv) == 0
    assert "added 0 gradients" in capsys.readouterr().out  # nothing recomputed
    assert main(["ask", "--store", str(tmp_path / "store"), "--model", "tiny", "Where was Velmora Quistan born?"]) == 0
    assert "sources=[]" not in capsys.readouterr().out
    assert Store.open(tmp_path / "store").verify()[2] == []
