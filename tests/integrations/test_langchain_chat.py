"""ChatReGrad and the run-tree hand-off: documents reach the model of their own invocation,
however format_docs writes them, and never another chain's."""

import asyncio
import html
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.load import dumpd, load  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from regrad_engine.errors import RequestError  # noqa: E402
from regrad_integrations._registry import normalize  # noqa: E402
from regrad_integrations.langchain import (  # noqa: E402
    ChatReGrad,
    NoDocumentsWarning,
    ReGradLLM,
    ReGradRetriever,
    regrad_langchain,
)
from regrad_integrations.langchain._base import SCOPES  # noqa: E402
from tests.integrations.conftest import DOCS, QUESTIONS  # noqa: E402

TEMPLATE = "Context:\n{context}\n\nQuestion: {question}\nAnswer briefly."
MAX_NEW = 8

FORMATS = {
    "truncated": lambda docs: "\n\n".join(d.page_content[:45] + "..." for d in docs),
    "collapsed": lambda docs: " ".join(" ".join(d.page_content.split()) for d in docs),
    "lowercased": lambda docs: "\n".join(d.page_content.lower() for d in docs),
    "json": lambda docs: json.dumps([d.page_content for d in docs]),
    "html": lambda docs: "".join(f"<p>{html.escape(d.page_content)}</p>" for d in docs),
}


@pytest.fixture()
def model_inputs(engine, monkeypatch):
    """Every prompt (user message or conversation) the model reads, with its documents."""
    seen, complete, stream = [], engine.complete, engine.stream_message

    def spy_complete(messages, documents, **kwargs):
        seen.extend(zip(messages, [[h.id for h in d] for d in documents]))
        return complete(messages, documents, **kwargs)

    def spy_stream(message, documents, **kwargs):
        seen.append((message, [h.id for h in documents]))
        return stream(message, documents, **kwargs)

    monkeypatch.setattr(engine, "complete", spy_complete)
    monkeypatch.setattr(engine, "stream_message", spy_stream)
    return seen


def text_of(prompt):
    return prompt if isinstance(prompt, str) else "\n".join(turn["content"] for turn in prompt)


def contains(prompt, doc_text):
    """Whether the prompt still holds the document, however it was written."""
    return normalize(doc_text[:40])[0] in normalize(text_of(prompt))[0]


def chain_of(retriever, model, format_docs):
    prompt = ChatPromptTemplate.from_template(TEMPLATE)
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | model | StrOutputParser()


