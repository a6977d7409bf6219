"""The CLI end to end on a tiny model saved to disk, and the errors a user sees."""

import json

import pytest
import torch

from regrad_engine.cli import main
from tests.conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer()
    for name, seed in (("tiny", 0), ("other", 1)):
        model = make_model(tokenizer, dtype=torch.float32, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tiny = ["--model", str(root / "tiny"), "--threads", "1"]
    assert main(["synth", "--out", str(root / "data"), "--entities", "30"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "meta"), "--steps", "2",
                 "--layers", "1", "--rank", "4", "--dev-size", "2", "--eval-every", "1", *tiny]) == 0
    assert main(["build", "--corpus", str(root / "data" / "corpus.jsonl"), "--meta", str(root / "meta" / "best"),
                 "--store", str(root / "store"), *tiny]) == 0
    return root, tiny


def test_ask_answers_with_sources(workspace, capsys):
    root, tiny = workspace
    first = json.loads((root / "data" / "test.jsonl").read_text().splitlines()[0])
    assert main(["ask", "--store", str(root / "store"), "--compare", "--mode", "hybrid", first["question"], *tiny]) == 0
    out = capsys.readouterr().out
    assert "Q: " + first["question"] in out and "base model" in out and "ReGrad hybrid" in out
    assert first["doc_id"] in out  # BM25 finds the entity's own document


def test_build_again_reuses_every_gradient(workspace, capsys):
    root, tiny = workspace
    assert main(["build", "--corpus", str(root / "data" / "corpus.jsonl"), "--meta", str(root / "meta" / "best"),
                 "--store", str(root / "store"), *tiny]) == 0
    assert "added 0 gradients" in capsys.readouterr().out


def test_eval_prints_the_table(workspace, capsys):
    root, tiny = workspace
    assert main(["eval", "--data", str(root / "data"), "--meta", str(root / "meta" / "best"), "--limit", "4",
                 "--systems", "direct,regrad", "--out", str(root / "eval.json"), *tiny]) == 0
    assert "| ReGrad parametric |" in capsys.readouterr().out
    written = json.loads((root / "eval.json").read_text())
    assert set(written["report"]["all"]["systems"]) == {"majority", "direct", "regrad"}
    assert len(written["questions"]) == 4 and set(written["questions"][0]["predictions"]) == {"direct", "regrad"}


def test_eval_saves_after_each_system_and_resumes(workspace, capsys, monkeypatch):
    from regrad_engine.inference import ReGrad

    root, tiny = workspace
    out = root / "resumed.json"
    argv = ["eval", "--data", str(root / "data"), "--meta", str(root / "meta" / "best"), "--limit", "3",
            "--out", str(out), *tiny]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed in the second system: the first one's answers are on disk
        patch.setattr(ReGrad, "answer_batch", interrupted)
        assert main([*argv, "--systems", "direct,regrad"]) == 130
    assert f"answers are in {out}: the same command resumes" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert set(saved["questions"][0]["predictions"]) == {"direct"}
    capsys.readouterr()
    with monkeypatch.context() as patch:  # the base model is not asked again
        patch.setattr("regrad_engine.evaluation._plain", interrupted)
        assert main([*argv, "--systems", "direct,meta_lora,regrad"]) == 0
    assert "kept from the earlier run: direct; to answer: meta_lora, regrad" in capsys.readouterr().out
    resumed = json.loads(out.read_text())
    assert [q["predictions"]["direct"] for q in resumed["questions"]] == [
        q["predictions"]["direct"] for q in saved["questions"]]
    assert set(resumed["report"]["all"]["systems"]) == {"majority", "direct", "meta_lora", "regrad"}
    assert main([*argv[:-len(tiny)], "--k", "2", *tiny]) == 2  # other settings: refused, the file kept
    assert "holds an evaluation with other settings (k 3 there, 2 now)" in capsys.readouterr().err
    assert json.loads(out.read_text()) == resumed
    assert resumed["gamma"] == 1.0
    del resumed["gamma"]  # as written before gamma was recorded: those runs had the default step
    out.write_text(json.dumps(resumed))
    assert main([*argv[:-len(tiny)], "--gamma", "2", *tiny]) == 2
    assert "(gamma 1.0 there, 2.0 now)" in capsys.readouterr().err
    assert main([*argv, "--systems", "direct"]) == 0
    assert "nothing left to answer" in capsys.readouterr().out
    resumed = json.loads(out.read_text())
    assert isinstance(resumed["document_bos"], bool)
    encoded_otherwise = {**resumed, "document_bos": not resumed["document_bos"]}
    out.write_text(json.dumps(encoded_otherwise))  # documents encoded otherwise: other gradients, refused
    assert main([*argv, "--systems", "direct"]) == 2
    assert "evaluation whose documents were encoded" in capsys.readouterr().err
    assert json.loads(out.read_text()) == encoded_otherwise
    out.write_text(json.dumps({**resumed, "document_bos": "no"}))
    assert main([*argv, "--systems", "direct"]) == 2
    assert "'document_bos' is 'no', not true or false" in capsys.readouterr().err
    del resumed["document_bos"]  # as written before it was recorded: accepted
    out.write_text(json.dumps(resumed))
    assert main([*argv, "--systems", "direct"]) == 0
    assert "nothing left to answer" in capsys.readouterr().out
    for notes in ("my notes", '{"questions": [1, 2]}'):
        (root / "notes.json").write_text(notes)
        assert main([*argv[:-len(tiny) - 2], "--out", str(root / "notes.json"), *tiny]) == 2
        assert "is not a readable `regrad eval` result" in capsys.readouterr().err
        assert (root / "notes.json").read_text() == notes


