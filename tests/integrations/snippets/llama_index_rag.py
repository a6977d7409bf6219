"""README snippet: ReGrad in a LlamaIndex app (run by tests/integrations/test_llama_index.py)."""

from llama_index.core import VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine

from regrad_integrations.llama_index import ReGradLLM, ReGradQueryEngine, ReGradRetriever


def build_query_engine(engine):
    """engine = regrad_engine.open_engine("store/")  # model + meta checkpoint + bank + index"""
    # Gradients only: the retrieved documents adapt the model for this query, the prompt
    # holds just the question. mode="hybrid" also puts the passages in the prompt.
    return ReGradQueryEngine(engine=engine, mode="parametric", k=3)


def build_index_query_engine(engine, documents, embed_model):
    """Your own index and pipeline. Each Document's id_ is its id in the corpus that
    `regrad build` read, so its nodes (node.ref_doc_id) find their gradients in the bank."""
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    # Every LLM call of a query gets the gradients of the nodes that query retrieved;
    # parametric mode cuts their text out of the prompt, hybrid keeps it.
    return index.as_query_engine(llm=ReGradLLM(engine=engine, mode="parametric"), similarity_top_k=3)


def build_retriever_query_engine(engine, index):
    """Any LlamaIndex retriever; id_fn maps its nodes to bank ids (default: the
    node's ref_doc_id if the bank holds it, else its node_id)."""
    retriever = ReGradRetriever(engine, base_retriever=index.as_retriever(similarity_top_k=3),
                                id_fn=lambda node: node.metadata["doc_id"])
    return RetrieverQueryEngine.from_args(retriever=retriever, llm=ReGradLLM(engine=engine, mode="hybrid"))


# documents = [Document(id_=doc["id"], text=doc["text"]) for doc in corpus]  # what `regrad build` read
# query_engine = build_index_query_engine(engine, documents, embed_model=your_embedding_model)
# response = query_engine.query("Where was Velmora Quistan born?")
# print(response, [node.node.ref_doc_id for node in response.source_nodes])