@pytest.mark.parametrize("chat", [False, True], ids=["llm", "chat"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_documents_reach_the_model_however_format_docs_writes_them(engine, model_inputs, name, chat):
    model, retriever = regrad_langchain(engine, k=2, chat=chat)
    model = model.model_copy(update={"max_new_tokens" if not chat else "max_tokens": MAX_NEW})
    parametric = chain_of(retriever, model, FORMATS[name])
    hybrid = chain_of(retriever, model.model_copy(update={"mode": "hybrid"}), FORMATS[name])
    for question in QUESTIONS[:2]:
        ids = [d.id for d in retriever.invoke(question)]
        model_inputs.clear()
        parametric.invoke(question)
        hybrid.invoke(question)
        (plain, plain_ids), (full, full_ids) = model_inputs
        assert plain_ids == full_ids == ids  # the documents' gradients, found by the run tree
        assert not any(contains(plain, DOCS[i]) for i in ids) and question in text_of(plain)
        assert all(contains(full, DOCS[i]) for i in ids)


def test_two_unrelated_chains_on_one_engine_never_share_documents(engine, model_inputs):
    llm, retriever = regrad_langchain(engine, k=2)
    llm = llm.model_copy(update={"max_new_tokens": MAX_NEW})

    class Unwrapped(BaseRetriever):
        """Another framework's retriever, not wrapped: it returns the same texts."""

        def _get_relevant_documents(self, query, *, run_manager):
            return [Document(page_content=DOCS["velmora"]), Document(page_content=DOCS["fudral"])]

    def fmt(docs):
        return "\n\n".join(d.page_content for d in docs)

    ours, theirs = chain_of(retriever, llm, fmt), chain_of(Unwrapped(), llm, fmt)
    ours.invoke("Where was Velmora Quistan born?")  # registers nothing globally: its documents stay in its tree
    model_inputs.clear()
    with pytest.warns(NoDocumentsWarning):
        theirs.invoke("Where was Velmora Quistan born?")
    assert model_inputs[0][1] == []  # the other chain's prompt holds the texts, but gets no gradients

    def run(question):
        return ours.invoke(question)

    alone = {q: run(q) for q in QUESTIONS}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(run, QUESTIONS * 3))
    assert together == [alone[q] for q in QUESTIONS * 3]
    assert len(SCOPES) == 0  # every run's entry went with the run


def test_a_retriever_called_by_hand_still_reaches_the_llm_by_text(engine, model_inputs):
    llm, retriever = regrad_langchain(engine, k=2)
    docs = retriever.invoke(QUESTIONS[0])  # outside any chain
    prompt = TEMPLATE.format(context="\n\n".join(d.page_content for d in docs), question=QUESTIONS[0])
    llm.invoke(prompt, max_new_tokens=MAX_NEW)
    assert model_inputs[-1][1] == [d.id for d in docs] and not contains(model_inputs[-1][0], docs[0].page_content)
    llm.invoke(QUESTIONS[0], documents=docs[:1], max_new_tokens=MAX_NEW)  # explicit wins
    assert model_inputs[-1][1] == [docs[0].id]


@pytest.fixture()
def chat(engine):
    return ChatReGrad(engine=engine, max_tokens=MAX_NEW)


def test_chat_keeps_roles_and_returns_an_ai_message_with_usage_and_sources(engine, chat, model_inputs):
    docs = [Document(id="velmora", page_content=DOCS["velmora"])]
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage(QUESTIONS[0])]
    answer = chat.invoke(messages, documents=docs)
    conversation, ids = model_inputs[-1]
    assert [t["role"] for t in conversation] == ["system", "user", "assistant", "user"] and ids == ["velmora"]
    assert conversation[0]["content"] == "Be brief." and not contains(conversation, DOCS["velmora"])
    completion = engine.complete([conversation], [[engine.retriever.get("velmora")]], max_new_tokens=MAX_NEW)[0]
    assert isinstance(answer, AIMessage) and answer.content == completion.text
    assert answer.usage_metadata == {"input_tokens": completion.prompt_tokens,
                                     "output_tokens": completion.completion_tokens,
                                     "total_tokens": completion.prompt_tokens + completion.completion_tokens}
    assert answer.response_metadata["sources"] == ["velmora"] and answer.response_metadata["mode"] == "parametric"
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    # hybrid puts documents the messages lack before the last user turn
    chat.model_copy(update={"mode": "hybrid"}).invoke(messages, documents=docs)
    assert model_inputs[-1][0][3]["content"].startswith("Context:\n[1] " + DOCS["velmora"][:20])


def test_chat_stream_async_and_batch_agree_with_invoke(chat, model_inputs):
    docs = [Document(id="fudral", page_content=DOCS["fudral"])]
    full = chat.invoke(QUESTIONS[1], documents=docs)
    chunks = list(chat.stream(QUESTIONS[1], documents=docs))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert joined.content == full.content and chunks[-1].chunk_position == "last"
    assert joined.usage_metadata == full.usage_metadata and joined.response_metadata["sources"] == ["fudral"]
    assert asyncio.run(chat.ainvoke(QUESTIONS[1], documents=docs)).content == full.content
    many = chat.batch(QUESTIONS, documents=docs)
    assert many[1].content == full.content and len(many) == len(QUESTIONS)


