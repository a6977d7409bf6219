import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from regrad_engine.errors import RequestError
from regrad_engine.models import parameter_hash
from regrad_engine.retrieval import Hit
from tests.conftest import DOCS, QUESTIONS, make_engine, runaway_turn


@pytest.fixture()
def engine(sdpa_model, tokenizer, tmp_path):
    return make_engine(tokenizer, tmp_path, model=sdpa_model)


def test_stored_gradients_equal_on_the_fly_and_write_back(engine):
    hits = [engine.retriever.get("velmora"), engine.retriever.get("fox")]
    stored = engine.gradient_sums([[hits[0]]])
    fresh = engine.document_gradients(hits)
    for key, value in stored.items():
        torch.testing.assert_close(value[0], fresh["velmora"][key])
    engine.write_back = True
    engine.gradient_sums([hits])
    assert "fox" in engine.bank
    torch.testing.assert_close(engine.bank.get("fox")[key], fresh["fox"][key].float())


def test_batched_generation_equals_one_at_a_time(engine):
    for mode in ("parametric", "hybrid"):
        together = engine.answer_batch(QUESTIONS, mode=mode)
        for answer in together:
            alone = engine.answer(answer.question, mode=mode)
            assert alone.text == answer.text
            assert [h.id for h in alone.sources] == [h.id for h in answer.sources]
    assert len({a.sources[0].id for a in together}) == len(QUESTIONS)  # each question its own documents


def test_gradients_change_the_answer_distribution(engine):
    plain = engine.answer_batch(QUESTIONS, use_gradients=False, output_scores=False)
    adapted = engine.answer_batch(QUESTIONS)
    assert [a.text for a in plain] != [a.text for a in adapted]


def test_documents_from_elsewhere_are_used_by_id(engine):
    outside = [Hit(id="fox", text=DOCS["fox"], score=1.0)]
    answer = engine.answer("What jumps over the dog?", documents=outside)
    assert [h.id for h in answer.sources] == ["fox"]
    engine.on_the_fly = False
    with pytest.raises(RequestError, match="no stored gradient"):
        engine.answer("What jumps over the dog?", documents=[Hit(id="new", text="A new text.", score=1.0)])


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be"), ({"k": 2.5}, "k must be"), ({"k": True}, "k must be"), ({"k": "3"}, "k must be"),
    ({"mode": "both"}, "mode must be"), ({"mode": ""}, "mode must be"),
    ({"gamma": float("nan")}, "gamma must be"), ({"gamma": float("inf")}, "gamma must be"),
    ({"gamma": 1e6}, "gamma must be"), ({"gamma": "1"}, "gamma must be"),
])
def test_bad_requests_are_refused(engine, kwargs, message):
    with pytest.raises(RequestError, match=message):
        engine.answer("Where was Velmora Quistan born?", **kwargs)
    with pytest.raises(RequestError, match=message):
        engine.stream("Where was Velmora Quistan born?", **kwargs).__next__()
    with pytest.raises(RequestError, match="empty"):
        engine.answer("   ")


def test_a_string_is_not_a_list_of_questions(engine):
    with pytest.raises(RequestError, match="list of questions"):
        engine.answer_batch("abc")
    with pytest.raises(RequestError, match="list of prompts"):
        engine.complete_batch("abc", [[]])


def test_stream_yields_the_same_text(engine):
    pieces = list(engine.stream(QUESTIONS[0], mode="hybrid"))
    assert "".join(pieces).strip() == engine.answer(QUESTIONS[0], mode="hybrid").text


class _Explode(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] > 0:
            raise RuntimeError("client went away")
        return False


def test_no_drift_after_100_mixed_requests_and_threads_get_their_own_answers(engine):
    model_hash = parameter_hash(engine.model.named_parameters())
    meta_hash = parameter_hash(sorted({**engine.phi, **engine.alpha}.items()))
    expected = {(q, m): engine.answer(q, mode=m).text for q in QUESTIONS for m in ("parametric", "hybrid")}
    requests = 0
    while requests < 100:
        q = QUESTIONS[requests % len(QUESTIONS)]
        mode = ("parametric", "hybrid")[requests % 2]
        if requests % 7 == 3:
            with pytest.raises(RuntimeError, match="client went away"):
                engine.answer(q, mode=mode, stopping_criteria=StoppingCriteriaList([_Explode()]))
        elif requests % 5 == 0:
            engine.answer_batch(QUESTIONS, mode=mode)
        else:
            assert engine.answer(q, mode=mode).text == expected[(q, mode)]
        requests += 1
    assert parameter_hash(engine.model.named_parameters()) == model_hash
    assert parameter_hash(sorted({**engine.phi, **engine.alpha}.items())) == meta_hash
    jobs = [(q, m) for q in QUESTIONS for m in ("parametric", "hybrid")] * 3
    barrier = threading.Barrier(4)

    def run(job):
        barrier.wait(timeout=30) if jobs.index(job) < 4 else None
        return engine.answer(job[0], mode=job[1]).text

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    assert results == [expected[job] for job in jobs]
    assert parameter_hash(engine.model.named_parameters()) == model_hash


def test_turn_markers_are_the_template_special_tokens(tokenizer):
    from regrad_engine.prompts import turn_marker_ids

    ids = turn_marker_ids(tokenizer)
    assert set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])) == set(ids)
    assert tokenizer.pad_token_id not in ids


