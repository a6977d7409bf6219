"""One writer at a time: a second writer is refused with the holder's name, a dead writer leaves no lock."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from regrad_engine.bank import GradientBank
from regrad_engine.cli import main
from regrad_engine.errors import BankLockedError
from tests.faults.conftest import write_corpus

SHAPES = {"a": (2, 3)}
ROOT = Path(__file__).resolve().parents[2]


def grad(value: float) -> dict:
    return {"a": torch.full((2, 3), value)}


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    with GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32") as first:
        first.add("x", grad(1.0))
        with pytest.raises(BankLockedError, match=rf"pid {os.getpid()} on host"):
            GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32")
        reader = GradientBank.open(tmp_path / "b")  # readers need no lock
        with pytest.raises(BankLockedError, match="being written"):
            reader.add("y", grad(2.0))  # its first write asks for the lock
    again = GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32")
    again.add("y", grad(2.0))
    again.close()
    bank = GradientBank.open(tmp_path / "b")
    assert bank.ids() == ["x", "y"] and torch.equal(bank.get("x")["a"], grad(1.0)["a"])


def test_interleaved_writers_never_mix_documents(tmp_path):
    GradientBank.create(tmp_path / "b", binding={}, shapes=SHAPES, storage_dtype="fp32").close()
    one, two = GradientBank.open(tmp_path / "b"), GradientBank.open(tmp_path / "b")
    one.add("one", grad(1.0))
    one.flush()
    with pytest.raises(BankLockedError):
        two.add("two", grad(2.0))
    one.close()
    two.add("two", grad(2.0))  # now it may: it continues from the manifest one wrote
    two.close()
    bank = GradientBank.open(tmp_path / "b")
    assert bank.ids() == ["one", "two"]
    assert bank.get("one")["a"].unique().tolist() == [1.0] and bank.get("two")["a"].unique().tolist() == [2.0]
    names = [s.file for s in bank._shards]
    assert len(set(names)) == len(names) == 2  # each writer session names its own shards


def test_a_killed_writer_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from regrad_engine.bank import GradientBank
        bank = GradientBank.create({str(tmp_path / 'b')!r}, binding={{}}, shapes={{"a": (2, 3)}})
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BankLockedError, match=f"pid {holder.pid}"):
            GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES)
    finally:
        holder.kill()
        holder.wait()
    GradientBank.open_or_create(tmp_path / "b", binding={}, shapes=SHAPES).close()  # kill -9 released it


def test_two_builds_at_once_the_second_stops_with_a_message(store, tmp_path, capsys, monkeypatch):
    model, meta, root = store
    import regrad_engine.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: model)
    with GradientBank.open(root / "bank") as running:  # another build is writing
        running.begin_writing()
        corpus = write_corpus(tmp_path / "c.jsonl")
        code = main(["build", "--corpus", str(corpus), "--meta", str(meta), "--store", str(root),
                     "--chunk-tokens", "32", "--storage-dtype", "fp32"])
        err = capsys.readouterr().err
    assert code == 2 and "being written by pid" in err and "Traceback" not in err