def test_chat_in_a_rag_chain_and_with_tool_artifacts(engine, chat, model_inputs):
    retriever = ReGradRetriever(engine=engine, k=2)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from what you know."), ("human", TEMPLATE)])
    chain = ({"context": retriever | FORMATS["collapsed"], "question": RunnablePassthrough()} | prompt | chat
             | StrOutputParser())
    answer = chain.invoke(QUESTIONS[2])
    conversation, ids = model_inputs[-1]
    assert ids == [d.id for d in retriever.invoke(QUESTIONS[2])] and conversation[0]["role"] == "system"
    assert isinstance(answer, str)
    tool = ToolMessage(content=DOCS["ailpelou"], tool_call_id="1",
                       artifact=[Document(id="ailpelou", page_content=DOCS["ailpelou"])])
    chat.invoke([HumanMessage(QUESTIONS[2]), AIMessage(""), tool])
    conversation, ids = model_inputs[-1]
    assert ids == ["ailpelou"] and [t["role"] for t in conversation] == ["user", "assistant", "tool"]
    assert conversation[2]["content"] == ""  # parametric: the tool's passage reaches the model as gradients only


def test_chat_structured_output_asks_for_json_and_parses_it(engine, chat, monkeypatch):
    from regrad_engine.inference import Completion

    class City(BaseModel):
        name: str

    replies, seen = iter(['{"name": "Lisbon"}', "nope", '{"name": "Tokyo"}']), []

    def reply(messages, documents, **kwargs):  # the model's text is scripted; the path around it is real
        seen.append(messages[0])
        return [Completion(next(replies), 5, 5, "stop")]

    monkeypatch.setattr(engine, "complete", reply)
    with pytest.warns(NoDocumentsWarning):  # parametric, and no documents for these calls
        assert chat.with_structured_output(City).invoke(QUESTIONS[0]) == City(name="Lisbon")
        assert seen[-1][-1]["content"].startswith(QUESTIONS[0]) and '"name"' in seen[-1][-1]["content"]
        out = chat.with_structured_output(City, include_raw=True).invoke([HumanMessage(QUESTIONS[0])])
        assert out["parsed"] is None and out["parsing_error"] is not None and out["raw"].content == "nope"
        as_dict = chat.with_structured_output(City.model_json_schema(), method="json_mode")
        assert as_dict.invoke(QUESTIONS[0]) == {"name": "Tokyo"}


def test_chat_refuses_what_it_cannot_do_with_the_reason(engine, chat):
    with pytest.raises(NotImplementedError, match="cannot call tools.*ToolMessage artifact"):
        chat.bind_tools([])
    with pytest.raises(ValueError, match="decodes greedily"):
        ChatReGrad(engine=engine, temperature=0.7)
    with pytest.raises(ValueError, match="pass engine=open_engine"):
        ChatReGrad()
    with pytest.raises(RequestError, match="documents= takes a list"):
        chat.invoke("Where?", documents="velmora")
    with pytest.raises(RequestError, match="strict=True makes this an error"):
        chat.model_copy(update={"strict": True}).invoke("Where?")


def test_token_counts_use_the_engines_tokenizer(engine, chat):
    llm = ReGradLLM(engine=engine)
    text = "Where was Velmora Quistan born?"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.get_token_ids(text) == chat.get_token_ids(text) == ids
    assert llm.get_num_tokens(text) == chat.get_num_tokens(text) == len(ids) > 0
    assert chat.get_num_tokens_from_messages([HumanMessage(text)]) == engine.count_tokens(text)
    result = llm.generate([text], documents=[], max_new_tokens=4)
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] == engine.count_tokens(text) and 1 <= usage["completion_tokens"] <= 4


def test_models_serialise_by_store_path(engine, tmp_path):
    engine.store_dir = str(tmp_path / "store")  # as Store.engine records it
    try:
        for model in (ChatReGrad(engine=engine, mode="hybrid"), ReGradLLM(engine=engine, gamma=0.5)):
            data = dumpd(model)
            assert data["kwargs"]["store"] == str(tmp_path / "store") and "engine" not in data["kwargs"]
            loaded = load(data, valid_namespaces=["regrad_integrations"], allowed_objects=[type(model)])
            assert type(loaded) is type(model) and loaded.engine is None
            assert loaded.store == model.store and loaded.mode == model.mode and loaded.gamma == model.gamma
            with pytest.raises(Exception, match="regrad build|no store|not a store"):
                loaded.invoke("Where?")  # opens the store on first use: there is none
    finally:
        engine.store_dir = None


