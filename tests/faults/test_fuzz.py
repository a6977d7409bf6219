"""1,000 random requests and 500 random corpus files: only the project's own errors come out, and afterwards
the engine still answers and the bank verifies."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regrad_engine.bank import GradientBank
from regrad_engine.data import read_corpus
from regrad_engine.errors import DataError, RequestError
from regrad_engine.inference import Answer
from tests.conftest import make_engine

QUESTIONS = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["Who plays the violin?", "Lisbon"]))
BAD = st.one_of(st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 0),
                st.booleans(), st.none(), st.lists(st.text(max_size=2), max_size=2))


def test_random_requests_get_answers_or_request_errors(tokenizer, tmp_path):
    engine = make_engine(tokenizer, tmp_path)
    outcomes = {"answered": 0, "refused": 0}

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(how=st.sampled_from(["answer", "answer_batch", "stream"]), question=QUESTIONS, k=st.integers(1, 7),
           gamma=st.floats(0, 3), mode=st.sampled_from(["parametric", "hybrid"]),
           broken=st.sampled_from([None, None, "question", "k", "gamma", "mode"]), bad=BAD)
    def request(how, question, k, gamma, mode, broken, bad):
        options = {"k": k, "gamma": gamma, "mode": mode}
        if broken == "question":
            question = bad
        elif broken is not None:
            options[broken] = bad
        options = {name: value for name, value in options.items() if value is not None}
        try:
            if how == "answer":
                result = [engine.answer(question, **options)]
            elif how == "answer_batch":
                result = engine.answer_batch([question, "Where was Gredin Quibiku born?"], **options)
            else:
                result = ["".join(engine.stream(question, **options))]
        except RequestError:
            outcomes["refused"] += 1
            return
        assert all(isinstance(r, (Answer, str)) for r in result)
        outcomes["answered"] += 1

    request()
    assert outcomes["answered"] > 100 and outcomes["refused"] > 100
    assert engine.answer("Where was Velmora Quistan born?").sources  # still answers
    engine.bank.flush()
    assert GradientBank.verify(engine.bank.path).ok


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)
LINES = st.one_of(st.text(max_size=30), JSON_VALUES.map(json.dumps),
                  st.fixed_dictionaries({"id": st.one_of(st.text(max_size=6), st.integers()), "text": st.text(max_size=20)},
                                        optional={"title": st.text(max_size=6)}).map(json.dumps))


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(lines=st.lists(LINES, max_size=6), bom=st.booleans())
def test_random_corpus_files_give_documents_or_a_data_error(lines, bom):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8-sig" if bom else "utf-8")
        try:
            docs = read_corpus(path)
        except DataError:
            return
        assert docs and all(isinstance(d["id"], str) and d["text"].strip() for d in docs)
        assert len({d["id"] for d in docs}) == len(docs)
