"""ElasticsearchIndex and ``regrad build --elasticsearch`` against a real server.

Skipped unless ``ELASTICSEARCH_URL`` is set (credentials, if the server needs them:
``ELASTICSEARCH_API_KEY`` or ``ELASTICSEARCH_USERNAME``/``ELASTICSEARCH_PASSWORD``), e.g.

    docker run -d -p 9200:9200 -e discovery.type=single-node -e xpack.security.enabled=false \\
        docker.elastic.co/elasticsearch/elasticsearch:9.1.0
    ELASTICSEARCH_URL=http://localhost:9200 pytest -m elasticsearch tests/engine/test_elastic.py

Every test works in its own uniquely named index and deletes it afterwards.
"""

import json
import os
import uuid

import pytest

if not os.environ.get("ELASTICSEARCH_URL"):
    pytest.skip("ELASTICSEARCH_URL is not set: Elasticsearch tests need a real server", allow_module_level=True)

import torch  # noqa: E402

from regrad_engine.cli import main  # noqa: E402
from regrad_engine.retrieval import Hit, RetrievalError  # noqa: E402
from regrad_engine.retrieval.elasticsearch import (  # noqa: E402
    ElasticsearchIndex,
    index_chunks,
    redacted_url,
)
from tests.conftest import make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.elasticsearch

DOCS = [
    {"id": "paris", "text": "Paris is the capital of France and lies on the Seine.", "title": "Paris",
     "country": "France"},
    {"id": "berlin", "text": "Berlin is the capital of Germany; the Spree flows through it.", "title": "Berlin"},
    {"id": "nile", "text": "The Nile is a long river in Africa that flows north into the sea.", "title": "Nile"},
    {"id": "rome", "text": "An ancient city with the Colosseum, built on seven hills by the Tiber.", "title": "Rome"},
]
QUERIES = ["capital of Germany", "river flowing north", "Rome", "Seine France", "capital city"]


def _secrets() -> list[str]:
    url = os.environ["ELASTICSEARCH_URL"]
    from_url = url.split("://", 1)[-1].rpartition("@")[0].partition(":")[2] if "@" in url else None
    found = [os.environ.get("ELASTICSEARCH_API_KEY"), os.environ.get("ELASTICSEARCH_PASSWORD"), from_url]
    return [s for s in found if s]


@pytest.fixture()
def name():
    index_name = f"regrad-test-{uuid.uuid4().hex[:12]}"
    yield index_name
    ElasticsearchIndex(index=index_name).client.indices.delete(index=index_name, ignore_unavailable=True)


@pytest.fixture()
def index(name):
    index = ElasticsearchIndex.create(index=name)
    assert index.add(DOCS) == len(DOCS)
    return index


def test_add_get_len_ids(index, name):
    assert len(index) == 4 and sorted(index.ids()) == ["berlin", "nile", "paris", "rome"]
    assert index.get("paris") == Hit("paris", DOCS[0]["text"], 0.0, {"title": "Paris", "country": "France"})
    assert "paris" in index and "london" not in index
    with pytest.raises(KeyError, match="london"):
        index.get("london")
    assert index.missing(["paris", "london"]) == ["london"]
    with pytest.raises(RetrievalError, match="already exists"):
        ElasticsearchIndex.create(index=name)
    assert len(ElasticsearchIndex.create(index=name, exist_ok=True)) == 4


def test_retrieve_ranks_the_right_document_first(index):
    hits = index.retrieve("capital of Germany", 3)
    assert hits[0].id == "berlin" and hits[0].metadata["title"] == "Berlin"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and hits[0].score > 0
    assert index.retrieve("Seine", 1)[0].id == "paris"
    assert index.retrieve("zyzzyva", 3) == []


def test_multi_match_searches_title_and_text(index, name):
    assert index.retrieve("Rome", 3)[0].id == "rome"  # the word is only in the title
    text_only = ElasticsearchIndex.open(index=name, search_fields=["text"])
    assert "rome" not in [h.id for h in text_only.retrieve("Rome", 3)]
    boosted = ElasticsearchIndex.open(index=name, search_fields=["title^3", "text"])
    assert boosted.retrieve("Nile river", 1)[0].id == "nile"


def test_retrieve_batch_equals_retrieve(index):
    assert index.retrieve_batch(QUERIES, 2) == [index.retrieve(q, 2) for q in QUERIES]
    assert index.retrieve_batch([], 2) == []


def test_delete_and_replace(index):
    assert index.delete(["paris", "london"]) == 1
    assert "paris" not in index and len(index) == 3
    assert "paris" not in [h.id for h in index.retrieve("capital of France", 4)]
    index.add({"id": "nile", "text": "The Nile delta has Alexandria.", "title": "Nile"})
    assert len(index) == 3 and index.get("nile").text == "The Nile delta has Alexandria."
    index.save()
    assert ElasticsearchIndex.open(index=index.index).retrieve("Alexandria", 1)[0].id == "nile"


def test_open_a_missing_index_says_how_to_build_it(name):
    with pytest.raises(RetrievalError, match=f"no Elasticsearch index {name} at .*regrad build --elasticsearch"):
        ElasticsearchIndex.open(index=name)


