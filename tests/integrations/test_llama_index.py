import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.base.response.schema import Response, StreamingResponse  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from regrad_engine.errors import RequestError  # noqa: E402
from regrad_engine.retrieval import Hit  # noqa: E402
from regrad_integrations.llama_index import (  # noqa: E402
    ReGradLLM,
    ReGradQueryEngine,
    ReGradRetriever,
)
from tests.conftest import DOCS, make_engine, make_tokenizer  # noqa: E402
from tests.integrations.snippets.llama_index_rag import (  # noqa: E402
    build_pipeline_query_engine,
    build_query_engine,
)

QUESTIONS = ["Where was Velmora Quistan born?", "Where is the Fudral Bureau based?",
             "Which river does Ailpelou lie on?", "What does Gredin Quibiku speak?",
             "What does Velmora Quistan play?", "Where does the Fudral Bureau sell?",
             "What sport is popular in Ailpelou?", "What jumps over the lazy dog?"]
MODES = ("parametric", "hybrid")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The shared tiny engine (tests/conftest.py): sdpa float64 tiny Llama, "fox" not in the bank."""
    return make_engine(make_tokenizer(), tmp_path_factory.mktemp("llama"))


class FixedRetriever(BaseRetriever):
    """Another LlamaIndex retriever: always the same nodes, one of them unknown to the bank and index."""

    NODES = [("fox", DOCS["fox"], 2.0), ("outside", "Tarnel Vesko repairs clocks in Oslo every winter.", 1.0),
             ("velmora", DOCS["velmora"], None)]

    def _retrieve(self, query_bundle):
        return [NodeWithScore(node=TextNode(id_=i, text=t), score=s) for i, t, s in self.NODES]


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


def test_documents_from_another_retriever_are_used_by_node_id(engine):
    query_engine = ReGradQueryEngine(engine=engine, retriever=FixedRetriever(), mode="hybrid")
    response = query_engine.query(QUESTIONS[7])
    assert [n.node_id for n in response.source_nodes] == ["fox", "outside", "velmora"]
    hits = [Hit(id=i, text=t, score=s or 0.0) for i, t, s in FixedRetriever.NODES]
    assert response.response == engine.answer(QUESTIONS[7], mode="hybrid", documents=hits).text
    assert response.response != engine.answer(QUESTIONS[7], mode="hybrid", documents=hits[::2]).text
    assert "outside" not in engine.bank  # computed on the fly, not written back


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
def test_llm_in_a_standard_retriever_query_engine(engine, monkeypatch, mode):
    calls = []
    real = engine.complete_batch
    monkeypatch.setattr(engine, "complete_batch",
                        lambda ms, docs, **kw: calls.append((ms, docs)) or real(ms, docs, **kw))
    query_engine = RetrieverQueryEngine.from_args(retriever=ReGradRetriever(engine),
                                                  llm=ReGradLLM(engine=engine, mode=mode))
    response = query_engine.query(QUESTIONS[0])
    assert isinstance(response, Response) and isinstance(response.response, str)
    ids = retrieved_ids(engine, QUESTIONS[0])
    assert [n.node_id for n in response.source_nodes] == ids
    [(messages, documents)] = calls
    assert [h.id for h in documents[0]] == ids  # the LLM found the retrieved documents in the prompt
    assert QUESTIONS[0] in messages[0]
    assert all((DOCS[i] in messages[0]) == (mode == "hybrid") for i in ids)  # parametric: text removed
    assert response.response == real(messages, documents)[0]
    assert asyncio.run(query_engine.aquery(QUESTIONS[0])).response == response.response


def test_llm_complete_and_stream_complete_agree(engine):
    llm = ReGradLLM(engine=engine, mode="hybrid", max_new_tokens=5)
    assert llm.metadata.model_name == "regrad" and llm.metadata.num_output == 5
    assert not llm.metadata.is_chat_model
    ReGradRetriever(engine).retrieve(QUESTIONS[3])  # registers the documents
    prompt = f"Context:\n{DOCS['gredin']}\n\nQuestion: {QUESTIONS[3]}"
    completion = llm.complete(prompt)
    assert completion.text == engine.complete_batch([prompt], [[engine.retriever.get("gredin")]],
                                                    max_new_tokens=5)[0]
    pieces = list(llm.stream_complete(prompt))
    assert pieces[-1].text.strip() == completion.text
    assert "".join(p.delta for p in pieces) == pieces[-1].text


def test_readme_snippets_run(engine):
    response = build_query_engine(engine).query(QUESTIONS[1])
    assert response.response == engine.answer(QUESTIONS[1], k=3).text
    assert len(build_pipeline_query_engine(engine).query(QUESTIONS[1]).source_nodes) >= 1


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
