"""Bounded, validated requests: too long prompts refused at once, bad arguments named, no silent empty answers."""

import pytest

from regrad_engine.cli import main
from regrad_engine.errors import RequestError
from regrad_engine.store import open_engine


def test_a_question_longer_than_the_context_is_refused_before_any_work(store, monkeypatch):
    model, _, root = store
    engine = open_engine(root, model=model)
    assert engine.max_prompt_tokens == model.model.config.max_position_embeddings - engine.max_new_tokens
    long = "Where was Velmora Quistan born " * 4000  # > 8,192 tokens of the tiny model's context
    calls = []
    monkeypatch.setattr(engine, "retrieve", lambda *a, **k: calls.append(a))
    with pytest.raises(RequestError, match=r"the prompt is \d+ tokens; this engine reads at most 8172"):
        engine.answer(long)
    with pytest.raises(RequestError, match="reads at most"):
        next(engine.stream(long))
    assert calls == []  # refused before retrieval and before any gradient


def test_passages_that_overflow_the_context_are_refused_too(store):
    model, _, root = store
    engine = open_engine(root, model=model, max_prompt_tokens=60)
    assert engine.answer("Who plays the violin?", mode="parametric", k=2).text is not None
    with pytest.raises(RequestError, match="fewer or shorter passages"):
        engine.answer("Who plays the violin?", mode="hybrid", k=2)


@pytest.mark.parametrize("kwargs", [{"k": 2.5}, {"k": True}, {"k": "3"}, {"k": 0}, {"mode": ""},
                                    {"gamma": float("nan")}, {"gamma": float("inf")}, {"gamma": 1e6}])
def test_bad_arguments_raise_the_request_error(store, kwargs):
    model, _, root = store
    engine = open_engine(root, model=model)
    with pytest.raises(RequestError):
        engine.answer_batch(["Who plays the violin?"], **kwargs)
    with pytest.raises(RequestError, match="list of questions"):
        engine.answer_batch("abc")


def test_no_matching_document_is_said_not_hidden(store, capsys, monkeypatch):
    model, _, root = store
    import regrad_engine.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: model)
    assert main(["ask", "--store", str(root), "--model", "tiny", "zzzz qqqq?"]) == 0
    out = capsys.readouterr().out
    assert "sources=[]" in out and "no document matched" in out
    for flag, value in (("--gamma", "nan"), ("--gamma", "inf"), ("--gamma", "1e6"), ("--k", "0")):
        assert main(["ask", "--store", str(root), "--model", "tiny", flag, value, "Who?"]) == 2
        err = capsys.readouterr().err
        assert "must be" in err and "Traceback" not in err


def test_the_limit_counts_this_requests_answer_length_and_every_prompt_before_generating(store, monkeypatch):
    model, _, root = store
    engine = open_engine(root, model=model, batch_size=1)
    question = "Where was Velmora Quistan born? " * 20
    assert engine.answer(question, max_new_tokens=4).text is not None
    with pytest.raises(RequestError, match="reads at most"):  # an 8,100-token answer leaves no room for it
        engine.answer(question, max_new_tokens=8100)
    limited = open_engine(root, model=model, batch_size=1, max_prompt_tokens=60)
    generated = []
    real = limited._generate
    monkeypatch.setattr(limited, "_generate", lambda *a, **k: generated.append(a) or real(*a, **k))
    with pytest.raises(RequestError, match="fewer or shorter passages"):
        limited.answer_batch(["Who?", "Who plays the violin?"], mode="hybrid", k=2,
                             documents=[[], [h for h in limited.retrieve(["violin cello"], 2)[0]]])
    assert generated == []  # the second prompt was refused before the first was generated
