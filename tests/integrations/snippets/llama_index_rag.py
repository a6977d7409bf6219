"""README snippet: ReGrad in a LlamaIndex app (run by tests/integrations/test_llama_index.py)."""

from llama_index.core.query_engine import RetrieverQueryEngine

from regrad_integrations.llama_index import ReGradLLM, ReGradQueryEngine, ReGradRetriever


def build_query_engine(engine):
    """engine = regrad_engine.open_engine("store/")  # model + meta checkpoint + bank + index"""
    # Gradients only: the retrieved documents adapt the model for this query, the prompt
    # holds just the question. mode="hybrid" also puts the passages in the prompt.
    return ReGradQueryEngine(engine=engine, mode="parametric", k=3)


def build_pipeline_query_engine(engine):
    """Keep LlamaIndex's own pipeline (prompt templates, postprocessors, synthesizer) and
    let ReGrad apply the gradients of the documents it finds in the rendered prompt."""
    return RetrieverQueryEngine.from_args(retriever=ReGradRetriever(engine, k=3),
                                          llm=ReGradLLM(engine=engine, mode="hybrid"))


if __name__ == "__main__":
    from regrad_engine import open_engine

    query_engine = build_query_engine(open_engine("store/"))
    response = query_engine.query("Where was Velmora Quistan born?")
    print(response, [node.node_id for node in response.source_nodes])
