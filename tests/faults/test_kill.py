"""kill -9 at 20 random moments of a build: every resumed build ends bit-equal to an uninterrupted one."""

import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from regrad_engine.bank import GradientBank
from regrad_engine.store import build_store
from tests.faults.conftest import FACTS, chunks

ROOT = Path(__file__).resolve().parents[2]
DOCS = {f"d{i:02d}": f"Note {i}: {FACTS[i % 8][0]} plays the {FACTS[i % 8][2]} on day {i} in {FACTS[(i * 3) % 8][1]}."
        for i in range(24)}
SETTINGS = dict(doc_max_tokens=32, storage_dtype="fp32", batch_size=2, flush_every=2, progress=False)

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.conftest import make_model, make_tokenizer
    from tests.faults.test_kill import DOCS, SETTINGS
    from tests.faults.conftest import chunks
    import regrad_engine.store as store
    from regrad_engine.models import LoadedModel, model_fingerprint

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, attn="sdpa")
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", fingerprint=model_fingerprint(model))
    compute = store.document_gradients
    def slow(*args, **kwargs):  # 12 batches of 50 ms: room for kills at every stage of the build
        time.sleep(0.05)
        return compute(*args, **kwargs)
    store.document_gradients = slow
    print("ready", flush=True)
    store.build_store({out!r}, chunks(DOCS), model=loaded, meta_path={meta!r}, **SETTINGS)
    print("done", flush=True)
""")


def entries(bank_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    bank = GradientBank.open(bank_dir)
    return {i: bank.get(i) for i in bank.ids()}


def test_killed_builds_resume_bit_equal(tiny, tmp_path):
    model, meta = tiny
    build_store(tmp_path / "reference", chunks(DOCS), model=model, meta_path=str(meta), **SETTINGS)
    reference = entries(tmp_path / "reference" / "bank")
    rng = random.Random(11)
    reused = []
    for trial in range(20):
        out = tmp_path / f"trial{trial}"
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), out=str(out), meta=str(meta))],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.9))
        child.kill()  # SIGKILL: no cleanup, no flush
        child.wait()
        stats = build_store(out, chunks(DOCS), model=model, meta_path=str(meta), **SETTINGS)
        reused.append(stats.skipped)
        assert stats.added + stats.skipped == len(DOCS)
        rows = [i for ids in GradientBank.shard_contents(out / "bank").values() for i in ids]
        assert sorted(rows) == sorted(DOCS), trial  # nothing lost, nothing computed twice
        resumed = entries(out / "bank")
        assert resumed.keys() == reference.keys()
        for doc_id, grad in reference.items():
            for key, value in grad.items():
                assert torch.equal(resumed[doc_id][key], value), (trial, doc_id, key)
        assert GradientBank.verify(out / "bank").ok
        assert not list((out / "bank").glob("*.tmp"))  # a torn write's leftovers are cleared
        shutil.rmtree(out)
    assert max(reused) > 0 and min(reused) < len(DOCS)  # kills landed before, during and late in the builds
