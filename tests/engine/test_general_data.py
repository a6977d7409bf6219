"""`regrad data`: the pooled real-QA mix is split by document group with no leakage."""

import json
import re

import pytest

from regrad_engine.cli import main
from regrad_engine.datasets.converters import shared_data_dir
from regrad_engine.datasets.general import SOURCES, build_general, passages

pytestmark = pytest.mark.skipif(not shared_data_dir().is_dir(),
                                reason=f"shared data not found at {shared_data_dir()} (set REGRAD_SHARED_DATA)")
SPLITS = ("train", "dev", "test")


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def normalized(text):
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    out = tmp_path_factory.mktemp("general")
    info = build_general(out, test_questions=60, dev_questions=10, train_questions=120, log=lambda _: None)
    corpus = {d["id"]: d for d in _read(out / "corpus.jsonl")}
    rows = {s: _read(out / f"{s}.jsonl") for s in SPLITS}
    return out, info, corpus, rows


def test_every_source_is_in_every_split(mix):
    _, info, _, rows = mix
    for split in SPLITS:
        assert {r["source"] for r in rows[split]} == set(SOURCES)
    assert all(info["sources"][s]["test"] == 60 for s in SOURCES)


def test_no_test_passage_or_question_reaches_training(mix):
    _, _, corpus, rows = mix
    for split in SPLITS:
        for row in rows[split]:
            assert {corpus[d]["split"] for d in row["gold_ids"] + row["distractor_ids"]} == {split}
    test_texts = {d["text"] for d in corpus.values() if d["split"] == "test"}
    assert not test_texts & {d["text"] for d in corpus.values() if d["split"] != "test"}
    test_questions = {normalized(r["question"]) for r in rows["test"]}
    assert not test_questions & {normalized(r["question"]) for s in ("train", "dev") for r in rows[s]}
    # whole groups: no SQuAD article, PolicyQA policy or CUAD contract is in two splits
    for source in ("squad", "policyqa", "cuad"):
        titles = {s: {d["title"] for d in corpus.values() if d["source"] == source and d["split"] == s} for s in SPLITS}
        assert not titles["test"] & (titles["train"] | titles["dev"]), source


def test_gold_passages_hold_the_answer_and_distractors_do_not(mix):
    _, _, corpus, rows = mix
    for row in rows["test"]:
        if row["source"] == "pubmedqa" or {normalized(a) for a in row["answers"]} <= {"yes", "no"}:
            continue
        answers = [f" {normalized(a)} " for a in row["answers"]]
        assert any(a in f" {normalized(corpus[g]['text'])} " for g in row["gold_ids"] for a in answers), row["id"]
        assert not any(a in f" {normalized(corpus[d]['text'])} " for d in row["distractor_ids"] for a in answers)
        assert len(row["distractor_ids"]) >= 2


def test_pubmedqa_test_questions_come_from_the_official_test_split(mix):
    _, _, _, rows = mix
    official = set(json.loads((shared_data_dir() / "medical/pubmedqa/test_ground_truth.json").read_text()))
    assert {r["id"].split(":")[1] for r in rows["test"] if r["source"] == "pubmedqa"} <= official
    assert not {r["id"].split(":")[1] for s in ("train", "dev") for r in rows[s] if r["source"] == "pubmedqa"} & official


def test_the_same_seed_gives_the_same_mix(mix, tmp_path):
    out, _, _, _ = mix
    build_general(tmp_path, test_questions=60, dev_questions=10, train_questions=120, sources=("squad", "popqa"),
                  log=lambda _: None)
    again = _read(tmp_path / "test.jsonl")
    build_general(tmp_path, test_questions=60, dev_questions=10, train_questions=120, sources=("squad", "popqa"),
                  log=lambda _: None)
    assert _read(tmp_path / "test.jsonl") == again


def test_passages_are_cut_to_the_word_limit():
    pieces = passages("d", " ".join(f"w{i}" for i in range(250)), 120)
    assert [p[0] for p in pieces] == ["d~0", "d~1", "d~2"] and [len(p[1].split()) for p in pieces] == [120, 120, 10]
    assert passages("d", "short text", 120) == [("d", "short text")]


def test_cli_writes_the_directory_and_refuses_unknown_sources(tmp_path, capsys):
    assert main(["data", "--out", str(tmp_path / "d"), "--sources", "popqa,squad", "--test-questions", "20",
                 "--dev-questions", "5", "--train-questions", "30"]) == 0
    assert {r["source"] for r in _read(tmp_path / "d" / "test.jsonl")} == {"popqa", "squad"}
    assert main(["data", "--out", str(tmp_path / "e"), "--sources", "wiki"]) == 2
    assert "unknown source 'wiki'" in capsys.readouterr().err


def test_synthetic_questions_join_train_and_dev_at_the_asked_share(tmp_path):
    info = build_general(tmp_path, sources=("popqa",), test_questions=20, dev_questions=10, train_questions=60,
                         synthetic_share=0.25, log=lambda _: None)
    rows = {s: _read(tmp_path / f"{s}.jsonl") for s in SPLITS}
    corpus = {d["id"]: d for d in _read(tmp_path / "corpus.jsonl")}
    for split in ("train", "dev"):
        synthetic = [r for r in rows[split] if r["source"] == "synthetic"]
        assert len(synthetic) == info["sources"]["synthetic"][split]
        assert len(synthetic) / len(rows[split]) == pytest.approx(0.25, abs=0.03)
        assert all(corpus[g]["split"] == split for r in synthetic for g in r["gold_ids"] + r["distractor_ids"])
    assert not [r for r in rows["test"] if r["source"] == "synthetic"]
    with pytest.raises(ValueError, match="synthetic_share"):
        build_general(tmp_path, synthetic_share=1.0, log=lambda _: None)
