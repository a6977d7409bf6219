"""The example converters: each writes a valid regrad data directory, split by document, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples import datasets

pytestmark = pytest.mark.skipif(not datasets.shared_data_dir().is_dir(),
                                reason=f"shared data not found at {datasets.shared_data_dir()} (set REGRAD_SHARED_DATA)")

SMALL = {
    "pubmedqa": dict(train=40, dev=10, test=20),
    "cuad": dict(dev=10, test=20),
    "policyqa": dict(),
    "legal": dict(),
}


def _read(directory: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def check_data_dir(directory: Path) -> dict[str, list[dict]]:
    from regrad_engine.data import eval_items, load_documents

    docs = load_documents(directory)
    assert docs and all(d["text"].strip() and d["split"] in datasets.SPLITS for d in docs.values())
    rows = {split: _read(directory, f"{split}.jsonl") for split in datasets.SPLITS}
    gold_split: dict[str, str] = {}
    for split, questions in rows.items():
        assert questions, f"empty {split} split"
        for q in questions:
            assert q["question"].strip() and q["doc_id"] in docs
            assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"])
            assert docs[q["doc_id"]]["split"] == split
            assert gold_split.setdefault(q["doc_id"], split) == split  # no document in two splits
        assert len({q["id"] for q in questions}) == len(questions)
        eval_items(directory, split, k=3, limit=5)  # enough distractors for the engine's evaluation
    return rows


@pytest.mark.parametrize("name", ["pubmedqa", "cuad", "policyqa"])
def test_converter_writes_a_valid_data_dir(tmp_path, name):
    counts = datasets.BUILDERS[name](tmp_path / "a", **SMALL[name])
    rows = check_data_dir(tmp_path / "a")
    assert counts["test_questions"] == len(rows["test"])
    if name == "pubmedqa":
        assert [len(rows[s]) for s in datasets.SPLITS] == [40, 10, 20]
        assert {a for r in rows["test"] for a in r["answers"]} <= {"yes", "no", "maybe"}
        official = list(json.loads((datasets.shared_data_dir() / "medical/pubmedqa/test_ground_truth.json").read_text()))
        assert {r["id"] for r in rows["test"]} <= set(official)
        # the official file is sorted by label: a fair sample has more than one label
        assert len({r["answers"][0] for r in rows["test"]}) > 1
    if name == "cuad":
        assert all(len(a) <= 80 for s in rows.values() for r in s for a in r["answers"])
        docs = _read(tmp_path / "a", "corpus.jsonl")
        assert all(len(d["text"]) <= 1010 for d in docs)
        contract_split = {}
        for d in docs:  # split by contract: every document of a contract in one split
            assert contract_split.setdefault(d["id"].split("-")[0], d["split"]) == d["split"]
        assert len({d["id"].split("-")[0] for d in docs if d["split"] == "test"}) == 20
    if name == "policyqa":
        assert [len(rows[s]) for s in datasets.SPLITS] <= [600, 60, 150]
        docs = _read(tmp_path / "a", "corpus.jsonl")
        policies = {s: {d["title"] for d in docs if d["split"] == s} for s in datasets.SPLITS}
        assert [len(policies[s]) for s in datasets.SPLITS] == [14, 2, 4]


@pytest.mark.parametrize("name", ["pubmedqa", "cuad", "policyqa"])
def test_converter_is_deterministic_for_a_seed(tmp_path, name):
    datasets.BUILDERS[name](tmp_path / "a", **SMALL[name], seed=3)
    datasets.BUILDERS[name](tmp_path / "b", **SMALL[name], seed=3)
    datasets.BUILDERS[name](tmp_path / "c", **SMALL[name], seed=4)
    files = ["corpus.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    if name != "pubmedqa":  # PubMedQA's test split is the official one; train differs by seed
        assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_legal_combines_cuad_and_policyqa(tmp_path):
    counts = datasets.legal(tmp_path / "legal")
    rows = check_data_dir(tmp_path / "legal")
    sources = {d["source"] for d in _read(tmp_path / "legal", "corpus.jsonl")}
    assert sources == {"cuad", "policyqa"} and counts["train_questions"] == len(rows["train"])


def test_cuad_contract_names_are_readable():
    name = datasets.cuad_contract_name
    assert name("CybergyHoldingsInc_20140520_10-Q_EX-10.27_8605784_EX-10.27_Affiliate Agreement.pdf") \
        == "Cybergy Holdings affiliate agreement"
    assert name("ADAMSGOLFINC_03_21_2005-EX-10.17-ENDORSEMENT AGREEMENT.PDF") == "Adamsgolf endorsement agreement"
    assert name("HEMISPHERX - Sales, Marketing, Distribution, and Supply Agreement.PDF").startswith("Hemispherx sales")
    assert datasets._long_date("5/8/14") == ["May 8, 2014", "8 May 2014"]


def test_cli_prints_counts(tmp_path, capsys):
    assert datasets.main(["policyqa", "--out", str(tmp_path / "p")]) == 0
    assert "test 150 questions" in capsys.readouterr().out


def test_missing_shared_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REGRAD_SHARED_DATA", str(tmp_path / "nowhere"))
    assert datasets.main(["pubmedqa", "--out", str(tmp_path / "p")]) == 2
    assert "REGRAD_SHARED_DATA" in capsys.readouterr().err