def _write_langchain_layout(name: str) -> None:
    """Documents as langchain-elasticsearch's ElasticsearchStore writes them: text + vector + metadata, _id."""
    client = ElasticsearchIndex(index=name).client
    client.indices.create(index=name, mappings={"properties": {
        "text": {"type": "text"}, "metadata": {"type": "object"},
        "vector": {"type": "dense_vector", "dims": 3, "index": True, "similarity": "cosine"}}})
    for i, (title, text) in enumerate([("Quokka", "Quokkas are small marsupials living on Rottnest Island."),
                                       ("Wombat", "Wombats dig burrows and have cube-shaped droppings.")]):
        client.index(index=name, id=f"lc-{i}", document={"text": text, "vector": [0.1, 0.2, 0.3 + i],
                                                         "metadata": {"title": title, "source": "wiki"}})
    client.indices.refresh(index=name)


def test_reuses_an_index_written_in_langchain_layout(name):
    _write_langchain_layout(name)
    index = ElasticsearchIndex.open(index=name, content_field="text", title_field="metadata.title",
                                    search_fields=["metadata.title", "text"])
    hit = index.retrieve("marsupials on an island", 1)[0]
    assert hit.id == "lc-0" and hit.text.startswith("Quokkas")
    assert hit.metadata == {"title": "Quokka", "source": "wiki"}  # no vector
    assert index.retrieve("Wombat", 1)[0].id == "lc-1"  # found by metadata.title
    assert sorted(c.id for c in index_chunks(index)) == ["lc-0", "lc-1"]


def test_id_field_reads_ids_from_the_source(name):
    client = ElasticsearchIndex(index=name).client
    for n, doc in enumerate(DOCS[:2]):  # dynamic mapping: doc_id becomes text with a .keyword subfield
        client.index(index=name, id=f"auto-{n}", document={"doc_id": doc["id"], "text": doc["text"]})
    client.indices.refresh(index=name)
    index = ElasticsearchIndex.open(index=name, id_field="doc_id")
    assert index.retrieve("capital of Germany", 1)[0].id == "berlin"
    assert index.get("paris").id == "paris" and "paris" in index and sorted(index.ids()) == ["berlin", "paris"]
    assert index.delete("paris") == 1 and "paris" not in index


def test_credentials_stay_out_of_reprs_errors_and_store_info(index, name):
    secrets = _secrets() + ["wr0ng-S3cret"]
    texts = [repr(index), str(index), json.dumps(index.info())]
    url = os.environ["ELASTICSEARCH_URL"]
    scheme, _, rest = url.partition("://")
    wrong = f"{scheme}://regrad-nobody:wr0ng-S3cret@{rest.rpartition('@')[2]}"
    with pytest.raises(RetrievalError) as err:  # 401 on a secured server, else no such index
        ElasticsearchIndex.open(wrong, f"{name}-missing")
    texts.append(str(err.value))
    assert index.info()["url"] == redacted_url(url)
    for text in texts:
        assert not any(s in text for s in secrets), text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("es-cli")
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, dtype=torch.float32, seed=0)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    tiny = ["--model", str(root / "tiny"), "--threads", "1"]
    assert main(["synth", "--out", str(root / "data"), "--entities", "30"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "meta"), "--steps", "2",
                 "--layers", "1", "--rank", "4", "--dev-size", "2", "--eval-every", "1", *tiny]) == 0
    names = [f"regrad-test-cli-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield root, tiny, names
    client = ElasticsearchIndex(index=names[0]).client
    for n in names:
        client.indices.delete(index=n, ignore_unavailable=True)


def test_cli_build_ask_and_delete_with_elasticsearch(workspace, capsys):
    root, tiny, (name, _) = workspace
    build = ["build", "--elasticsearch", "--index", name, "--meta", str(root / "meta" / "best"), *tiny]
    assert main([*build, "--corpus", str(root / "data" / "corpus.jsonl"), "--store", str(root / "store")]) == 0
    record = (root / "store" / "regrad.json").read_text()
    info = json.loads(record)["retriever"]
    assert info["type"] == "elasticsearch" and info["index"] == name
    assert info["url"] == redacted_url(os.environ["ELASTICSEARCH_URL"])
    assert not any(s in record for s in _secrets())
    assert not (root / "store" / "index").exists()  # no embedded BM25 index
    first = json.loads((root / "data" / "test.jsonl").read_text().splitlines()[0])
    assert main(["ask", "--store", str(root / "store"), first["question"], *tiny]) == 0
    assert first["doc_id"] in capsys.readouterr().out  # Elasticsearch finds the entity's own document
    assert main([*build, "--corpus", str(root / "data" / "corpus.jsonl"), "--store", str(root / "store")]) == 0
    assert "added 0 gradients" in capsys.readouterr().out
    assert main(["delete", "--store", str(root / "store"), first["doc_id"]]) == 0
    assert first["doc_id"] not in ElasticsearchIndex.open(index=name)


def test_cli_build_from_an_existing_index_without_a_corpus(workspace, capsys):
    root, tiny, (_, name) = workspace
    _write_langchain_layout(name)
    meta = ["--meta", str(root / "meta" / "best"), *tiny]
    assert main(["build", "--elasticsearch", "--index", name, "--title-field", "metadata.title",
                 "--search-fields", "metadata.title,text", "--store", str(root / "lc"), *meta]) == 0
    out = capsys.readouterr().out
    assert f"2 documents read from Elasticsearch index {name}" in out and "added 2 gradients" in out
    assert main(["ask", "--store", str(root / "lc"), "Where do quokkas live?", *tiny]) == 0
    assert "lc-0" in capsys.readouterr().out
    # --reuse-index with a corpus whose chunks are not in the index: refused before any gradient
    assert main(["build", "--elasticsearch", "--index", name, "--reuse-index", "--store", str(root / "lc2"),
                 "--corpus", str(root / "data" / "corpus.jsonl"), *meta]) == 2
    assert "are not in Elasticsearch index" in capsys.readouterr().err
