"""Evaluation: both settings, the controls, intervals, the collapse detector (tiny model)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from regrad_engine.data import DataError, eval_items, meta_examples
from regrad_engine.evaluation import (
    EvalRun,
    evaluate_systems,
    markdown_tables,
    per_question,
    summarize,
)
from regrad_engine.metrics import bootstrap_interval, top_answer_share
from tests.conftest import DOCS, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _write(root, rows_by_split, corpus):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    for split, rows in rows_by_split.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def data_dir(tmp_path):
    corpus = [{"id": k, "title": k, "text": v, "split": "test"} for k, v in DOCS.items()]
    corpus.append({"id": "train-only", "title": "t", "text": "Nobody tests on this training passage.", "split": "train"})
    rows = [
        {"id": "q1", "source": "people", "question": "Where was Velmora Quistan born?", "answers": ["Lisbon"],
         "gold_ids": ["velmora"], "distractor_ids": ["gredin", "fox"]},
        {"id": "q2", "source": "people", "question": "What does Gredin Quibiku speak?", "answers": ["Japanese"],
         "gold_ids": ["gredin"], "distractor_ids": ["velmora", "fudral"]},
        {"id": "q3", "source": "places", "question": "Which river does Ailpelou lie on?", "answers": ["Yangtze"],
         "gold_ids": ["ailpelou"], "distractor_ids": ["fudral", "fox"]},
    ]
    _write(tmp_path / "data", {"test": rows, "train": []}, corpus)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def loaded():
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.lora import init_step_sizes
    from regrad_engine.models import LoadedModel
    from tests.conftest import make_space, random_phi

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, attn="sdpa", dtype=torch.float32)
    space = make_space(model)
    phi = {k: v.float() for k, v in random_phi(space).items()}
    meta = MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 2.0), alpha_mode="tie", lora=space.spec(),
                          base_model="tiny", base_fingerprint="f00")
    model._regrad_space = space
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny", fingerprint="f00"), meta


def test_given_items_keep_the_gold_and_the_ranked_distractors(data_dir):
    items = eval_items(data_dir, "test", k=2, seed=0)
    assert [set(i.doc_ids) for i in items] == [{"velmora", "gredin"}, {"gredin", "velmora"}, {"ailpelou", "fudral"}]
    assert [i.source for i in items] == ["people", "people", "places"]
    assert [len(i.doc_ids) for i in eval_items(data_dir, "test", k=3)] == [3, 3, 3]
    assert len(eval_items(data_dir, "test", k=3, limit=1)) == 2  # the first question of each set
    tasks = meta_examples(data_dir, "test", k=2)
    assert DOCS["velmora"] in tasks[0].passages and tasks[0].source == "people"


def test_rows_that_name_no_documents_are_refused(tmp_path):
    _write(tmp_path / "d", {"test": [{"question": "Who?", "answers": ["x"]}]}, [{"id": "a", "text": "b c"}])
    with pytest.raises(DataError, match="names no documents"):
        eval_items(tmp_path / "d", "test")


@pytest.mark.parametrize("setting", ["given", "retrieval"])
def test_every_system_answers_every_question(loaded, data_dir, setting):
    model, meta = loaded
    run = evaluate_systems(model, meta, data_dir, k=2, setting=setting, progress=False, log=lambda _: None,
                           systems=("direct", "rag", "meta_lora", "format_control", "random_grads", "regrad",
                                    "regrad_hybrid", "raw_gradients"))
    assert all(len(p) == 3 for p in run.predictions.values())
    used = {h.id for docs in run.documents for h in docs}
    assert "train-only" not in used  # retrieval searches the test split's passages only
    if setting == "retrieval":
        assert run.gold_recall()[0] == 1.0  # BM25 finds Velmora's own passage
    report = summarize(run)
    assert set(report) == {"people", "places"}
    assert set(report["people"]["systems"]) == {"majority"} | set(run.predictions)
    assert "Format control" in markdown_tables(report, setting)


def test_gamma_scales_the_gradient_step_of_the_evaluated_systems(loaded, data_dir):
    model, meta = loaded
    systems = ("meta_lora", "regrad", "random_grads")
    full = evaluate_systems(model, meta, data_dir, k=2, systems=systems, progress=False, log=lambda _: None)
    assert full.predictions["regrad"] != full.predictions["meta_lora"]  # the step changes answers here
    none = evaluate_systems(model, meta, data_dir, k=2, systems=systems, progress=False, log=lambda _: None,
                            gamma=0.0)
    assert none.predictions["regrad"] == none.predictions["random_grads"] == full.predictions["meta_lora"]


def test_the_controls_see_what_they_should(loaded, data_dir, monkeypatch):
    """The format control is the hybrid prompt without gradients; random gradients come from the run's
    passages, drawn by the seed; ReGrad gets each question's own passages."""
    from regrad_engine.inference import ReGrad

    model, meta = loaded
    systems = ("meta_lora", "format_control", "regrad", "regrad_hybrid", "random_grads")
    full = evaluate_systems(model, meta, data_dir, k=2, systems=systems, progress=False, log=lambda _: None)
    none = evaluate_systems(model, meta, data_dir, k=2, systems=systems, progress=False, log=lambda _: None,
                            gamma=0.0)
    assert none.predictions["regrad_hybrid"] == full.predictions["format_control"]  # hybrid minus the gradients
    assert full.predictions["format_control"] != full.predictions["meta_lora"]  # the passages are in its prompt
    calls = {}
    real = ReGrad.answer_batch

    def spy(self, questions, **kwargs):
        name = ("format_control" if kwargs.get("mode") == "hybrid" and kwargs.get("use_gradients") is False else
                "meta_lora" if kwargs.get("use_gradients") is False else
                "regrad_hybrid" if kwargs.get("mode") == "hybrid" else f"grads{len(calls)}")
        calls[name] = [[h.id for h in docs] for docs in kwargs["documents"]]
        return real(self, questions, **kwargs)

    monkeypatch.setattr(ReGrad, "answer_batch", spy)
    run = evaluate_systems(model, meta, data_dir, k=2, systems=systems, progress=False, log=lambda _: None)
    own = [[h.id for h in docs] for docs in run.documents]
    assert calls["format_control"] == calls["meta_lora"] == calls["regrad_hybrid"] == own
    regrad, random_grads = calls["grads2"], calls["grads4"]  # in the order of `systems`
    assert regrad == own and random_grads != own
    assert {d for docs in random_grads for d in docs} <= {d for docs in own for d in docs}
    assert all(len(set(docs)) == 2 for docs in random_grads)
    again = evaluate_systems(model, meta, data_dir, k=2, systems=("random_grads",), progress=False, log=lambda _: None)
    assert again.predictions["random_grads"] == run.predictions["random_grads"]  # the same draw for a seed


