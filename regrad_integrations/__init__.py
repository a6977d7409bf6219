"""Framework adapters for ReGrad (LangChain, LlamaIndex); see the engine in regrad_engine."""
