"""Bank builds on Ray (local cluster, tiny model): the same bank as a plain build, every document
exactly once after a worker is killed mid-build, and a build whose driver died continued by the CLI."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from regrad_engine.bank import GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.chunking import chunk_documents
from regrad_engine.cli import main
from regrad_engine.data import read_corpus
from regrad_engine.errors import CheckpointError, StoreError
from regrad_engine.files import LockHeld, WriterLock
from regrad_engine.lora import LoraSpace, init_step_sizes
from regrad_engine.models import load_model
from regrad_engine.store import Store, build_store
from tests.conftest import make_model, make_space, make_tokenizer, random_phi
from tests.faults.conftest import DOCS, chunks, write_corpus

ray = pytest.importorskip("ray")
from regrad_engine.ray_build import ModelSpec, _slice_count, build_store_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUILD = dict(doc_max_tokens=32, storage_dtype="fp32", batch_size=1, flush_every=1)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (startup takes seconds); its address, for other drivers."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, meta checkpoint directory, the model as load_model returns it): the tiny
    Llama saved, so every actor loads it with the real loader."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    make_model(tokenizer, attn="sdpa").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    loaded = load_model(str(root / "model"))
    space = make_space(loaded.model)
    phi = random_phi(space, dtype=torch.float32)
    MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 1.0), alpha_mode="tie", lora=space.spec(),
                   base_model=loaded.name, base_fingerprint=loaded.fingerprint).save(root / "meta")
    space.remove()
    return root / "model", root / "meta", loaded


@dataclass(frozen=True)
class DyingSpec(ModelSpec):
    """The real loader, whose first actor to start a document after the manifests list ``after``
    shards records them, then dies (SIGKILL); with ``stall`` it hangs there instead (so that its
    driver can be killed mid-build). Once ``marker`` exists, actors live."""

    marker: str = ""
    after: int = 2
    stall: bool = False

    def __call__(self):
        loaded = super().__call__()
        if Path(self.marker).exists():
            return loaded
        bank = Path(self.marker).parent / "store" / "bank"

        def hook(module, args):
            flushed = committed_shards(bank)
            if len(flushed) < self.after:
                return
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another actor died already
                return
            os.write(fd, json.dumps(flushed).encode())
            os.close(fd)
            if self.stall:
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)

        loaded.model.get_input_embeddings().register_forward_pre_hook(hook)
        return loaded


def committed_shards(bank: Path) -> list[str]:
    """The shard files the bank's manifests (main and workers') list."""
    return sorted(s["file"] for m in bank.glob("manifest*.json") for s in json.loads(m.read_text())["shards"])


def assert_every_document_once(store: Path, ids: list[str]) -> list[dict]:
    manifest = json.loads((store / "bank" / "manifest.json").read_text())
    counts = collections.Counter(i for ids in GradientBank.shard_contents(store / "bank").values() for i in ids)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, counts
    assert not list((store / "bank").glob("manifest.w*.json"))  # merged
    report, no_gradient, orphans = Store.open(store).verify()
    assert report.ok and not report.stray_files and no_gradient == [] and orphans == [], report
    return manifest["shards"]


def test_a_killed_worker_loses_and_repeats_nothing_and_the_bank_equals_a_plain_build(cluster, tiny, tmp_path):
    model_dir, meta, loaded = tiny
    spec = DyingSpec(str(model_dir), marker=str(tmp_path / "killed"))
    stats = build_store_ray(tmp_path / "store", chunks(), loader=spec, meta_path=meta, workers=1, slices=2, **BUILD)
    flushed_before_kill = json.loads((tmp_path / "killed").read_text())
    assert flushed_before_kill  # the worker died mid-build, after some of its documents were flushed
    shards = assert_every_document_once(tmp_path / "store", list(DOCS))
    assert set(flushed_before_kill) <= {s["file"] for s in shards}  # kept, not recomputed
    # 2 slices of 4 documents, one document a shard: the killed attempt had flushed 2 of its slice,
    # the retry computed only the other 2
    assert (stats.added, stats.skipped) == (6, 2)

    build_store(tmp_path / "plain", chunks(), model=loaded, meta_path=str(meta), progress=False, **BUILD)
    ray_bank, plain_bank = GradientBank.open(tmp_path / "store" / "bank"), GradientBank.open(tmp_path / "plain" / "bank")
    assert ray_bank.binding == plain_bank.binding and ray_bank.ids() == plain_bank.ids()
    for doc_id in DOCS:
        for key, value in plain_bank.get(doc_id).items():
            torch.testing.assert_close(ray_bank.get(doc_id)[key], value, rtol=1e-5, atol=1e-7)
    assert Store.open(tmp_path / "store").index().ids() == sorted(DOCS)
    assert Store.open(tmp_path / "store").model_name == loaded.name


def test_a_build_whose_driver_died_is_continued_by_the_cli(cluster, tiny, tmp_path):
    model_dir, meta, loaded = tiny
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    ids = [c.id for c in chunk_documents(read_corpus(corpus), loaded.tokenizer, max_tokens=32)]
    store = tmp_path / "store"
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests' / 'engine')!r}]
        import ray
        from regrad_engine.chunking import chunk_documents
        from regrad_engine.data import read_corpus
        from regrad_engine.ray_build import build_store_ray
        import test_ray_build
        from test_ray_build import BUILD, DyingSpec

        ray.cloudpickle.register_pickle_by_value(test_ray_build)
        spec = DyingSpec({str(model_dir)!r}, marker={str(tmp_path / 'stalled')!r}, stall=True)
        ray.init(address={cluster!r}, log_to_driver=False)
        chunks = chunk_documents(read_corpus({str(corpus)!r}), spec.tokenizer(), max_tokens=32)
        build_store_ray({str(store)!r}, chunks, loader=spec, meta_path={str(meta)!r}, workers=1, slices=2, **BUILD)
        """)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "stalled").exists():
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the build never flushed two documents"
            time.sleep(0.2)
    finally:
        driver.kill()  # the driver dies mid-build; Ray ends its actors
        driver.wait()
    flushed = committed_shards(store / "bank")
    assert flushed and not (store / "bank" / "manifest.json").exists()  # nothing committed to the bank yet
    wait_for_writers_to_die(store / "bank", slices=2)

    out = subprocess.run([sys.executable, "-m", "regrad_engine.cli", "build", "--ray", cluster, "--corpus", str(corpus),
                          "--meta", str(meta), "--store", str(store), "--model", str(model_dir), "--chunk-tokens", "32",
                          "--storage-dtype", "fp32", "--batch-size", "1", "--num-workers", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    added, skipped = map(int, re.search(r"added (\d+) gradients.*?(\d+) already in the bank", out.stdout).groups())
    assert (added, skipped) == (len(ids) - 2, 2)  # the two chunks flushed before the driver died
    shards = assert_every_document_once(store, ids)
    assert set(flushed) <= {s["file"] for s in shards}


def wait_for_writers_to_die(bank: Path, slices: int, timeout: float = 60) -> None:
    """Until the killed driver's actors are gone (a dead writer's OS lock goes with it)."""
    deadline = time.monotonic() + timeout
    for worker in range(slices):
        lock = WriterLock(bank / f".writer.w{worker:03d}.lock")
        while True:
            try:
                lock.acquire()
                lock.release()
                break
            except LockHeld:
                assert time.monotonic() < deadline, f"worker {worker}'s actor outlived its driver"
                time.sleep(0.2)


def test_an_actors_error_reaches_the_caller_as_itself(cluster, tiny, tmp_path):
    model_dir, meta, loaded = tiny
    other = tmp_path / "other-meta"  # a checkpoint of another base model
    checkpoint = MetaCheckpoint.load(meta)
    checkpoint.base_fingerprint = "0" * 16
    checkpoint.save(other)
    with pytest.raises(CheckpointError, match="fingerprint"):
        build_store_ray(tmp_path / "store", chunks(), loader=ModelSpec(str(model_dir)), meta_path=other, workers=1,
                        slices=2, **BUILD)


def test_an_unfinished_build_keeps_its_slice_count(tmp_path, tiny):
    model_dir, meta, loaded = tiny
    space = LoraSpace.attach(loaded.model, MetaCheckpoint.load(meta).lora)
    for worker in range(3):  # what a build of 3 slices leaves when its driver dies
        GradientBank.create(tmp_path / "bank", binding={}, shapes=space.shapes, worker=worker, num_workers=3).close()
    space.remove()
    assert _slice_count(tmp_path / "bank", None, workers=8) == 3
    with pytest.raises(StoreError, match="unfinished build of 3 slices"):
        _slice_count(tmp_path / "bank", 5, workers=1)
    assert _slice_count(tmp_path / "fresh", None, workers=2) == 8
    with pytest.raises(StoreError, match="between 2 and 1000"):
        _slice_count(tmp_path / "fresh", 1, workers=1)


def test_cli_refuses_ray_with_a_hand_made_worker(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert main(["build", "--ray", "--worker", "1", "--num-workers", "2", "--corpus", str(corpus), "--meta", "m",
                 "--store", str(tmp_path / "s")]) == 2
    assert "--ray runs every worker itself" in capsys.readouterr().err