def test_plain_added_tokens_in_the_template_are_not_turn_markers(tokenizer):
    """Gemma's vocabulary adds "\n" and "\n\n" as plain tokens that its template writes; an
    answer must not end at every line break."""
    import copy

    from regrad_engine.prompts import turn_marker_ids

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["\n\n"])  # an added, non-special token
    tok.chat_template = tok.chat_template + "\n\n"
    newline = tok.convert_tokens_to_ids("\n\n")
    assert newline not in turn_marker_ids(tok)
    assert set(turn_marker_ids(tok)) == set(turn_marker_ids(tokenizer))


@pytest.mark.parametrize("path", ["answer_batch", "complete_batch", "stream"])
def test_an_answer_ends_at_a_start_of_turn_marker(engine, path):
    """A model that opens a new turn ('yes<|im_start|>system ...') instead of closing its own
    answers just 'yes', in every generation path."""
    from transformers import LogitsProcessorList

    docs = [Hit("velmora", DOCS["velmora"], 0.0)]
    kwargs = {"logits_processor": LogitsProcessorList([runaway_turn(engine.tokenizer)]), "max_new_tokens": 12}
    if path == "answer_batch":
        text = engine.answer_batch(["Where?"], documents=[docs], **kwargs)[0].text
    elif path == "complete_batch":
        text = engine.complete_batch(["Where?"], [docs], **kwargs)[0]
    else:
        text = "".join(engine.stream("Where?", documents=docs, **kwargs))
    assert text == "yes"


def test_conversations_keep_their_roles_and_render_with_the_chat_template(engine):
    from regrad_engine.prompts import message_prompt, with_passages

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTIONS[0]}]
    rendered = message_prompt(engine.tokenizer, chat)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>") and rendered.endswith("<|im_start|>assistant\n")
    assert message_prompt(engine.tokenizer, QUESTIONS[0]) == message_prompt(engine.tokenizer, chat[-1:])
    hybrid = with_passages(chat, [DOCS["velmora"]])
    assert hybrid[:3] == chat[:3] and hybrid[3]["content"].startswith("Context:\n[1] Velmora")
    assert hybrid[3]["content"].endswith(QUESTIONS[0]) and chat[3]["content"] == QUESTIONS[0]  # input untouched
    docs = [engine.retriever.get("velmora")]
    assert engine.complete([chat], [docs])[0].text == engine.complete_batch([chat], [docs])[0]


@pytest.mark.parametrize("bad, message", [
    ([[{"role": "wizard", "content": "x"}]], "role must be one of"), ([[{"role": "user"}]], "string 'content'"),
    ([[]], "non-empty list of chat turns"), ([[{"role": "user", "content": "  "}]], "every turn is blank"),
    ([[{"role": "user", "content": 3}]], "string 'content'")])
def test_bad_conversations_are_refused(engine, bad, message):
    with pytest.raises(RequestError, match=message):
        engine.complete(bad, [[]])


def test_per_prompt_gamma_and_length_in_one_batch_equal_each_alone(engine):
    docs = [[engine.retriever.get("velmora")], [engine.retriever.get("fudral")], [], [engine.retriever.get("fox")]]
    gammas, lengths = [1.0, 0.5, 2.0, 0.0], [6, 2, 4, 1]
    together = engine.complete(QUESTIONS, docs, gamma=gammas, max_new_tokens=lengths)
    for i, completion in enumerate(together):
        alone = engine.complete([QUESTIONS[i]], [docs[i]], gamma=gammas[i], max_new_tokens=lengths[i])[0]
        assert completion == alone
        assert completion.prompt_tokens == engine.count_tokens(QUESTIONS[i])
        assert 1 <= completion.completion_tokens <= lengths[i]
        assert completion.finish_reason == ("length" if completion.completion_tokens == lengths[i] else "stop")
    assert together[3].completion_tokens == 1
    with pytest.raises(RequestError, match="2 gammas for 4"):
        engine.complete(QUESTIONS, docs, gamma=[1.0, 1.0])
    with pytest.raises(RequestError, match="max_new_tokens must be"):
        engine.complete(QUESTIONS, docs, max_new_tokens=[1, 2, 0, 1])


def test_a_stream_reports_the_same_completion_as_complete(engine):
    docs = [engine.retriever.get("velmora")]
    stream = engine.stream_message(QUESTIONS[0], docs, max_new_tokens=6)
    assert stream.completion is None
    text = "".join(stream)
    assert stream.completion == engine.complete([QUESTIONS[0]], [docs], max_new_tokens=6)[0]
    assert text.strip() == stream.completion.text


def test_closing_a_stream_stops_its_generation(engine):
    seen = []

    class Count:  # a logits processor that counts the steps generated
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            return scores

    stream = engine.stream_message(QUESTIONS[0], [], max_new_tokens=400, logits_processor=LogitsProcessorList([Count()]),
                                   min_new_tokens=400)
    next(stream)
    stream.close()
    time.sleep(0.5)
    steps = len(seen)
    time.sleep(0.5)
    assert steps == len(seen) < 400  # stopped early, and nothing more runs


def test_documents_start_with_bos_only_where_the_tokenizer_puts_one(tokenizer):
    from regrad_engine.prompts import bos_prefix, encode_documents

    text = "The Velmora river runs north of the old mill."
    plain = encode_documents(tokenizer, [text], max_tokens=8)["input_ids"][0].tolist()
    assert bos_prefix(tokenizer) == [] and len(plain) == 8  # this tokenizer has no bos

    class WithBos:  # a Llama-3 / Gemma style tokenizer: bos before text by default
        bos_token_id = 7
        pad_token_id = 0
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([7] if add_special_tokens else []) + ids}

    batch = encode_documents(WithBos(), [text], max_tokens=8)
    assert batch["input_ids"][0].tolist() == [7] + plain  # bos first, not counted in max_tokens
    assert batch["labels"][0].tolist() == [7] + plain
