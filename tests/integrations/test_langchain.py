import asyncio
import hashlib
import importlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import ConfigurableField, RunnablePassthrough  # noqa: E402

from regrad_engine.errors import RequestError  # noqa: E402
from regrad_engine.retrieval import Hit  # noqa: E402
from regrad_integrations._registry import DocumentRegistry, registry_for  # noqa: E402
from regrad_integrations.langchain import NoDocumentsWarning, ReGradRetriever, regrad_langchain  # noqa: E402
from regrad_integrations.langchain._base import stream_text as _stream_text  # noqa: E402
from tests.integrations.conftest import DOCS, QUESTIONS  # noqa: E402

TEMPLATE = "Context:\n{context}\n\nQuestion: {question}\nAnswer briefly."
MAX_NEW = 10


def format_docs(docs):
    return "\n\n".join(doc.page_content for doc in docs)


def rag_chain(retriever, llm, template="chat"):
    prompt = (ChatPromptTemplate.from_template(TEMPLATE) if template == "chat"
              else PromptTemplate.from_template(TEMPLATE))
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()


class Recorder(BaseCallbackHandler):
    """Per-invocation record of the LLM's sources and streamed tokens."""

    def __init__(self):
        self.sources, self.modes, self.tokens = [], [], []

    def on_llm_end(self, response, **kwargs):
        for generations in response.generations:
            self.sources.append(generations[0].generation_info["sources"])
            self.modes.append(generations[0].generation_info["mode"])

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.fixture()
def pair(engine):
    llm, retriever = regrad_langchain(engine, k=2)
    return llm.model_copy(update={"max_new_tokens": MAX_NEW}), retriever


@pytest.fixture()
def model_inputs(engine, monkeypatch):
    """Every user message the model reads."""
    seen, generate = [], engine._generate

    def spy(messages, factors, **kwargs):
        seen.extend(messages)
        return generate(messages, factors, **kwargs)

    monkeypatch.setattr(engine, "_generate", spy)
    return seen


def retrieved_ids(retriever, question):
    return [doc.id for doc in retriever.invoke(question)]


@pytest.mark.parametrize("template", ["chat", "string"])
def test_the_usual_chain_runs_every_way_with_the_same_answers(pair, template):
    chain = rag_chain(pair[1], pair[0], template)
    answers = [chain.invoke(q) for q in QUESTIONS]
    assert all(isinstance(a, str) for a in answers) and len(set(answers)) > 1
    assert chain.batch(QUESTIONS) == answers

    async def run_async():
        together = await chain.abatch(QUESTIONS)
        alone = [await chain.ainvoke(q) for q in QUESTIONS]
        streamed = []
        for q in QUESTIONS:
            streamed.append([piece async for piece in chain.astream(q)])
        return together, alone, streamed

    together, alone, astreamed = asyncio.run(run_async())
    assert together == alone == answers
    streamed = [list(chain.stream(q)) for q in QUESTIONS]
    assert ["".join(pieces) for pieces in streamed] == ["".join(p) for p in astreamed] == answers
    assert max(len(pieces) for pieces in streamed) > 1  # tokens arrive as they are generated


def test_parametric_hides_the_passages_and_hybrid_shows_them(pair, model_inputs):
    llm, retriever = pair
    parametric = rag_chain(retriever, llm)
    by_field = rag_chain(retriever, llm.model_copy(update={"mode": "hybrid"}))
    by_bind = rag_chain(retriever, llm.bind(mode="hybrid"))
    by_config = rag_chain(retriever, llm.configurable_fields(mode=ConfigurableField(id="regrad_mode")))
    for question in QUESTIONS:
        texts = [DOCS[i] for i in retrieved_ids(retriever, question)]
        model_inputs.clear()
        answer = parametric.invoke(question)
        assert not any(t in model_inputs[0] for t in texts) and question in model_inputs[0]
        assert "Context:\n\nQuestion:" in model_inputs[0]  # the slot is empty, no blank lines left over
        hybrid = [by_field.invoke(question), by_bind.invoke(question),
                  by_config.invoke(question, config={"configurable": {"regrad_mode": "hybrid"}})]
        assert len(set(hybrid)) == 1
        assert len(model_inputs) == 4 and all(t in m for t in texts for m in model_inputs[1:])
        model_inputs.clear()
        assert by_config.invoke(question) == answer  # configurable default stays parametric
        assert not any(t in model_inputs[0] for t in texts)
    assert any(parametric.invoke(q) != by_bind.invoke(q) for q in QUESTIONS)


