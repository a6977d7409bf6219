"""The Elasticsearch backend without a server: URL redaction, credentials, errors, layout, CLI flags.

Nothing here talks to Elasticsearch: ``http://127.0.0.1:9`` refuses connections, so
it exercises the real client's connection errors. Searching a real server is in
``test_elastic.py`` (skipped unless ``ELASTICSEARCH_URL`` is set).
"""

import importlib.util
import json
import sys

import pytest

from regrad_engine.cli import build_parser, main
from regrad_engine.retrieval import BM25Index, Hit, RetrievalError
from regrad_engine.retrieval.elasticsearch import ElasticsearchIndex, redacted_url
from regrad_engine.store import Store

needs_client = pytest.mark.skipif(
    importlib.util.find_spec("elasticsearch") is None,
    reason="the elasticsearch client is not installed: pip install 'regrad[elasticsearch]'")

DEAD = "http://127.0.0.1:9"  # the discard port: connections are refused
NEVER_CALLED = object()  # stands in for a client where the code under test must not touch one
SECRET = "s3cret-Pw"
ENV = ("ELASTICSEARCH_URL", "ELASTICSEARCH_API_KEY", "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("url, expected", [
    ("https://elastic:pw@es.example.com:9243/prefix?api_key=x#frag", "https://es.example.com:9243/prefix"),
    ("http://localhost:9200", "http://localhost:9200"),
    ("http://u%40x:p%2Fw@[::1]:9200", "http://[::1]:9200"),
    ("http://user:p@ss/w@host:9200", "http://host:9200"),  # unescaped @ and / in the password
    ("user:pw@localhost:9200", "localhost:9200"),
])
def test_redacted_url_strips_credentials(url, expected):
    assert redacted_url(url) == expected


@needs_client
def test_credentials_stay_out_of_repr_and_store_info(monkeypatch, tmp_path):
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "env-" + SECRET)
    for index in (ElasticsearchIndex(f"http://elastic:{SECRET}@127.0.0.1:9", "docs"),
                  ElasticsearchIndex(DEAD, "docs", api_key="arg-" + SECRET),
                  ElasticsearchIndex(DEAD, "docs", username="elastic", password=SECRET)):
        info = index.info()
        assert info["url"] == DEAD and info["type"] == "elasticsearch" and info["index"] == "docs"
        (tmp_path / "regrad.json").unlink(missing_ok=True)
        Store.create(tmp_path, model_name="m", meta_path="meta", doc_max_tokens=8, retriever=info)
        for text in (repr(index), str(index), json.dumps(info), (tmp_path / "regrad.json").read_text()):
            assert SECRET not in text


@needs_client
def test_the_first_credential_source_wins(monkeypatch):
    """Arguments, then the URL's user:password@, then the environment (checked on the client's headers)."""
    def auth(index):
        return index.client._headers["authorization"].split()[0]

    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "env-key")
    assert auth(ElasticsearchIndex(DEAD)) == "ApiKey"
    assert auth(ElasticsearchIndex(f"http://elastic:{SECRET}@127.0.0.1:9")) == "Basic"
    assert auth(ElasticsearchIndex(DEAD, username="elastic", password=SECRET)) == "Basic"
    monkeypatch.delenv("ELASTICSEARCH_API_KEY")
    monkeypatch.setenv("ELASTICSEARCH_USERNAME", "elastic")
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD", SECRET)
    assert auth(ElasticsearchIndex(DEAD)) == "Basic"
    assert auth(ElasticsearchIndex(DEAD, api_key="arg-key")) == "ApiKey"


@needs_client
@pytest.mark.parametrize("call", [
    lambda: ElasticsearchIndex.open(f"http://elastic:{SECRET}@127.0.0.1:9", "docs"),
    lambda: ElasticsearchIndex.create(f"http://elastic:{SECRET}@127.0.0.1:9", "docs"),
    lambda: ElasticsearchIndex(DEAD, "docs", api_key=SECRET).retrieve("capital of France", 3),
    lambda: ElasticsearchIndex(DEAD, "docs", api_key=SECRET).retrieve_batch(["a", "b"], 3),
    lambda: ElasticsearchIndex(DEAD, "docs", password=SECRET, username="u").add([{"id": "a", "text": "b"}]),
    lambda: len(ElasticsearchIndex(f"http://elastic:{SECRET}@127.0.0.1:9", "docs")),
])
def test_unreachable_server_gives_a_retrieval_error_without_credentials(call):
    with pytest.raises(RetrievalError, match=r"cannot reach Elasticsearch at http://127\.0\.0\.1:9 .*check") as err:
        call()
    assert SECRET not in str(err.value)


def test_missing_client_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "elasticsearch", None)  # makes `import elasticsearch` fail
    with pytest.raises(ImportError, match=r"pip install 'regrad\[elasticsearch\]'") as err:
        ElasticsearchIndex(DEAD)
    assert isinstance(err.value, RetrievalError)  # so the CLI prints it as a user error


def test_missing_url_or_clashing_fields_say_what_to_pass():
    with pytest.raises(RetrievalError, match="ELASTICSEARCH_URL"):
        ElasticsearchIndex()
    with pytest.raises(RetrievalError, match="distinct"):
        ElasticsearchIndex(DEAD, content_field="metadata")


@needs_client
def test_malformed_url_says_how_to_write_it():
    with pytest.raises(RetrievalError, match="scheme://host:port") as err:
        ElasticsearchIndex(f"elastic:{SECRET}@localhost")
    assert SECRET not in str(err.value)