def test_unknown_system_is_refused(loaded, data_dir):
    model, meta = loaded
    with pytest.raises(DataError, match="unknown system 'oracle'"):
        evaluate_systems(model, meta, data_dir, systems=("oracle",), log=lambda _: None)


def test_an_earlier_run_of_other_questions_is_refused_and_no_bank_is_built_without_gradient_systems(
        loaded, data_dir):
    model, meta = loaded
    logged = []
    run = evaluate_systems(model, meta, data_dir, k=2, systems=("meta_lora", "format_control"), progress=False,
                           log=logged.append)
    assert not [line for line in logged if "passage gradients" in line]  # no system here applies gradients
    records = per_question(run)
    for record in records:
        record["predictions"]["format_control"] = "kept " + record["id"]
    other_passages = copy.deepcopy(records)
    other_passages[0]["documents"] = other_passages[0]["documents"][::-1]
    partial = copy.deepcopy(records)
    del partial[1]["predictions"]["meta_lora"]
    for earlier, message in ((records[:-1], "other questions"), (other_passages, "other passages"),
                             (partial, "'meta_lora' answers for only some questions")):
        with pytest.raises(DataError, match=message):
            evaluate_systems(model, meta, data_dir, k=2, systems=("rag",), log=lambda _: None, previous=earlier)
    again = evaluate_systems(model, meta, data_dir, k=2, systems=("format_control", "rag"), log=lambda _: None,
                             previous=records)
    assert list(again.predictions) == ["rag", "meta_lora", "format_control"]  # the union, in the table's order
    assert again.predictions["format_control"] == [f"kept {r['id']}" for r in records]  # not answered again
    assert again.predictions["meta_lora"] == run.predictions["meta_lora"]


def test_summary_exposes_collapse_and_the_majority_baseline():
    from regrad_engine.data import EvalItem

    items = [EvalItem(str(i), "q?", [a], ["d"], "d", "yesno") for i, a in enumerate(["yes"] * 6 + ["no"] * 4)]
    run = EvalRun("given", items, [[] for _ in items], {"collapsed": ["Yes."] * 10, "perfect": ["yes"] * 6 + ["no"] * 4})
    entry = summarize(run)["yesno"]
    assert entry["majority_answer"] == "yes" and entry["majority_share"] == 0.6
    assert entry["systems"]["majority"]["exact_match"]["mean"] == 0.6
    assert entry["systems"]["collapsed"]["exact_match"]["mean"] == 0.6  # no better than always-"yes"
    assert entry["systems"]["collapsed"]["top_answer_share"] == 1.0
    assert entry["systems"]["perfect"]["top_answer_share"] == 0.6
    low, high = entry["systems"]["collapsed"]["f1"]["low"], entry["systems"]["collapsed"]["f1"]["high"]
    assert low < 0.6 < high


def test_bootstrap_interval_is_seeded_and_narrows_with_more_data():
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)
    low, high = bootstrap_interval(small)
    low2, high2 = bootstrap_interval(large)
    assert low < 0.5 < high and low2 < 0.5 < high2 and (high2 - low2) < (high - low) / 3
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)
    assert top_answer_share(["Paris.", "paris", "Rome"]) == ("paris", 2 / 3)


