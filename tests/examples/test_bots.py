"""The example bots end to end on a tiny model: data, held-out store, framework answers, score table."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from examples import datasets
from tests.conftest import make_model, make_tokenizer

pytestmark = pytest.mark.skipif(not datasets.shared_data_dir().is_dir(),
                                reason=f"shared data not found at {datasets.shared_data_dir()} (set REGRAD_SHARED_DATA)")


def _needs(module: str):
    try:
        importlib.import_module(module)
    except ImportError as err:
        pytest.skip(f"{module} is not available: {err}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model on disk and a meta checkpoint for it (one meta-step on a little PubMedQA)."""
    from regrad_engine.cli import main as regrad

    root = tmp_path_factory.mktemp("bots")
    tokenizer = make_tokenizer()
    make_model(tokenizer, dtype=torch.float32).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    datasets.pubmedqa(root / "data", train=6, dev=3, test=3)
    model = ["--model", str(root / "model"), "--threads", "1"]
    assert regrad(["train", "--data", str(root / "data"), "--out", str(root / "meta"), "--steps", "1",
                   "--layers", "1", "--rank", "4", "--dev-size", "2", "--eval-every", "1",
                   "--doc-max-tokens", "64", *model]) == 0
    return root


def _argv(tiny, tmp_path, *extra):
    return ["--model", str(tiny / "model"), "--meta", str(tiny / "meta"), "--workdir", str(tmp_path),
            "--threads", "1", "--limit", "4", "--questions", "2", *extra]


def _check_side_by_side(out: str, questions: int):
    assert out.count("\nQ: ") + out.startswith("Q: ") == questions
    assert out.count("ReGrad parametric:") == questions and out.count("ReGrad hybrid    :") == questions
    assert "documents used:" in out


def _check_table(out: str):
    for label in ("Base model (direct)", "RAG (passages in prompt, base model)", "ReGrad parametric",
                  "ReGrad hybrid (gradients + passages)"):
        assert f"| {label} |" in out
    assert "| 4 |" in out  # n = --limit
    assert "first 4 test questions" in out and ", k=3 (" in out  # the header names the settings used


def test_medical_bot(tiny, tmp_path, capsys):
    _needs("regrad_integrations.langchain")
    from examples import medical_bot

    assert medical_bot.main(_argv(tiny, tmp_path, "--max-docs", "12")) == 0
    out = capsys.readouterr().out
    _check_side_by_side(out, 2)
    _check_table(out)
    assert "12 held-out documents" in out


def test_legal_bot(tiny, tmp_path, capsys):
    _needs("regrad_integrations.llama_index")
    from examples import legal_bot

    assert legal_bot.main(_argv(tiny, tmp_path, "--max-docs", "12")) == 0
    out = capsys.readouterr().out
    _check_side_by_side(out, 2)
    assert "CUAD" in out and "PolicyQA" in out
    _check_table(out)


def test_drop_in_chain(tiny, tmp_path, capsys):
    _needs("regrad_integrations.langchain")
    from examples import drop_in_chain

    assert drop_in_chain.main(["--model", str(tiny / "model"), "--meta", str(tiny / "meta"),
                               "--workdir", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "existing chain" in out and "ReGrad chain" in out


def test_missing_checkpoint_prints_the_train_command(tmp_path, capsys, monkeypatch):
    _needs("regrad_integrations.langchain")
    from examples import _common, medical_bot

    monkeypatch.setattr(_common, "FALLBACK_META", tmp_path / "no-synthetic")
    monkeypatch.setattr(medical_bot, "DEFAULT_META", tmp_path / "no-general")
    assert medical_bot.main(["--workdir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "regrad data --out runs/general" in out and "--init-from regrad_engine/checkpoints/smollm2-135m-synth --mode mixed" in out
    assert "no synthetic meta checkpoint" in out