def test_the_llm_applies_exactly_the_documents_its_retriever_returned(engine, pair, monkeypatch):
    llm, retriever = pair
    calls, complete, complete_batch = [], engine.complete, engine.complete_batch

    def spy(messages, documents, **kwargs):
        calls.append((list(messages), [[h.id for h in d] for d in documents]))
        return complete(messages, documents, **kwargs)

    monkeypatch.setattr(engine, "complete", spy)
    chain = rag_chain(retriever, llm)
    for question in QUESTIONS:
        recorder = Recorder()
        answer = chain.invoke(question, config={"callbacks": [recorder]})
        ids = retrieved_ids(retriever, question)
        assert recorder.sources == [ids] and recorder.modes == ["parametric"]
        message, docs = calls[-1][0][0], calls[-1][1][0]
        assert docs == ids
        # the same request made by hand: the retriever's hits, the question without the passages
        hits = [Hit(i, DOCS[i], 0.0) for i in ids]
        assert complete_batch([message], [hits], gamma=1.0, max_new_tokens=MAX_NEW) == [answer]
    # gradients matter: the same prompt without the documents' gradients answers otherwise
    plain = [complete_batch([m[0]], [[]], max_new_tokens=MAX_NEW)[0] for m, _ in list(calls)]
    assert plain != [chain.invoke(q) for q in QUESTIONS]


def test_a_prompt_without_retrieved_documents_runs_the_meta_learned_phi(engine, pair):
    llm, _ = pair
    prompt = "Question: What colour is the sky over Zorbania?"
    with pytest.warns(NoDocumentsWarning, match="no documents reached this call"):
        result = llm.generate([prompt])
    info = result.generations[0][0].generation_info
    assert info["sources"] == [] and info["mode"] == "parametric" and info["finish_reason"] in ("stop", "length")
    with pytest.raises(RequestError, match="strict=True makes this an error"):
        llm.model_copy(update={"strict": True}).invoke(prompt)
    assert result.generations[0][0].text == engine.complete_batch([prompt], [[]], max_new_tokens=MAX_NEW)[0]


def test_32_concurrent_invocations_each_get_their_own_answer_and_documents(pair):
    llm, retriever = pair
    chains = {"parametric": rag_chain(retriever, llm), "hybrid": rag_chain(retriever, llm.bind(mode="hybrid"))}
    jobs = [(f"{q} ({n})", ("parametric", "hybrid")[n % 2]) for n in range(8) for q in QUESTIONS]

    def run(job, barrier=None):
        if barrier is not None:
            barrier.wait(timeout=30)
        recorder = Recorder()
        answer = chains[job[1]].invoke(job[0], config={"callbacks": [recorder]})
        return answer, recorder.sources

    expected = [run(job) for job in jobs]
    assert [s for _, s in expected] == [[retrieved_ids(retriever, q)] for q, _ in jobs]
    barrier = threading.Barrier(8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda job: run(job, barrier if jobs.index(job) < 8 else None), jobs)) == expected

    async def run_abatch(mode):
        picked = [(q, m) for q, m in jobs if m == mode]
        recorders = [Recorder() for _ in picked]
        answers = await chains[mode].abatch([q for q, _ in picked], config=[{"callbacks": [r]} for r in recorders])
        return list(zip(answers, [r.sources for r in recorders]))

    for mode in chains:
        assert asyncio.run(run_abatch(mode)) == [e for e, (_, m) in zip(expected, jobs) if m == mode]


