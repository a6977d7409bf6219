"""The OpenAI-compatible server on 127.0.0.1: the official ``openai`` client and LangChain's
``ChatOpenAI`` against it, answers equal to the engine's, 64 concurrent requests each with its
solo answer, and a clear 4xx for every bad request while the server keeps serving."""

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from regrad_engine.prompts import with_passages  # noqa: E402
from regrad_engine.server import create_app, serving  # noqa: E402
from tests.conftest import DOCS, QUESTIONS, make_engine  # noqa: E402

MODEL_ID = "tiny-regrad"


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    engine = make_engine(tokenizer, tmp_path_factory.mktemp("store"))  # k=2, max_new_tokens=6
    yield engine
    engine.space.remove()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, max_wait_ms=50, model_id=MODEL_ID)


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def chat(client, question, **kwargs):
    return client.chat.completions.create(model="any-name", messages=user(question), **kwargs)


def alone(engine, conversation, hits, **kwargs):
    return engine.complete([conversation], [hits], **kwargs)[0]


# ------------------------------------------------------------------ the OpenAI shape
def test_chat_completion_is_the_engines_answer_with_its_sources(client, engine):
    response = chat(client, QUESTIONS[0])
    hits = engine.retrieve([QUESTIONS[0]], engine.k)[0]
    expected = alone(engine, user(QUESTIONS[0]), hits)
    assert response.object == "chat.completion" and response.model == MODEL_ID and response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert response.model_extra["sources"] == [{"id": h.id, "score": h.score} for h in hits]


def test_mode_documents_gamma_and_use_gradients(client, engine):
    fudral = engine.retriever.get("fudral")
    hybrid = chat(client, QUESTIONS[1], extra_body={"mode": "hybrid", "documents": ["fudral"], "gamma": 0.5})
    expected = alone(engine, with_passages(user(QUESTIONS[1]), [fudral.text]), [fudral], gamma=0.5)
    assert hybrid.choices[0].message.content == expected.text
    assert hybrid.usage.prompt_tokens == expected.prompt_tokens  # the passage is in the prompt
    assert hybrid.model_extra["sources"] == [{"id": "fudral", "score": 0.0}]
    # A document outside the store: its gradient is computed from the text, whatever id it is given.
    by_id = chat(client, QUESTIONS[0], extra_body={"documents": ["fox"]})  # in the index, not in the bank
    by_text = chat(client, QUESTIONS[0], extra_body={"documents": [{"text": DOCS["fox"], "id": "my-fox"}]})
    assert by_text.choices[0].message.content == by_id.choices[0].message.content
    assert by_text.model_extra["sources"] == [{"id": "my-fox", "score": 0.0}]
    renamed = chat(client, QUESTIONS[0], extra_body={"documents": [{"text": "A new text about dogs.", "id": "velmora"}]})
    unnamed = chat(client, QUESTIONS[0], extra_body={"documents": [{"text": "A new text about dogs."}]})
    assert renamed.choices[0].message.content == unnamed.choices[0].message.content
    assert unnamed.model_extra["sources"][0]["id"].startswith("text-")
    # gamma 0 is the meta-learned LoRA without document updates, as use_gradients=false is
    plain = chat(client, QUESTIONS[2], extra_body={"use_gradients": False})
    assert plain.model_extra["sources"] == []  # parametric without gradients uses no documents
    assert plain.choices[0].message.content == chat(client, QUESTIONS[2], extra_body={"gamma": 0}).choices[0].message.content
    assert plain.choices[0].message.content == alone(engine, user(QUESTIONS[2]), []).text


def test_text_completions_one_choice_per_prompt(client):
    response = client.completions.create(model="x", prompt=QUESTIONS[:2], max_tokens=5)
    assert response.object == "text_completion" and [c.index for c in response.choices] == [0, 1]
    for question, choice in zip(QUESTIONS, response.choices):
        same = chat(client, question, max_tokens=5)
        assert choice.text == same.choices[0].message.content
        assert choice.model_extra["sources"] == same.model_extra["sources"]
    assert response.usage.completion_tokens <= 10


