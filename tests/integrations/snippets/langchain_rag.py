"""README, LangChain section: the usual RAG chain, with ReGrad's retriever and LLM swapped in."""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from regrad_integrations.langchain import regrad_langchain


def format_docs(docs):
    return "\n\n".join(doc.page_content for doc in docs)


def build_chain(engine):
    """engine = regrad_engine.open_engine("my-store"), built with `regrad build`."""
    llm, retriever = regrad_langchain(engine, mode="parametric", k=3)
    prompt = ChatPromptTemplate.from_template(
        "Context:\n{context}\n\nQuestion: {question}\nAnswer with a short phrase only."
    )
    # In parametric mode the model never reads {context}: the passages reach it as
    # gradients. Use llm.bind(mode="hybrid") to give it both.
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()


# chain = build_chain(engine)
# chain.invoke("Where was Velmora Quistan born?")
# chain.batch([...]); await chain.ainvoke(...); for piece in chain.stream(...): ...
