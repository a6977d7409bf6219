"""README, LangChain section: the usual RAG chain on a chat model, with ReGrad's retriever and model swapped in."""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from regrad_integrations.langchain import ChatReGrad, ReGradRetriever


def format_docs(docs):
    return "\n\n".join(doc.page_content for doc in docs)


def build_chain(engine, mode="parametric"):
    """engine = regrad_engine.open_engine("my-store"), built with `regrad build`."""
    retriever = ReGradRetriever(engine=engine, k=3)  # or base_retriever=your_retriever
    chat = ChatReGrad(engine=engine, mode=mode)
    prompt = ChatPromptTemplate.from_template(
        "Context:\n{context}\n\nQuestion: {question}\nAnswer with a short phrase only."
    )
    # The retriever hands its documents to the model of the same invocation. parametric: the
    # model never reads {context}, the passages reach it as gradients; hybrid: both.
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()


# chain = build_chain(engine)
# chain.invoke("Where was Velmora Quistan born?")
# chain.batch([...]); await chain.ainvoke(...); for piece in chain.stream(...): ...