def test_an_answer_ends_at_a_start_of_turn_marker(client, engine, monkeypatch):
    """A model that opens a new turn ('yes<|im_start|>system yes') answers 'yes', streamed or not."""
    from tests.conftest import force_runaway_turns

    assert chat(client, QUESTIONS[0], max_tokens=12).choices[0].message.content != "yes"  # the script makes it
    force_runaway_turns(monkeypatch, engine)
    whole = chat(client, QUESTIONS[0], max_tokens=12).choices[0]
    assert (whole.message.content, whole.finish_reason) == ("yes", "stop")
    streamed = list(chat(client, QUESTIONS[0], max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "yes"
    completions = client.completions.create(model="x", prompt=QUESTIONS[:2], max_tokens=12)
    assert [c.text for c in completions.choices] == ["yes", "yes"]


def test_stop_sequences_and_max_tokens(client, engine):
    whole = chat(client, QUESTIONS[3], max_tokens=8).choices[0]
    assert len(whole.message.content) >= 3
    stop = whole.message.content[1:3]
    for given in (stop, [stop, "never there"]):
        cut = chat(client, QUESTIONS[3], max_tokens=8, stop=given).choices[0]
        assert cut.message.content == whole.message.content[:whole.message.content.find(stop)]
        assert cut.finish_reason == "stop"
    short = chat(client, QUESTIONS[3], max_completion_tokens=2)
    assert short.usage.completion_tokens <= 2
    sampling = chat(client, QUESTIONS[3], max_tokens=8, temperature=1.3, top_p=0.5, seed=7)
    assert sampling.choices[0].message.content == whole.message.content  # greedy: sampling settings are ignored


# ------------------------------------------------------------------ streaming
def test_stream_sends_role_and_sources_first_then_the_same_answer(client):
    whole = chat(client, QUESTIONS[0], max_tokens=8)
    chunks = list(chat(client, QUESTIONS[0], max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["sources"] == whole.model_extra["sources"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    stop = whole.choices[0].message.content[2:4]
    cut = list(chat(client, QUESTIONS[0], max_tokens=8, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in cut) == \
        whole.choices[0].message.content[:whole.choices[0].message.content.find(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"


def test_a_stream_cut_at_a_stop_sequence_stops_generating(client, engine, monkeypatch):
    import time

    monkeypatch.setattr(engine, "_stop_ids", [])  # the answer never ends by itself: only max_tokens ends it
    forward, calls = engine.model.forward, []
    monkeypatch.setattr(engine.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    first = chat(client, QUESTIONS[2], max_tokens=4).choices[0].message.content
    calls.clear()
    list(chat(client, QUESTIONS[2], max_tokens=3000, stop=first[:2], stream=True))
    time.sleep(0.5)
    assert len(calls) < 50  # not 3000: generation stopped with the stream


def test_streamed_text_completion_ends_with_done(url, client):
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": QUESTIONS[1], "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["object"] == "text_completion" and "sources" in events[0]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == client.completions.create(model="x", prompt=QUESTIONS[1]).choices[0].text


# ------------------------------------------------------------------ LangChain
def test_langchain_chat_openai_invoke_and_stream(url, client):
    langchain_openai = pytest.importorskip("langchain_openai")
    extra = {"mode": "hybrid", "documents": ["velmora", {"text": DOCS["gredin"]}]}
    llm = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model=MODEL_ID, max_tokens=8,
                                      extra_body=extra, max_retries=0)
    expected = chat(client, QUESTIONS[0], max_tokens=8, extra_body=extra).choices[0].message.content
    message = llm.invoke(QUESTIONS[0])
    assert message.content == expected and message.response_metadata["model_name"] == MODEL_ID
    assert "".join(chunk.content for chunk in llm.stream(QUESTIONS[0])) == expected
    parametric = llm.bind(extra_body={"mode": "parametric", "documents": ["velmora"]}).invoke(QUESTIONS[0])
    assert parametric.content == chat(client, QUESTIONS[0], max_tokens=8,
                                      extra_body={"documents": ["velmora"]}).choices[0].message.content


# ------------------------------------------------------------------ dynamic batching
def load_requests():
    """64 requests that differ in question, mode, documents, gamma and answer length."""
    documents = [None, ["velmora"], ["fudral", "gredin"], [{"text": DOCS["fox"]}]]
    return [{"question": QUESTIONS[i % 4], "max_tokens": 3 + i % 5,
             "extra_body": {"mode": ("parametric", "hybrid")[i // 4 % 2], "gamma": (0.5, 1.0, 2.0)[i % 3],
                            **({"documents": documents[i // 8 % 4]} if documents[i // 8 % 4] else {})}}
            for i in range(64)]


def test_64_concurrent_requests_each_get_their_solo_answer(client, app):
    requests = load_requests()

    def send(request):
        response = chat(client, request["question"], max_tokens=request["max_tokens"],
                        extra_body=request["extra_body"])
        return (response.choices[0].message.content, response.choices[0].finish_reason,
                response.usage.completion_tokens, response.model_extra["sources"])

    stats = app.state.batcher.stats
    before = (stats.batches, stats.jobs)
    solo = [send(r) for r in requests]
    assert stats.batches - before[0] == stats.jobs - before[1] == 64  # one at a time: batches of one
    assert len({answer[0] for answer in solo}) > 16  # the requests really differ
    before = (stats.batches, stats.jobs)
    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(send, requests))
    assert together == solo
    assert stats.jobs - before[1] == 64 and stats.batches - before[0] < 64  # some requests shared a batch
    assert max(stats.sizes) > 1


# ------------------------------------------------------------------ bad requests
def body(**fields):
    return {"model": "x", "messages": user(QUESTIONS[0]), **fields}


BAD_REQUESTS = [
    (body(mode="both"), "mode must be 'parametric' or 'hybrid'", "mode"),
    (body(k=0), "k must be a positive integer, got 0", "k"),
    (body(gamma=-1), "gamma must be finite and between 0", "gamma"),
    (body(messages=[]), "messages must be a non-empty list", "messages"),
    (body(messages=user("   ")), "empty", "messages"),
    (body(messages=[{"role": "wizard", "content": "hi"}]), "role must be one of", "messages"),
    (body(documents=["nope"]), "unknown document id 'nope'", "documents.0"),
    (body(documents="velmora"), "documents must be a list", "documents"),
    (body(documents=[{"text": "x"}]), "too short for a gradient", "documents.0"),
    (body(n=2), "n=2 is not supported: decoding is greedy", "n"),
    (body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools and function calling",
     "tools"),
    (body(logprobs=True), "logprobs are not supported", "logprobs"),
    (body(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}),
     "'json_schema' is not supported", "response_format"),
    (body(max_tokens=0), "max_tokens must be a positive integer", "max_tokens"),
    (body(use_gradients="yes"), "use_gradients must be true or false", "use_gradients"),
    (body(stop=[""]), "stop sequence must be a non-empty string", "stop"),
    (body(documnets=["velmora"]), "unknown field 'documnets'", "documnets"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "only text content is supported", "messages.0.content"),
    (body(messages=user("word " * 9000)), r"the prompt is \d+ tokens; this engine reads at most \d+", None),
    ({"model": "x"}, "messages is required", "messages"),
]


@pytest.mark.parametrize("payload, message, param", BAD_REQUESTS, ids=[p or "long" for _, _, p in BAD_REQUESTS])
def test_a_bad_chat_request_gets_400_and_the_server_keeps_serving(url, client, payload, message, param):
    response = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]) and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert chat(client, QUESTIONS[0], max_tokens=2).choices[0].message.content is not None


@pytest.mark.parametrize("content, message", [
    (b'{"model": "x", "messages": [', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_malformed_bodies_get_400(url, client, content, message):
    response = httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_text_completion_refusals(url):
    for payload, message in [({"prompt": []}, "send 1 to 64 prompts"), ({"prompt": "a b", "echo": True}, "echo"),
                             ({"prompt": ["a b", "c d"], "stream": True}, "stream one prompt"),
                             ({"prompt": "a b", "best_of": 3}, "best_of must be 1")]:
        response = httpx.post(f"{url}/v1/completions", json=payload)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_the_openai_client_shows_the_message(client):
    with pytest.raises(openai.BadRequestError, match="unknown document id 'nope'"):
        chat(client, QUESTIONS[0], extra_body={"documents": ["nope"]})


def test_unknown_routes_and_models_are_404(url, client):
    response = httpx.get(f"{url}/v1/nothing")
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-4'"):
        client.models.retrieve("gpt-4")


# ------------------------------------------------------------------ models, health, readiness
def test_models_health_and_readiness(url, client, engine):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    idle = create_app(engine)  # its lifespan never ran: no batch worker

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idle), base_url="http://idle") as raw:
            return (await raw.get("/ready")).status_code, (await raw.get("/health")).status_code

    assert asyncio.run(probe()) == (503, 200)


# ------------------------------------------------------------------ README snippet, CLI
def test_readme_snippet_runs_against_the_server(url, engine):
    from tests.server.snippets.openai_client import ask

    text, ids = ask(QUESTIONS[0], base_url=f"{url}/v1")
    hits = engine.retrieve([QUESTIONS[0]], 3)[0]
    assert ids == [h.id for h in hits]
    assert text == alone(engine, user(QUESTIONS[0]), hits, max_new_tokens=20).text


def test_cli_serve_opens_the_store_and_serves(monkeypatch, engine):
    from regrad_engine import cli, server

    seen = {}
    monkeypatch.setattr(cli, "_open", lambda args, **kw: seen.update(engine_kwargs=kw) or engine)
    monkeypatch.setattr(server, "serve", lambda eng, **kw: seen.update(serve=kw))
    assert cli.main(["serve", "--store", "s", "--port", "9001", "--max-batch", "4", "--mode", "hybrid",
                     "--max-tokens", "12"]) == 0
    assert seen["engine_kwargs"] == {"k": 3, "mode": "hybrid", "gamma": 1.0, "max_new_tokens": 12}
    assert seen["serve"]["port"] == 9001 and seen["serve"]["max_batch"] == 4


def test_cli_serve_refuses_bad_flags(capsys, tmp_path):
    from regrad_engine import cli

    assert cli.main(["serve", "--store", str(tmp_path / "none"), "--max-batch", "0"]) == 2
    assert "--max-batch must be a positive integer" in capsys.readouterr().err
    assert cli.main(["serve", "--store", str(tmp_path / "none")]) == 2
    assert "no regrad store" in capsys.readouterr().err

