"""The LangChain chain and the LlamaIndex query engine on the embedded model (slow tier):
both modes, sync and async, batched and streamed, with only the LLM/retriever swapped."""

import asyncio
from pathlib import Path

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from regrad_engine.chunking import chunk_documents
from regrad_engine.datasets.synthetic import generate_corpus
from regrad_engine.metrics import score_predictions
from regrad_engine.models import load_model
from regrad_engine.store import build_store, open_engine
from regrad_integrations.langchain import regrad_langchain
from tests.integrations.snippets.langchain_rag import build_chain, format_docs
from tests.integrations.snippets.llama_index_rag import build_query_engine

META = Path(__file__).resolve().parents[2] / "regrad_engine" / "checkpoints" / "smollm2-135m-synth"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = load_model()
    corpus = generate_corpus(600, seed=0)
    by_id = corpus.documents_by_id()
    held_out = sorted({qa.doc_id for qa in corpus.test})[:12]
    docs = [{"id": d, "text": by_id[d]["text"]} for d in held_out]
    store = tmp_path_factory.mktemp("store") / "store"
    build_store(store, chunk_documents(docs, model.tokenizer), model=model, meta_path=str(META), progress=False)
    qas = [qa for qa in corpus.test if qa.doc_id in set(held_out)][:8]
    return open_engine(store, model=model, k=3, max_new_tokens=12), qas


def test_langchain_chain_on_the_embedded_model(setup):
    engine, qas = setup
    chain = build_chain(engine)
    questions = [qa.question for qa in qas]
    parametric = chain.batch(questions)
    assert parametric[0] == chain.invoke(questions[0])
    assert "".join(chain.stream(questions[1])) == parametric[1]
    assert asyncio.run(chain.ainvoke(questions[2])) == parametric[2]
    llm, retriever = regrad_langchain(engine, k=3)
    prompt = ChatPromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer with a short phrase only.")
    hybrid_chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
                    | prompt | llm.bind(mode="hybrid") | StrOutputParser())
    hybrid = asyncio.run(hybrid_chain.abatch(questions[:4]))
    assert len(hybrid) == 4 and all(isinstance(h, str) for h in hybrid)
    em = score_predictions(parametric, [qa.answers for qa in qas]).exact_match
    print(f"LangChain parametric EM on {len(qas)} held-out questions: {em:.2f}; hybrid sample: {hybrid[:2]}")
    assert em > 0  # the base model scores 0 on these fictional facts


def test_llama_index_query_engine_on_the_embedded_model(setup):
    engine, qas = setup
    query_engine = build_query_engine(engine)
    response = query_engine.query(qas[0].question)
    assert qas[0].doc_id in [n.node_id for n in response.source_nodes]
    batch = query_engine.query_batch([qa.question for qa in qas[:4]])
    assert batch[0].response == response.response
    assert asyncio.run(query_engine.aquery(qas[1].question)).response == batch[1].response
    query_engine.mode = "hybrid"
    hybrid = query_engine.query(qas[2].question)
    assert hybrid.metadata["mode"] == "hybrid"
    query_engine.streaming = True
    streamed = query_engine.query(qas[3].question)
    assert "".join(streamed.response_gen).strip()


try:
    from langchain_tests.integration_tests import ChatModelIntegrationTests
except ImportError:  # langchain-tests not installed: the standard suite is not collected
    ChatModelIntegrationTests = object


@pytest.mark.skipif(ChatModelIntegrationTests is object, reason="needs langchain-tests")
class TestChatReGradIntegration(ChatModelIntegrationTests):
    """langchain-tests' standard chat-model integration suite on the embedded model, with
    the features ChatReGrad lacks declared (tools, images, audio, PDF, JSON mode). Hybrid
    mode: the suite's calls come without documents, which parametric mode warns about."""

    @pytest.fixture(autouse=True)
    def _engine(self, setup):
        self.engine = setup[0]

    @property
    def chat_model_class(self):
        from regrad_integrations.langchain import ChatReGrad

        return ChatReGrad

    @property
    def chat_model_params(self):
        return {"engine": self.engine, "mode": "hybrid"}

    @property
    def standard_chat_model_params(self):
        return {**super().standard_chat_model_params, "max_tokens": 24}  # CPU: short answers

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False  # JSON by instructions only: a 135M model does not follow a schema reliably

    @property
    def supports_json_mode(self):
        return False

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supported_usage_metadata_details(self):
        return {"invoke": [], "stream": []}