def test_a_second_eval_into_the_same_out_is_refused_until_the_first_ends(workspace, capsys):
    from regrad_engine.files import WriterLock

    root, tiny = workspace
    out = root / "locked.json"
    argv = ["eval", "--data", str(root / "data"), "--meta", str(root / "meta" / "best"), "--limit", "2",
            "--systems", "direct", "--out", str(out), *tiny]
    first = WriterLock(root / ".locked.json.lock")  # what a running eval into that --out holds
    first.acquire()
    try:
        assert main(argv) == 2
    finally:
        first.release()
    err = capsys.readouterr().err
    assert f"--out {out} is being written by another `regrad eval` (pid " in err and "Traceback" not in err
    assert not out.exists()
    assert main(argv) == 0 and main(argv) == 0  # released: runs, and a finished eval leaves no lock held
    assert json.loads(out.read_text())["questions"][0]["predictions"].keys() == {"direct"}


@pytest.mark.parametrize("argv, message", [
    (["ask", "--store", "{root}/nowhere", "Who?"], "no regrad store"),
    (["ask", "--store", "{root}/store", "  "], "question is empty"),
    (["ask", "--store", "{root}/store", "--k", "0", "Who?"], "k must be a positive integer"),
    (["ask", "--store", "{root}/store", "--gamma", "nan", "Who?"], "gamma must be finite"),
    (["ask", "--store", "{root}/store", "--model", "{root}/other", "Who?"], "fingerprint"),
    (["build", "--corpus", "{root}/missing.jsonl", "--meta", "{root}/meta/best", "--store", "{root}/s2"], "missing.jsonl"),
    (["delete", "--store", "{root}/store", "no-such-doc"], "no-such-doc"),
    (["merge", "--store", "{root}/nowhere"], "no regrad store"),
    (["train", "--data", "{root}/data", "--out", "{root}/m3", "--steps", "1", "--lora-target-modules", "nope"],
     "no nn.Linear"),
    (["train", "--data", "{root}/data", "--out", "{root}/m2", "--steps", "0"], "steps"),
    (["train", "--data", "{root}/data", "--out", "{root}/m2", "--lr", "inf"], "lr"),
    (["train", "--config", "{root}/list.json"], "JSON object"),
    (["ask", "--store", "{root}/store", "--model", "{root}/tiny", "--threads", "-1", "Who?"], "--threads must be"),
    (["ask", "--store", "{root}/store", "--model", "{root}/tiny", "--device", "bogus", "Who?"], "not a torch device"),
    (["build", "--corpus", "{root}/data/corpus.jsonl", "--meta", "{root}/meta/best", "--store", "{root}/s3",
      "--batch-size", "0"], "--batch-size must be"),
    (["build", "--corpus", "{root}/short.jsonl", "--meta", "{root}/meta/best", "--store", "{root}/s4"],
     "shorter than 2 tokens"),
    (["build", "--corpus", "{root}/data/corpus.jsonl", "--meta", "{root}/meta/best", "--store", "{root}/s5",
      "--chunk-tokens", "1"], "(--chunk-tokens) must be >= 8"),
    (["eval", "--data", "{root}/data", "--meta", "{root}/meta/best", "--limit", "0"], "--limit must be"),
    (["eval", "--data", "{root}/data", "--meta", "{root}/meta/best", "--gamma", "-1"], "gamma must be finite"),
    (["eval", "--data", "{root}/data", "--meta", "{root}/meta/best", "--out", "{root}"], "is a directory"),
    (["eval", "--data", "{root}/data", "--meta", "{root}/meta/best", "--out", "."], "is a directory"),
    (["synth", "--out", "{root}/x", "--entities", "0"], "--entities must be"),
    (["data", "--out", "{root}/x", "--max-words", "0"], "max_words"),
])
def test_user_mistakes_get_a_message_not_a_traceback(workspace, capsys, argv, message):
    root, tiny = workspace
    (root / "list.json").write_text("[1, 2]")
    (root / "short.jsonl").write_text('{"id": "a", "text": "a"}\n')
    argv = [a.format(root=root) for a in argv]
    extra = [] if "--model" in argv or argv[0] in ("delete", "merge", "synth", "data") else tiny
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_flags_come_from_the_config_fields():
    from regrad_engine.cli import _config_overrides, build_parser
    from regrad_engine.config import MetaTrainConfig

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--lora-target-modules", "q_proj,v_proj",
                                      "--rank", "4", "--no-resume", "--bf16", "--alpha-mode", "full", "--lr", "3e-4"])
    overrides = _config_overrides(args)
    assert overrides == {"data": "d", "out": "o", "lora": {"target_modules": ["q_proj", "v_proj"], "r": 4},
                         "resume": False, "bf16": True, "alpha_mode": "full", "lr": 3e-4}
    cfg = MetaTrainConfig(**overrides)
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"] and not cfg.resume
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in MetaTrainConfig.model_fields:  # every field has its flag
        if name != "lora":
            assert "--" + name.replace("_", "-") in help_text, name


def test_config_file_and_flags_merge_field_by_field(tmp_path):
    from regrad_engine.config import MetaTrainConfig, load_config

    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "out": "o", "lora": {"layers": [20, 21], "r": 4}}))
    cfg = load_config(MetaTrainConfig, str(tmp_path / "c.json"), {"lora": {"r": 8, "lora_alpha": 0.5}})
    assert cfg.lora.layers == [20, 21] and cfg.lora.r == 8 and cfg.lora.lora_alpha == 0.5
    from regrad_engine.cli import build_parser

    args = build_parser().parse_args(["train", "--lora-target-modules", "gate_proj, up_proj"])
    assert args.__dict__["lora.target_modules"] == ["gate_proj", "up_proj"]