def test_stop_sequences_cut_invoke_and_stream_alike(pair):
    llm, retriever = pair
    chain = rag_chain(retriever, llm)
    question = next(q for q in QUESTIONS if len(list(chain.stream(q))) > 1)
    full, pieces = chain.invoke(question), list(chain.stream(question))
    stop = pieces[0][-1] + pieces[1][0]  # spans two streamed pieces
    expected = full[:full.find(stop)].rstrip()
    stopped = rag_chain(retriever, llm.bind(stop=[stop, "never-generated"]))
    assert stopped.invoke(question) == "".join(stopped.stream(question)) == expected
    assert rag_chain(retriever, llm.bind(stop=["never-generated"])).invoke(question) == full


def test_an_answer_ends_at_a_start_of_turn_marker(pair):
    from transformers import LogitsProcessorList

    from tests.conftest import runaway_turn

    llm, retriever = pair
    chain = rag_chain(retriever, llm)
    tokenizer = llm.engine.tokenizer
    assert chain.invoke(QUESTIONS[0], config={}) != "yes"  # the forced script is what makes it 'yes'
    forced = rag_chain(retriever, llm.bind(logits_processor=LogitsProcessorList([runaway_turn(tokenizer)])))
    assert forced.invoke(QUESTIONS[0]) == "yes"
    streamed = rag_chain(retriever, llm.bind(logits_processor=LogitsProcessorList([runaway_turn(tokenizer)])))
    assert "".join(streamed.stream(QUESTIONS[0])) == "yes"


@pytest.mark.parametrize("pieces, stop, expected", [
    (["  Hel", "lo wo", "rld  ", "\n"], None, "Hello world"),
    (["Hel", "lo ", "ST", "OP", " more"], ["STOP"], "Hello"),
    (["a S", "Tb STOP"], ["STOP"], "a STb"),
    (["  ", "STOP", "x"], ["STOP"], ""),
    (["one", "\ntwo"], ["\n", "two"], "one"),
])
def test_streamed_text_joins_to_the_cut_text(pieces, stop, expected):
    assert "".join(_stream_text(pieces, stop)) == expected


def test_streaming_callbacks_receive_each_new_token(pair):
    llm, retriever = pair
    recorder = Recorder()
    pieces = list(rag_chain(retriever, llm).stream(QUESTIONS[0], config={"callbacks": [recorder]}))
    assert recorder.tokens == [p for p in pieces if p] and len(pieces) > 1
    assert recorder.sources == [retrieved_ids(retriever, QUESTIONS[0])]


def test_identifying_params(engine, pair):
    llm, _ = pair
    assert llm._llm_type == "regrad"
    assert llm._identifying_params == {"model_name": "tiny", "meta_fingerprint": engine.meta.fingerprint(),
                                       "mode": "parametric", "gamma": 1.0, "max_new_tokens": MAX_NEW}
    with pytest.raises(ValueError, match="mode must be"):
        llm.invoke("Where was Velmora Quistan born?", mode="both")


class FixedRetriever(BaseRetriever):
    """Another framework's retriever: fixed documents, ids in three styles."""

    def _get_relevant_documents(self, query, *, run_manager):
        return [Document(id="velmora", page_content=DOCS["velmora"]),
                Document(page_content=DOCS["fudral"], metadata={"id": "fudral", "score": 2.5}),
                Document(page_content=DOCS["fox"])]  # no id, and no stored gradient


