"""README, OpenAI-compatible server: the official client against `regrad serve`; ReGrad's own
fields go in extra_body, the documents used come back in `sources`."""

from openai import OpenAI


def ask(question, base_url="http://127.0.0.1:8000/v1"):
    client = OpenAI(base_url=base_url, api_key="unused")
    response = client.chat.completions.create(
        model="regrad",
        messages=[{"role": "user", "content": question}],
        max_tokens=20,
        # Retrieve k documents from the store with the question (the default), or name them:
        # "documents": ["doc-17", {"text": "A passage outside the store."}]
        extra_body={"mode": "parametric", "k": 3},
    )
    sources = response.model_extra["sources"]  # [{"id": "doc-17", "score": 7.1}, ...]
    return response.choices[0].message.content, [source["id"] for source in sources]


# ask("Where was Velmora Quistan born?")
