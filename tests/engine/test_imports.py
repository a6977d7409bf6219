"""The public API and the shape of the package: what a user imports, and how modules depend on each other."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import regrad_engine
from regrad_engine import errors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from import_graph import import_graph, layers  # noqa: E402

EXPECTED = [
    "open_engine", "ReGrad", "Answer",
    "read_corpus", "chunk_documents", "Chunk", "build_store", "Store",
    "BM25Index", "ElasticsearchIndex", "DocumentIndex", "Retriever", "Hit",
    "MetaTrainer", "MetaTrainConfig", "MetaExample", "meta_examples", "MetaCheckpoint",
    "load_model", "LoadedModel", "DEFAULT_MODEL",
    "RegradError", "RequestError", "ConfigError", "DataError", "RetrievalError", "BankError", "BankCorruptError",
    "BankLockedError", "StoreError", "CheckpointError", "ModelLoadError",
]


def test_public_api_is_pinned():
    assert sorted(regrad_engine.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert hasattr(regrad_engine, name)


def test_every_user_error_is_a_regrad_error():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 10
    assert all(issubclass(c, errors.RegradError) for c in classes)
    # the builtin bases they had before still catch them
    assert issubclass(errors.RequestError, ValueError) and issubclass(errors.UnknownDocumentError, KeyError)
    assert issubclass(errors.ModelLoadError, RuntimeError)


def test_import_graph_has_no_cycle_and_at_most_six_layers():
    graph = import_graph("regrad_engine")
    layer, cycles = layers(graph)
    assert cycles == []
    assert max(layer.values()) + 1 <= 6, layer
    assert layer["regrad_engine.errors"] == 0 and not graph["regrad_engine.errors"]
    # the serving engine does not load the meta-trainer, the data readers or the config
    assert not {"regrad_engine.meta", "regrad_engine.data", "regrad_engine.config"} & graph["regrad_engine.inference"]


def test_the_graph_script_sees_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.a import x\n")  # a lazy import counts too
    layer, cycles = layers(import_graph("pkg", root=tmp_path))
    assert cycles and {"pkg.a", "pkg.b"} <= set(cycles[0])


def test_serving_engine_import_does_not_load_the_trainer():
    code = ("import sys, regrad_engine.inference, regrad_engine.store; "
            "print(sorted(m for m in sys.modules if m in ('regrad_engine.meta', 'regrad_engine.config', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wheel_ships_the_demo_checkpoint_and_the_backends(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("regrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("manifest.json", "meta.safetensors"):
        assert f"regrad_engine/checkpoints/smollm2-135m-synth/{part}" in names
    assert not [n for n in names if "train-state" in n]  # trainer state stays in the repository
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[regrad.retrievers]" in text and "bm25 = regrad_engine.retrieval.bm25:BM25Index" in text