def test_bad_input_is_rejected_before_contacting_the_server():
    index = ElasticsearchIndex(DEAD, client=NEVER_CALLED)
    with pytest.raises(RetrievalError, match="non-empty string 'id'"):
        index.add([{"id": "a", "text": "fine"}, {"id": "", "text": "no id"}])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.retrieve("q", 0)
    with pytest.raises(ValueError, match="query is empty|must be a string"):
        index.retrieve_batch(["ok", "  "], 2)
    assert index.add([]) == 0 and index.delete([]) == 0


def test_document_layout_round_trips_and_reads_langchain_documents():
    """The source add() writes, and the Hit a search hit becomes (pure conversion, no server)."""
    index = ElasticsearchIndex(DEAD, client=NEVER_CALLED)
    source = index._source("paris", "Paris is in France.", {"title": "Paris", "year": 1999})
    assert source == {"text": "Paris is in France.", "title": "Paris", "metadata": {"year": 1999}}
    assert index._hit({"_id": "paris", "_score": 2.5, "_source": source}) == Hit(
        "paris", "Paris is in France.", 2.5, {"year": 1999, "title": "Paris"})
    # langchain-elasticsearch's ElasticsearchStore: text + metadata object, ids as _id
    lc = ElasticsearchIndex(DEAD, title_field="metadata.title", id_field="metadata.doc", client=NEVER_CALLED)
    raw = {"_id": "uuid-1", "_score": 1.0, "_source": {"text": "Quokkas live on Rottnest.",
                                                        "metadata": {"title": "Quokka", "doc": "q1", "source": "w"}}}
    assert lc._hit(raw) == Hit("q1", "Quokkas live on Rottnest.", 1.0, {"source": "w", "title": "Quokka"})
    assert raw["_source"]["metadata"]["doc"] == "q1"  # reading does not mutate the response


def test_new_index_mapping_is_bm25_text_with_unindexed_metadata():
    index = ElasticsearchIndex(DEAD, title_field="metadata.title", id_field="doc_id", client=NEVER_CALLED)
    mappings = index.new_mappings("standard")
    props = mappings["properties"]
    assert props["text"] == {"type": "text", "analyzer": "standard"}
    assert props["metadata"]["dynamic"] is False
    assert props["metadata"]["properties"]["title"]["type"] == "text"
    assert props["doc_id"] == {"type": "keyword"}


@needs_client
def test_store_names_its_retriever(tmp_path, monkeypatch):
    old = tmp_path / "old"  # a store from before the retriever record: the embedded BM25 index
    old.mkdir()
    (old / "regrad.json").write_text(json.dumps({"model": "m", "meta": "x", "doc_max_tokens": 8}))
    BM25Index.create(old / "index").save()
    assert isinstance(Store.open(old).index(), BM25Index)
    es = tmp_path / "es"
    info = ElasticsearchIndex(f"http://elastic:{SECRET}@127.0.0.1:9", "docs", content_field="body").info()
    Store.create(es, model_name="m", meta_path="x", doc_max_tokens=8, retriever=info)
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD", SECRET)
    with pytest.raises(RetrievalError, match=r"at http://127\.0\.0\.1:9 ") as err:
        Store.open(es).index()  # credentials come from the environment, the URL from the store
    assert SECRET not in str(err.value)


def test_build_flags_parse():
    args = build_parser().parse_args(["build", "--elasticsearch", "http://es:9200", "--index", "docs",
                                      "--content-field", "body", "--id-field", "doc_id",
                                      "--search-fields", "title^2, body", "--reuse-index", "--store", "s"])
    assert (args.elasticsearch, args.index, args.content_field, args.id_field) == (
        "http://es:9200", "docs", "body", "doc_id")
    assert args.search_fields == ["title^2", "body"] and args.reuse_index and args.corpus is None
    bare = build_parser().parse_args(["build", "--elasticsearch", "--store", "s"])
    assert bare.elasticsearch == "" and bare.index is None and not bare.reuse_index
    assert build_parser().parse_args(["build", "--store", "s"]).elasticsearch is None


@pytest.mark.parametrize("argv, message", [
    (["--index", "docs", "--corpus", "c.jsonl", "--meta", "m"], "--index need --elasticsearch URL"),
    (["--reuse-index", "--corpus", "c.jsonl", "--meta", "m"], "--reuse-index need --elasticsearch URL"),
    (["--meta", "m"], "build needs --corpus FILE (or --elasticsearch URL --index NAME)"),
    pytest.param(["--elasticsearch", f"http://elastic:{SECRET}@127.0.0.1:9", "--index", "docs", "--meta", "m"],
                 "cannot reach Elasticsearch at http://127.0.0.1:9 ", marks=needs_client),
    pytest.param(["--elasticsearch", f"http://elastic:{SECRET}@127.0.0.1:9", "--corpus", "c.jsonl", "--meta", "m"],
                 "cannot reach Elasticsearch at http://127.0.0.1:9 ", marks=needs_client),
    (["--elasticsearch", "--index", "docs", "--meta", "m"], "no Elasticsearch URL"),
])
def test_build_flag_mistakes_get_a_message(tmp_path, capsys, argv, message):
    assert main(["build", "--store", str(tmp_path / "store"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and SECRET not in err
    assert not (tmp_path / "store").exists()  # nothing written, no model loaded