def test_concurrent_chat_calls_get_their_own_documents(chat):
    jobs = [(q, [Document(id=i, page_content=DOCS[i])]) for q in QUESTIONS for i in ("velmora", "fudral")]
    alone = [chat.invoke(q, documents=d) for q, d in jobs]
    barrier = threading.Barrier(4)

    def run(job):
        if jobs.index(job) < 4:
            barrier.wait(timeout=30)
        return chat.invoke(job[0], documents=job[1])

    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(run, jobs))
    assert [m.content for m in together] == [m.content for m in alone]
    assert [m.response_metadata["sources"] for m in together] == [[d[0].id] for _, d in jobs]


try:
    from langchain_tests.unit_tests import ChatModelUnitTests
except ImportError:  # langchain-tests not installed: the standard suite is not collected
    ChatModelUnitTests = object


@pytest.mark.skipif(ChatModelUnitTests is object, reason="needs langchain-tests")
class TestChatReGradUnit(ChatModelUnitTests):
    """langchain-tests' standard chat-model unit suite. The model names a store it opens on
    first use; the unit suite never generates, so the store need not exist."""

    @property
    def chat_model_class(self):
        return ChatReGrad

    @property
    def chat_model_params(self):
        return {"store": "my-store"}

    @property
    def has_tool_calling(self):
        return False  # bind_tools is overridden only to say why it is not supported

    @property
    def has_structured_output(self):
        return True

    @pytest.mark.xfail(reason="langchain-core's load(allowed_objects='all') admits only the classes of its own "
                              "mapping; the round trip with ChatReGrad allowed by name is "
                              "test_models_serialise_by_store_path", strict=True)
    def test_serdes(self, model, snapshot):
        super().test_serdes(model, snapshot)


def test_other_models_keep_their_async_callback_events(engine):
    from langchain_core.language_models.fake import FakeStreamingListLLM
    from langchain_core.prompts import PromptTemplate

    ChatReGrad(engine=engine)  # installs the run-tree handler for every run from now on

    async def events():
        chain = PromptTemplate.from_template("Q: {q}") | FakeStreamingListLLM(responses=["abc def"])
        return [e["event"] async for e in chain.astream_events({"q": "x"}, version="v2")]

    kinds = asyncio.run(events())
    assert "on_llm_start" in kinds and "on_llm_end" in kinds


class _Empty(BaseRetriever):
    def _get_relevant_documents(self, query, *, run_manager):
        return []


def test_chains_side_by_side_in_one_invocation_keep_their_own_documents(engine, chat, model_inputs):
    from langchain_core.runnables import RunnableLambda

    def fmt(docs):
        return "\n\n".join(d.page_content for d in docs)

    prompt = ChatPromptTemplate.from_template(TEMPLATE)
    rag = {"context": ReGradRetriever(engine=engine, k=2) | fmt, "question": RunnablePassthrough()} | prompt | chat
    found_none = ({"context": ReGradRetriever(engine=engine, k=2, base_retriever=_Empty()) | fmt,
                   "question": RunnablePassthrough()} | prompt | chat)
    plain = ChatPromptTemplate.from_template("Say hi to {q}") | chat
    for other in (RunnableLambda(lambda q: plain.invoke({"q": q})), found_none):
        both = RunnableLambda(lambda q, other=other: {"a": rag.invoke(q), "b": other.invoke(q)})
        model_inputs.clear()
        with pytest.warns(NoDocumentsWarning):
            out = both.invoke(QUESTIONS[0])
        assert out["a"].response_metadata["sources"] != [] and out["b"].response_metadata["sources"] == []
    assert len(SCOPES) == 0


