import asyncio
import re
import socket
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.base.response.schema import Response, StreamingResponse  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode  # noqa: E402

from regrad_engine.data import read_corpus  # noqa: E402
from regrad_engine.errors import RequestError  # noqa: E402
from regrad_engine.retrieval import Hit  # noqa: E402
from regrad_integrations._registry import registry_for  # noqa: E402
import regrad_integrations.llama_index  # noqa: E402
from regrad_integrations.llama_index import (  # noqa: E402
    NoDocumentsWarning,
    OnTheFlyWarning,
    ReGradLLM,
    ReGradQueryEngine,
    ReGradRetriever,
    write_corpus,
)
from tests.conftest import DOCS, IN_BANK, make_engine, make_tokenizer  # noqa: E402
from tests.integrations.snippets.llama_index_rag import (  # noqa: E402
    build_index_query_engine,
    build_query_engine,
    build_retriever_query_engine,
)

QUESTIONS = ["Where was Velmora Quistan born?", "Where is the Fudral Bureau based?",
             "Which river does Ailpelou lie on?", "What does Gredin Quibiku speak?",
             "What does Velmora Quistan play?", "Where does the Fudral Bureau sell?",
             "What sport is popular in Ailpelou?", "What jumps over the lazy dog?"]
MODES = ("parametric", "hybrid")
# Every pipeline here must hand its nodes to the LLM: a parametric call without any fails the test.
pytestmark = pytest.mark.filterwarnings("error::regrad_integrations.llama_index.NoDocumentsWarning")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The shared tiny engine (tests/conftest.py): sdpa float64 tiny Llama, "fox" not in the bank."""
    return make_engine(make_tokenizer(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: LlamaIndex must not fetch a tokenizer (tiktoken, nltk) or a model."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.delenv("TIKTOKEN_CACHE_DIR", raising=False)  # llama-index-core's bundled cl100k is used
        yield


class WordEmbedding(BaseEmbedding):
    """A local embedding, no model: hashed bag of lower-cased words (similar words, similar vectors)."""

    def _embed(self, text):
        vector = [0.0] * 64
        for word in re.findall(r"\w+", text.lower()):
            vector[zlib.crc32(word.encode()) % 64] += 1.0
        return vector

    def _get_text_embedding(self, text):
        return self._embed(text)

    def _get_query_embedding(self, query):
        return self._embed(query)

    async def _aget_query_embedding(self, query):
        return self._embed(query)


def make_index(ids=None, with_ids=True):
    """A VectorStoreIndex built the LlamaIndex way over DOCS (Document ids = bank ids, unless
    ``with_ids=False``: then random ids, with the bank id in ``metadata["doc_id"]``)."""
    documents = [Document(text=DOCS[i], metadata={"doc_id": i}, **({"id_": i} if with_ids else {}))
                 for i in (ids or DOCS)]
    return VectorStoreIndex.from_documents(documents, embed_model=WordEmbedding())


@pytest.fixture(scope="module")
def index():
    return make_index()


@pytest.fixture(scope="module")
def banked_index():
    return make_index(IN_BANK)


class Spy:
    """Records every engine.complete / stream_message call: (message or conversation,
    document ids), and every on-the-fly gradient computation."""

    def __init__(self, engine, monkeypatch):
        self.calls, self.computed, self.lock = [], [], threading.Lock()
        self.complete, document_gradients = engine.complete, engine.document_gradients
        stream_message = engine.stream_message

        def stream(message, documents, **kwargs):
            with self.lock:
                self.calls.append((message, [h.id for h in documents]))
            return stream_message(message, documents, **kwargs)

        def complete(messages, documents, **kwargs):
            with self.lock:
                self.calls += [(m, [h.id for h in d]) for m, d in zip(messages, documents)]
            return self.complete(messages, documents, **kwargs)

        def computed(hits, *args, **kwargs):
            with self.lock:
                self.computed += [h.id for h in hits]
            return document_gradients(hits, *args, **kwargs)

        monkeypatch.setattr(engine, "complete", complete)
        monkeypatch.setattr(engine, "stream_message", stream)
        monkeypatch.setattr(engine, "document_gradients", computed)


@pytest.fixture()
def spy(engine, monkeypatch):
    return Spy(engine, monkeypatch)


def text_of(message):
    return message if isinstance(message, str) else "\n".join(turn["content"] for turn in message)


class FixedRetriever(BaseRetriever):
    """Another LlamaIndex retriever: always the same nodes, one of them unknown to the bank and index."""

    NODES = [("fox", DOCS["fox"], 2.0), ("outside", "Tarnel Vesko repairs clocks in Oslo every winter.", 1.0),
             ("velmora", DOCS["velmora"], None)]

    def _retrieve(self, query_bundle):
        return [NodeWithScore(node=TextNode(id_=i, text=t), score=s) for i, t, s in self.NODES]


def test_public_api_is_pinned():
    assert sorted(regrad_integrations.llama_index.__all__) == [
        "NoDocumentsWarning", "OnTheFlyWarning", "ReGradLLM", "ReGradQueryEngine", "ReGradRetriever", "write_corpus"]
    assert issubclass(NoDocumentsWarning, UserWarning) and issubclass(OnTheFlyWarning, UserWarning)


def retrieved_ids(engine, question):
    return [h.id for h in engine.retrieve([question], engine.k)[0]]


@pytest.mark.parametrize("mode", MODES)
def test_query_engine_answers_like_the_engine_with_the_retrieved_nodes(engine, mode):
    query_engine = ReGradQueryEngine(engine=engine, mode=mode)
    response = query_engine.query(QUESTIONS[0])
    assert isinstance(response, Response)
    assert response.response == engine.answer(QUESTIONS[0], mode=mode).text
    ids = retrieved_ids(engine, QUESTIONS[0])
    assert [n.node_id for n in response.source_nodes] == ids
    assert response.source_nodes[0].node.get_content() == DOCS[ids[0]]
    assert response.source_nodes[0].node.metadata == {"title": ids[0]}
    assert response.source_nodes[0].score > 0
    assert response.metadata == {"mode": mode, "sources": ids}
    assert asyncio.run(query_engine.aquery(QUESTIONS[0])).response == response.response


def test_k_and_max_new_tokens_are_passed_on(engine):
    response = ReGradQueryEngine(engine=engine, k=1, max_new_tokens=2).query(QUESTIONS[1])
    assert len(response.source_nodes) == 1
    assert response.response == engine.answer(QUESTIONS[1], k=1, max_new_tokens=2).text


@pytest.mark.parametrize("mode", MODES)
def test_streaming_yields_the_same_text(engine, mode):
    streaming = ReGradQueryEngine(engine=engine, mode=mode, streaming=True).query(QUESTIONS[2])
    assert isinstance(streaming, StreamingResponse)
    assert [n.node_id for n in streaming.source_nodes] == retrieved_ids(engine, QUESTIONS[2])
    assert "".join(streaming.response_gen).strip() == engine.answer(QUESTIONS[2], mode=mode).text


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_ends_at_a_start_of_turn_marker(engine, mode, monkeypatch):
    """A model that opens a new turn ('yes<|im_start|>system yes') answers 'yes' through every LlamaIndex path."""
    from tests.conftest import force_runaway_turns

    assert ReGradQueryEngine(engine=engine, mode=mode).query(QUESTIONS[0]).response != "yes"  # the script makes it
    force_runaway_turns(monkeypatch, engine)
    query_engine = ReGradQueryEngine(engine=engine, mode=mode, max_new_tokens=12)
    assert query_engine.query(QUESTIONS[0]).response == "yes"
    assert [r.response for r in query_engine.query_batch(QUESTIONS[:2])] == ["yes", "yes"]
    streaming = ReGradQueryEngine(engine=engine, mode=mode, streaming=True, max_new_tokens=12).query(QUESTIONS[0])
    assert "".join(streaming.response_gen).strip() == "yes"
    hits = engine.retrieve([QUESTIONS[0]], engine.k)[0]
    llm = ReGradLLM(engine=engine, mode=mode, max_new_tokens=12)
    nodes = "\n\n".join(h.text for h in hits)
    prompt = f"Context information is below.\n{nodes}\nQuery: {QUESTIONS[0]}\nAnswer: "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bare prompt names no nodes: the gradients do not matter here
        assert llm.complete(prompt).text == "yes"
        assert list(llm.stream_complete(prompt))[-1].text == "yes"
        assert llm.chat([ChatMessage(role=MessageRole.USER, content=prompt)]).message.content == "yes"


def test_query_batch_equals_one_at_a_time_in_one_engine_call(engine, monkeypatch):
    query_engine = ReGradQueryEngine(engine=engine, mode="hybrid")
    alone = [query_engine.query(q) for q in QUESTIONS[:4]]
    calls = []
    real = engine.answer_batch
    monkeypatch.setattr(engine, "answer_batch", lambda qs, **kw: calls.append(qs) or real(qs, **kw))
    together = query_engine.query_batch(QUESTIONS[:4])
    assert calls == [QUESTIONS[:4]]
    assert [r.response for r in together] == [r.response for r in alone]
    assert [r.metadata for r in together] == [r.metadata for r in alone]


@pytest.mark.filterwarnings("ignore:.*computed on the fly")
def test_documents_from_another_retriever_are_used_by_node_id(engine):
    query_engine = ReGradQueryEngine(engine=engine, retriever=FixedRetriever(), mode="hybrid")
    response = query_engine.query(QUESTIONS[7])
    assert [n.node_id for n in response.source_nodes] == ["fox", "outside", "velmora"]
    hits = [Hit(id=i, text=t, score=s or 0.0) for i, t, s in FixedRetriever.NODES]
    assert response.response == engine.answer(QUESTIONS[7], mode="hybrid", documents=hits).text
    assert response.response != engine.answer(QUESTIONS[7], mode="hybrid", documents=hits[::2]).text
    assert "outside" not in engine.bank  # computed on the fly, not written back


@pytest.mark.filterwarnings("ignore:.*computed on the fly")
def test_16_threads_get_the_answers_they_get_alone(engine):
    jobs = [(q, m) for q in QUESTIONS for m in MODES]
    engines = {m: ReGradQueryEngine(engine=engine, mode=m) for m in MODES}
    expected = [engines[m].query(q).response for q, m in jobs]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait(timeout=30)
        return engines[job[1]].query(job[0]).response

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == expected


@pytest.mark.parametrize("mode", MODES)
def test_own_index_query_engine_applies_the_retrieved_nodes_gradients(engine, index, spy, mode):
    query_engine = index.as_query_engine(llm=ReGradLLM(engine=engine, mode=mode), similarity_top_k=2)
    response = query_engine.query(QUESTIONS[0])
    ids = [n.node.ref_doc_id for n in response.source_nodes]
    assert "velmora" in ids and len(ids) == 2 and set(ids) <= set(IN_BANK)
    [(conversation, documents)] = spy.calls  # compact: one call
    assert documents == ids  # exactly the retrieved nodes, by their Document ids
    assert spy.computed == []  # all in the bank: nothing computed on the fly
    assert [turn["role"] for turn in conversation] == ["system", "user"]
    assert QUESTIONS[0] in conversation[-1]["content"]
    assert all((DOCS[i] in text_of(conversation)) == (mode == "hybrid") for i in ids)  # parametric: cut out
    hits = [engine.retriever.get(i) for i in ids]
    assert response.response == spy.complete([conversation], [hits])[0].text
    assert asyncio.run(query_engine.aquery(QUESTIONS[0])).response == response.response
    assert spy.calls[-1][1] == ids
    streaming = index.as_query_engine(llm=ReGradLLM(engine=engine, mode=mode), similarity_top_k=2, streaming=True)
    streamed = streaming.query(QUESTIONS[0])  # the query's spans have ended when the text is read
    assert "".join(streamed.response_gen).strip() == response.response
    assert spy.calls[-1] == (conversation, ids)

    async def stream_async():
        streamed = await streaming.aquery(QUESTIONS[0])
        return "".join([piece async for piece in streamed.async_response_gen()])

    assert asyncio.run(stream_async()).strip() == response.response
    assert spy.calls[-1] == (conversation, ids)


def test_settings_llm_is_used_with_the_retrieved_nodes(engine, index, spy, monkeypatch):
    monkeypatch.setattr(Settings, "_llm", None)  # restored after the test
    Settings.llm = ReGradLLM(engine=engine, mode="hybrid")
    response = index.as_query_engine(similarity_top_k=2).query(QUESTIONS[2])
    assert [ids for _, ids in spy.calls] == [[n.node.ref_doc_id for n in response.source_nodes]]
    assert "ailpelou" in spy.calls[0][1]


def test_unrelated_query_engines_in_threads_and_tasks_keep_their_own_nodes(engine, spy):
    first, second = make_index(["velmora", "fudral"]), make_index(["ailpelou", "gredin"])
    llm = ReGradLLM(engine=engine, mode="parametric")  # one LLM object shared by both
    engines = [first.as_query_engine(llm=llm, similarity_top_k=1), second.as_query_engine(llm=llm, similarity_top_k=1)]
    jobs = [(e, q) for e in (0, 1) for q in QUESTIONS[:4]]
    alone = [engines[e].query(q) for e, q in jobs]
    expected = {(QUESTIONS.index(q), e): [r.source_nodes[0].node.ref_doc_id] for (e, q), r in zip(jobs, alone)}
    assert {e: {ids[0] for (_, engine_no), ids in expected.items() if engine_no == e} for e in (0, 1)} == {
        0: {"velmora", "fudral"}, 1: {"ailpelou", "gredin"}}
    spy.calls.clear()
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait(timeout=30)
        return engines[job[0]].query(job[1]).response

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == [r.response for r in alone]

    async def together():
        return await asyncio.gather(*(engines[e].aquery(q) for e, q in jobs))

    assert [r.response for r in asyncio.run(together())] == [r.response for r in alone]
    assert len(spy.calls) == 2 * len(jobs)
    for conversation, ids in spy.calls:  # every call had exactly its own query's node
        question = next(q for q in QUESTIONS[:4] if q in text_of(conversation))
        assert ids in [expected[(QUESTIONS.index(question), e)] for e in (0, 1)]
        assert not any(DOCS[i] in text_of(conversation) for i in DOCS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("response_mode", ["compact", "refine", "tree_summarize"])
def test_response_modes_give_every_call_all_the_querys_gradients(engine, banked_index, spy, mode, response_mode):
    query_engine = banked_index.as_query_engine(llm=ReGradLLM(engine=engine, mode=mode), similarity_top_k=3,
                                         response_mode=response_mode)
    response = query_engine.query(QUESTIONS[0])
    ids = [n.node.ref_doc_id for n in response.source_nodes]
    assert len(ids) == 3
    # compact and tree_summarize pack the three passages into one prompt (they fit the
    # context window); refine makes one call per node, each prompt with its own node's text.
    assert len(spy.calls) == (3 if response_mode == "refine" else 1)
    assert all(documents == ids for _, documents in spy.calls)
    hits = [engine.retriever.get(i) for i in ids]
    assert response.response == spy.complete([spy.calls[-1][0]], [hits])[0].text  # the last call answers
    for call, (conversation, _) in enumerate(spy.calls):
        shown = [i for i in ids if DOCS[i] in text_of(conversation)]
        if mode == "parametric":
            assert shown == []
        else:
            assert shown == ([ids[call]] if response_mode == "refine" else ids)


def test_llm_metadata_is_a_chat_model_with_the_engines_context_window(engine):
    metadata = ReGradLLM(engine=engine).metadata
    assert metadata.model_name == "regrad" and metadata.is_chat_model
    assert metadata.num_output == engine.max_new_tokens == 6
    assert metadata.context_window == engine.prompt_limit(6) + 6 == engine.model.config.max_position_embeddings
    shorter = ReGradLLM(engine=engine, max_new_tokens=5).metadata
    assert (shorter.num_output, shorter.context_window) == (5, engine.prompt_limit(5) + 5)
    assert ReGradLLM(engine=engine, context_window=1000).metadata.context_window == 1000


def test_chat_keeps_the_roles_and_every_path_agrees(engine, spy):
    llm = ReGradLLM(engine=engine, mode="hybrid")
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Answer with a short phrase only."),
                ChatMessage(role=MessageRole.USER, content="Hello."),
                ChatMessage(role=MessageRole.ASSISTANT, content="Hi."),
                ChatMessage(role=MessageRole.USER, content=QUESTIONS[3])]
    answer = llm.chat(messages)
    [(conversation, documents)] = spy.calls
    assert conversation == [{"role": m.role.value, "content": m.content} for m in messages]
    assert documents == []  # called by hand, and no retrieved text in it
    assert answer.message.role == MessageRole.ASSISTANT
    assert answer.message.content == spy.complete([conversation], [[]])[0].text
    assert answer.additional_kwargs["sources"] == [] and answer.additional_kwargs["completion_tokens"] >= 1
    pieces = list(llm.stream_chat(messages))
    assert "".join(p.delta for p in pieces) == pieces[-1].message.content
    assert pieces[-1].message.content.strip() == answer.message.content
    assert asyncio.run(llm.achat(messages)).message.content == answer.message.content

    async def streamed():
        return [piece async for piece in await llm.astream_chat(messages)]

    assert asyncio.run(streamed())[-1].message.content == pieces[-1].message.content
    assert isinstance(llm.predict(PromptTemplate("Question: {q}"), q=QUESTIONS[3]), str)  # a chat model: chat()
    assert spy.calls[-1][0] == [{"role": "user", "content": f"Question: {QUESTIONS[3]}"}]


def test_parametric_call_without_documents_warns_or_raises_when_strict(engine):
    with pytest.warns(NoDocumentsWarning, match="no documents"):
        assert isinstance(ReGradLLM(engine=engine).complete("Where was Velmora Quistan born?").text, str)
    with pytest.raises(RequestError, match="no documents"):
        ReGradLLM(engine=engine, strict=True).complete("Where was Velmora Quistan born?")
    with pytest.raises(RequestError, match="no documents"):
        asyncio.run(ReGradLLM(engine=engine, strict=True).achat([ChatMessage(role="user", content="Hi")]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hybrid reads the prompt as given: nothing to warn about
        ReGradLLM(engine=engine, mode="hybrid", strict=True).complete("Where was Velmora Quistan born?")


def test_most_gradients_on_the_fly_warns_once_per_retriever_and_llm(engine, spy):
    index = make_index(with_ids=False)  # Document ids are random: nothing is found in the bank
    retriever = ReGradRetriever(engine, base_retriever=index.as_retriever(similarity_top_k=2))
    with pytest.warns(OnTheFlyWarning, match="computed on the fly") as caught:
        retriever.retrieve(QUESTIONS[0])
    assert "id_fn" in str(caught[0].message) and "regrad build" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retriever.retrieve(QUESTIONS[1])  # once per retriever
    query_engine = index.as_query_engine(llm=ReGradLLM(engine=engine, mode="hybrid"), similarity_top_k=2)
    with pytest.warns(OnTheFlyWarning, match="ReGradLLM: 2 of 2 documents .* computed on the fly"):
        query_engine.query(QUESTIONS[2])
    assert len(spy.computed) == 2


def test_base_retriever_with_id_fn_hands_bank_ids_to_the_llm(engine, spy):
    index = make_index(IN_BANK, with_ids=False)
    retriever = ReGradRetriever(engine, base_retriever=index.as_retriever(similarity_top_k=3), k=2,
                                id_fn=lambda node: node.metadata["doc_id"])
    registered = len(registry_for(engine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every id is in the bank
        response = RetrieverQueryEngine.from_args(retriever=retriever, llm=ReGradLLM(engine=engine)).query(QUESTIONS[1])
    ids = [n.node.metadata["regrad_id"] for n in response.source_nodes]
    assert len(ids) == 2 and "fudral" in ids and ids == [n.node.metadata["doc_id"] for n in response.source_nodes]
    assert [documents for _, documents in spy.calls] == [ids] and spy.computed == []
    assert "regrad_id" not in text_of(spy.calls[0][0])  # hidden from the prompt
    assert len(registry_for(engine)) == registered  # retrieved inside a pipeline: nothing registered by text


def test_outermost_retriever_hands_its_nodes_to_an_llm_in_the_same_span(engine, spy):
    """A hand-made pipeline: no synthesizer, just a span around retrieve + complete."""
    index = make_index()
    retriever = ReGradRetriever(engine, base_retriever=index.as_retriever(similarity_top_k=4), k=1)
    llm = ReGradLLM(engine=engine, mode="parametric")

    @get_dispatcher(__name__).span
    def answer(question):
        nodes = retriever.retrieve(question)
        context = "\n\n".join(n.node.get_content() for n in nodes)
        return nodes, llm.complete(f"Context:\n{context}\n\nQuestion: {question}")

    nodes, completion = answer(QUESTIONS[3])
    assert len(nodes) == 1
    [(message, documents)] = spy.calls
    assert documents == [nodes[0].node.ref_doc_id] == completion.additional_kwargs["sources"]  # not all 4
    assert message == f"Context:\n\nQuestion: {QUESTIONS[3]}"


def test_llm_called_by_hand_falls_back_to_text_of_documents_retrieved_by_hand(engine):
    llm = ReGradLLM(engine=engine, mode="hybrid", max_new_tokens=5)
    ReGradRetriever(engine).retrieve(QUESTIONS[3])  # outside any pipeline: registered by text
    prompt = f"Context:\n{DOCS['gredin']}\n\nQuestion: {QUESTIONS[3]}"
    completion = llm.complete(prompt)
    assert completion.additional_kwargs["sources"] == ["gredin"]
    assert completion.text == engine.complete_batch([prompt], [[engine.retriever.get("gredin")]],
                                                    max_new_tokens=5)[0]
    pieces = list(llm.stream_complete(prompt))
    assert pieces[-1].text.strip() == completion.text
    assert "".join(p.delta for p in pieces) == pieces[-1].text
    parametric = ReGradLLM(engine=engine, max_new_tokens=5).complete(prompt)
    assert parametric.text == engine.complete_batch([f"Context:\n\nQuestion: {QUESTIONS[3]}"],
                                                    [[engine.retriever.get("gredin")]], max_new_tokens=5)[0]


def test_write_corpus_writes_nodes_under_the_ids_they_are_looked_up_by(engine, index, tmp_path):
    nodes = list(index.docstore.docs.values())
    split = [TextNode(id_=f"long-{i}", text=f"Part {i} of a long guide about Lisbon trams.",
                      relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id="guide")}) for i in range(2)]
    assert write_corpus(nodes + split, tmp_path / "nodes.jsonl") == len(DOCS) + 2
    corpus = read_corpus(tmp_path / "nodes.jsonl")
    assert [d["id"] for d in corpus] == [*DOCS, "long-0", "long-1"]  # one node: its Document id
    assert corpus[0]["text"] == DOCS["velmora"] and corpus[0]["doc_id"] == "velmora"
    write_corpus(split, tmp_path / "mapped.jsonl", id_fn=lambda node: node.node_id.upper())
    assert [d["id"] for d in read_corpus(tmp_path / "mapped.jsonl")] == ["LONG-0", "LONG-1"]


def test_readme_snippets_run(engine, spy):
    response = build_query_engine(engine).query(QUESTIONS[1])
    assert response.response == engine.answer(QUESTIONS[1], k=3).text
    documents = [Document(id_=i, text=DOCS[i]) for i in IN_BANK]
    response = build_index_query_engine(engine, documents, WordEmbedding()).query(QUESTIONS[1])
    assert spy.calls[-1][1] == [n.node.ref_doc_id for n in response.source_nodes]
    response = build_retriever_query_engine(engine, make_index(IN_BANK, with_ids=False)).query(QUESTIONS[1])
    assert spy.calls[-1][1] == [n.node.metadata["doc_id"] for n in response.source_nodes]
    assert "fudral" in spy.calls[-1][1] and spy.computed == []


def test_bad_input_raises_the_engine_request_error(engine):
    query_engine = ReGradQueryEngine(engine=engine, retriever=FixedRetriever())
    for bad in ("", "   "):
        with pytest.raises(RequestError, match="empty"):
            ReGradQueryEngine(engine=engine).query(bad)
        with pytest.raises(RequestError, match="empty"):
            query_engine.query(bad)
        with pytest.raises(RequestError, match="empty"):
            asyncio.run(query_engine.aquery(bad))
        with pytest.raises(RequestError, match="empty"):
            query_engine.query_batch([QUESTIONS[0], bad])
        with pytest.raises(RequestError, match="empty"):
            ReGradRetriever(engine).retrieve(bad)
    with pytest.raises(ValueError, match="parametric"):
        ReGradQueryEngine(engine=engine, mode="both")