def _targets_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("targets", ROOT / "benchmarks" / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    return targets


def test_targets_report_paired_intervals_of_the_gaps():
    """benchmarks/targets.py: the +0.10 parametric target with the paired bootstrap interval of the gap."""
    targets = _targets_module()
    questions = [{"source": "squad", "answers": ["paris"], "predictions": {"regrad": "paris", "random_grads": "rome"}},
                 {"source": "squad", "answers": ["oslo"], "predictions": {"regrad": "oslo", "random_grads": "oslo"}}]
    stats = {"f1": {"mean": 0.0}, "top_answer": "x", "top_answer_share": 0.5}
    report = {"squad": {"systems": {"regrad": {**stats, "f1": {"mean": 1.0}}, "random_grads": {**stats, "f1": {"mean": 0.5}}}}}
    [gap, collapse] = targets.check_given(report, questions)
    assert gap[:3] == ("squad", "parametric F1 >= random + 0.10", True)
    assert gap[3] == "1.000 vs 0.500 (+0.500 [+0.000, +1.000])"  # paired: per-question gaps are 1 and 0
    assert collapse[2] is True  # 0.5 is not over 50%
    assert targets.check_given(report)[0][3] == "1.000 vs 0.500 (+0.500)"  # no per-question answers: no interval
    unnamed = [{**q, "source": ""} for q in questions]  # a set without a source is reported as "all"
    assert "[+0.000, +1.000]" in targets.check_given({"all": report["squad"]}, unnamed)[0][3]


def test_targets_combine_runs_larger_n_wins_and_a_collapse_anywhere_fails(tmp_path, capsys):
    targets = _targets_module()

    def run(path, n, regrad, share):
        system = {"f1": {"mean": regrad}, "top_answer": "yes", "top_answer_share": share}
        report = {"squad": {"n": n, "systems": {"regrad": system, "random_grads": {**system, "f1": {"mean": 0.0}}}}}
        path.write_text(json.dumps({"report": report}))
        return str(path)

    small = run(tmp_path / "small.json", 50, 0.05, 0.9)   # all systems, a collapse
    large = run(tmp_path / "large.json", 200, 0.20, 0.1)  # more questions, no collapse
    assert targets.main(["--given", large, "--given", small]) == 0
    table = capsys.readouterr().out
    assert "| squad | parametric F1 >= random + 0.10 | 200 | yes | 0.200 vs 0.000 (+0.200) |" in table
    assert "| squad | no top answer over 50% | 50 | **no** |" in table
    assert "1 of 2 targets met" in table
    also_collapsed = run(tmp_path / "also.json", 200, 0.20, 0.6)  # both fail: the larger run is shown
    targets.main(["--given", small, "--given", also_collapsed])
    assert "| squad | no top answer over 50% | 200 | **no** |" in capsys.readouterr().out


def test_answer_sources_tell_gold_spans_from_distractor_and_question_spans(tmp_path, capsys):
    """benchmarks/answer_sources.py: whole-word spans of normalised text, gold before distractor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("answer_sources", ROOT / "benchmarks" / "answer_sources.py")
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    gold, other = ["The Normans settled in Normandy."], ["Rollo led the Norse raiders."]
    assert sources.answer_source("normandy.\nsystem", "Where did the Normans settle?", gold, other) == "gold"
    assert sources.answer_source("Rollo", "Where did the Normans settle?", gold, other) == "distractor"
    assert sources.answer_source("the Normans", "Where did the Normans settle?", gold, other) == "question"
    assert sources.answer_source("Norman", "Where?", gold, other) == "none"  # not a whole word of either
    assert sources.answer_source("", "Where?", gold, other) == "none"
    corpus = {"g": gold[0], "d": other[0]}
    records = [{"id": "q1", "source": "squad", "question": "Where did the Normans settle?", "answers": ["Normandy"],
                "documents": ["d", "g"], "predictions": {"regrad": "Normandy", "random_grads": "Rollo"}},
               {"id": "q2", "source": "pubmedqa", "question": "Did they?", "answers": ["yes"],
                "documents": ["g"], "predictions": {"regrad": "yes"}}]
    counts = sources.tabulate(records, corpus, {"q1": ["g"], "q2": ["g"]}, ["regrad", "random_grads"])
    assert set(counts) == {"squad"}  # label sets left out
    assert dict(counts["squad"]["regrad"]) == {"n": 1, "gold": 1, "gold_right": 1}
    assert dict(counts["squad"]["random_grads"]) == {"n": 1, "distractor": 1}
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in corpus.items()))
    (data / "test.jsonl").write_text(json.dumps({"id": "q1", "gold_ids": ["g"]}) + "\n")
    run = tmp_path / "eval.json"
    run.write_text(json.dumps({"setting": "given", "split": "test", "questions": records[:1]}))
    assert sources.main([str(run), "--data", str(data)]) == 0
    assert "| squad | regrad | 1 | 1 (100%) | 1 | 0 (0%) | 0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a `regrad data` directory"):
        sources.main([str(run), "--data", str(tmp_path / "elsewhere")])
    (data / "test.jsonl").write_text(json.dumps({"id": "q9", "gold_ids": ["g"]}) + "\n")  # another split's data
    with pytest.raises(SystemExit, match="pass the data directory the evaluation ran on"):
        sources.main([str(run), "--data", str(data)])