def test_documents_from_another_retriever_are_used_and_missing_gradients_computed(engine, pair, monkeypatch):
    llm, _ = pair
    retriever = ReGradRetriever(engine=engine, base_retriever=FixedRetriever())
    fox_id = hashlib.sha1(DOCS["fox"].encode()).hexdigest()
    docs = retriever.invoke("anything")
    assert [d.id for d in docs] == ["velmora", "fudral", fox_id]
    assert docs[1].metadata == {"id": "fudral", "score": 2.5}
    assert [d.id for d in asyncio.run(retriever.ainvoke("anything"))] == [d.id for d in docs]
    assert [d.id for d in retriever.invoke("anything", k=2)] == ["velmora", "fudral"]
    recorder = Recorder()
    chain = rag_chain(retriever, llm)
    answer = chain.invoke("What jumps?", config={"callbacks": [recorder]})
    assert recorder.sources == [["velmora", "fudral", fox_id]]
    hits = [Hit(d.id, d.page_content, 0.0) for d in docs]
    message = "Human: Context:\n\nQuestion: What jumps?\nAnswer briefly."
    assert engine.complete_batch([message], [hits], max_new_tokens=MAX_NEW) == [answer]
    monkeypatch.setattr(engine, "on_the_fly", False)  # the fox gradient was computed, not stored
    with pytest.raises(RequestError, match="no stored gradient"):
        chain.invoke("What jumps?")


def test_registry_finds_each_document_once_longest_first_and_strips_cleanly():
    long_text = "Velmora Quistan is a dentist who was born in Lisbon."
    longer = long_text + " She plays the violin."
    registry = DocumentRegistry(max_entries=3)
    registry.register([Hit("a", long_text, 1.0), Hit("b", longer, 1.0), Hit("s", "A short document here.", 1.0)])
    prompt = f"Context:\n{longer}\n\nA short document here.\n\n{longer}\n\nQuestion: who?"
    spans = registry.find(prompt)
    assert [(h.id, prompt[s:e]) for s, e, h in spans] == [("b", longer), ("s", "A short document here.")]
    assert registry.strip(prompt, spans) == "Context:\n\nQuestion: who?"
    assert registry.strip(f"Inline {longer} here", registry.find(f"Inline {longer} here")) == "Inline here"
    assert registry.find("nothing registered here") == [] and registry.strip("as is ", []) == "as is "
    lru = DocumentRegistry(max_entries=2)
    lru.register([Hit("a", long_text, 1.0), Hit("s", "A short document here.", 1.0)])
    assert [h.id for _, _, h in lru.find(long_text)] == ["a"]  # found: used recently
    lru.register([Hit("c", "Another document, long enough to be indexed.", 1.0)])
    assert len(lru) == 2 and lru.find("A short document here.") == [] and lru.find(long_text) != []


def test_every_adapter_over_an_engine_shares_one_registry(engine, pair):
    llm, retriever = pair
    other = ReGradRetriever(engine=engine)
    assert registry_for(engine) is registry_for(other.engine) is registry_for(llm.engine)
    assert registry_for(engine) is not registry_for(object.__new__(type(engine)))


def test_missing_langchain_names_the_install_command(monkeypatch):
    for name in [n for n in sys.modules if n == "langchain_core" or n.startswith("langchain_core.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "regrad_integrations.langchain")
    with pytest.raises(ImportError, match=r"pip install 'regrad\[langchain\]'"):
        importlib.import_module("regrad_integrations.langchain")


def test_readme_snippet_runs(engine):
    from tests.integrations.snippets.langchain_rag import build_chain

    chain = build_chain(engine)
    answers = chain.batch(QUESTIONS[:2])
    assert all(isinstance(a, str) for a in answers) and answers == [chain.invoke(q) for q in QUESTIONS[:2]]


try:
    from langchain_tests.integration_tests import RetrieversIntegrationTests
except ImportError:  # langchain-tests not installed: the standard suite is not collected
    RetrieversIntegrationTests = object


@pytest.mark.skipif(RetrieversIntegrationTests is object, reason="needs langchain-tests")
class TestReGradRetrieverStandard(RetrieversIntegrationTests):
    """langchain-tests' standard retriever suite (langchain-tests has no retriever unit suite)."""

    @pytest.fixture(autouse=True)
    def _engine(self, engine):
        self.engine = engine

    @property
    def retriever_constructor(self):
        return ReGradRetriever

    @property
    def retriever_constructor_params(self):
        return {"engine": self.engine, "k": 2}

    @property
    def retriever_query_example(self):
        return "Who was born by the river in Tokyo?"  # matches at least three documents