def test_a_retriever_wrapping_a_regrad_retriever_hands_on_its_documents(engine, chat, model_inputs):
    class Wrapper(BaseRetriever):  # what compression, ensemble and multi-query retrievers do
        inner: BaseRetriever

        def _get_relevant_documents(self, query, *, run_manager):
            return self.inner.invoke(query, config={"callbacks": run_manager.get_child()})

    inner = ReGradRetriever(engine=engine, k=2)
    chain_of(Wrapper(inner=inner), chat, FORMATS["collapsed"]).invoke(QUESTIONS[0])
    assert model_inputs[-1][1] == [d.id for d in inner.invoke(QUESTIONS[0])]
    assert len(SCOPES) == 0


def test_bad_call_options_get_clear_errors_and_no_llm_cache(engine, chat):
    llm = ReGradLLM(engine=engine, max_new_tokens=4)
    docs = [Document(id="velmora", page_content=DOCS["velmora"])]
    for model in (llm, chat):
        with pytest.raises(RequestError, match="decoding is greedy"):
            model.invoke("Where?", documents=docs, top_p=0.9)
        with pytest.raises(RequestError, match="unknown generation option 'seeed'"):
            model.invoke("Where?", documents=docs, seeed=1)
        with pytest.raises(RequestError, match="has no text"):
            model.invoke("Where?", documents=[Document(page_content="  ")])
        with pytest.raises(RequestError, match="leaves no room for a prompt"):
            model.invoke("Where?", documents=docs, max_new_tokens=10**7)
        with pytest.raises(ValueError, match="do not use an LLM cache"):
            type(model)(engine=engine, cache=True)
    with pytest.raises(RequestError, match="decoding is greedy"):
        llm.invoke("Where?", documents=docs, temperature=0.7)
    full = llm.invoke("Where?", documents=docs)
    assert llm.invoke("Where?", documents=docs, stop=full[1:3]) == full[:full.find(full[1:3])].rstrip()  # a string


def test_a_stream_cut_by_a_stop_sequence_reports_the_tokens_generated(engine, chat):
    docs = [Document(id="velmora", page_content=DOCS["velmora"])]
    full = chat.invoke(QUESTIONS[0], documents=docs)
    chunks = list(chat.stream(QUESTIONS[0], documents=docs, stop=[full.content[2:4]]))
    usage = chunks[-1].usage_metadata
    assert usage["input_tokens"] == full.usage_metadata["input_tokens"]
    assert 1 <= usage["output_tokens"] <= full.usage_metadata["output_tokens"]


def test_documents_are_cut_only_whole_and_never_when_too_short():
    from regrad_engine.retrieval import Hit
    from regrad_integrations._registry import DocumentRegistry, locate

    short, art = Hit("p", "Paris", 1.0), Hit("a", "art of the party start", 1.0)
    prompt = "Tell me about Parisian cafes in paris. Where does the party start? art of the party starts"
    spans, missing = locate(prompt, [short, art])
    assert missing == [short, art] and spans == []  # too short; and only inside a word ("starts")
    doc = Hit("d", "The Fudral Bureau is based in Tokyo.", 1.0)
    spans, missing = locate(f"Q? {doc.text} and again: {doc.text.upper()}", [doc])
    assert missing == [] and len(spans) == 2
    assert DocumentRegistry.strip("XThe Fudral Bureau is based in Tokyo. end",
                                  locate("XThe Fudral Bureau is based in Tokyo. end", [doc])[0]).startswith("XThe")


def test_a_chat_rag_chain_streams_the_answer_it_invokes_with_the_same_documents(engine, chat, model_inputs):
    for mode in ("parametric", "hybrid"):
        chain = chain_of(ReGradRetriever(engine=engine, k=2), chat.model_copy(update={"mode": mode}),
                         FORMATS["collapsed"])
        for question in QUESTIONS:
            model_inputs.clear()
            answer = chain.invoke(question)
            assert "".join(chain.stream(question)) == answer
            assert asyncio.run(chain.ainvoke(question)) == answer
            assert "".join(asyncio.run(_collect(chain.astream(question)))) == answer
            assert len({tuple(ids) for _, ids in model_inputs}) == 1 and model_inputs[0][1]


async def _collect(stream):
    return [piece async for piece in stream]
