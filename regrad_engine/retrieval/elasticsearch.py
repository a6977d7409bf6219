"""Elasticsearch as the retriever: BM25 ``multi_match`` over an index on a server.

:class:`ElasticsearchIndex` implements the :class:`~regrad_engine.retrieval.base.DocumentIndex`
protocol and the same management API as :class:`~regrad_engine.retrieval.bm25.BM25Index`.
Documents written by :meth:`ElasticsearchIndex.add` look like this (the layout
of langchain-elasticsearch's ``ElasticsearchStore``, so either can read an
index the other wrote):

    _id        the chunk id (also copied into ``id_field`` when one is set)
    text       the chunk text                      (``content_field``)
    title      the document title, if there is one  (``title_field``)
    metadata   every other metadata key, as an object (stored, not searched)

Credentials come from the arguments, the URL's ``user:password@`` part or the
environment (``ELASTICSEARCH_API_KEY``, or ``ELASTICSEARCH_USERNAME`` and
``ELASTICSEARCH_PASSWORD``). They are handed to the client and kept out of
reprs, error messages and :meth:`ElasticsearchIndex.info`.

The client is an optional dependency: ``pip install 'regrad[elasticsearch]'``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from regrad_engine.data import Chunk
from regrad_engine.errors import UnknownDocumentError
from regrad_engine.retrieval.base import (
    Hit,
    RetrievalError,
    check_query,
    records,
    register_backend,
)

ENV_URL, ENV_API_KEY = "ELASTICSEARCH_URL", "ELASTICSEARCH_API_KEY"
ENV_USERNAME, ENV_PASSWORD = "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD"
_INSTALL = "pip install 'regrad[elasticsearch]'"
_VECTOR_TYPES = {"dense_vector", "sparse_vector", "rank_vectors", "semantic_text"}  # never returned in hits
_KEEP_ALIVE = "2m"  # point in time kept open between pages of documents()


class ElasticsearchClientMissing(RetrievalError, ImportError):
    """The ``elasticsearch`` client package is not installed."""


def redacted_url(url: str) -> str:
    """Return ``url`` without its ``user:password@`` part, query string and fragment.

    ``"https://elastic:pw@es.example.com:9243/x?k=v"`` -> ``"https://es.example.com:9243/x"``.
    Everything up to the last ``@`` goes, so a password with an unescaped
    ``/`` or ``@`` does not leak either.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = rest.rpartition("@")[2].split("#")[0].split("?")[0]
    return f"{scheme}{sep}{rest}"


def _scrub(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _client_module() -> Any:
    try:
        import elasticsearch
        import elasticsearch.helpers  # noqa: F401 - bulk indexing
    except ImportError as exc:
        raise ElasticsearchClientMissing(f"the Elasticsearch retriever needs the client: {_INSTALL}") from exc
    return elasticsearch


def _pop_path(source: dict, path: str | None) -> Any:
    """Remove and return ``source[path]``; ``a.b`` looks inside object ``a`` (copied, not mutated)."""
    if not path:
        return None
    if path in source:
        return source.pop(path)
    head, _, rest = path.partition(".")
    if not rest or not isinstance(source.get(head), dict):
        return None
    source[head] = dict(source[head])
    return _pop_path(source[head], rest)


def _set_path(source: dict, path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        _set_path(source.setdefault(head, {}), rest, value)
    else:
        source[head] = value


def _map_field(properties: dict, path: str, spec: dict) -> None:
    """Put field ``a.b`` with mapping ``spec`` into a mapping's ``properties`` (``a`` becomes an object)."""
    head, _, rest = path.partition(".")
    if rest:
        node = properties.setdefault(head, {"type": "object"})
        _map_field(node.setdefault("properties", {}), rest, spec)
    else:
        properties[head] = spec


def _field(properties: dict, path: str) -> dict:
    """The mapping of field ``a.b.c`` in a mapping's ``properties`` ({} if absent)."""
    head, _, rest = path.partition(".")
    node = properties.get(head) or {}
    return _field(node.get("properties") or {}, rest) if rest else node


def _vector_fields(properties: dict, prefix: str = "") -> list[str]:
    out = []
    for name, node in properties.items():
        if node.get("type") in _VECTOR_TYPES:
            out.append(prefix + name)
        out += _vector_fields(node.get("properties") or {}, f"{prefix}{name}.")
    return out


@register_backend("elasticsearch")
class ElasticsearchIndex:
    """A BM25 retriever over an Elasticsearch index, new or written by another tool.

    Use :meth:`create` for a new index and :meth:`open` for an existing one;
    the constructor itself does not contact the server. Writes become
    visible to this object's searches right away (it refreshes the index
    before its next read); :meth:`save` makes them visible to everyone.

    Args:
        url: Server URL; default ``$ELASTICSEARCH_URL``. May carry ``user:password@``.
        index: Index (or alias) name.
        content_field: Source field with the document text.
        title_field: Source field with the title (``metadata.title`` for a
            title inside a langchain ``metadata`` object).
        id_field: Source field with the document id; None uses ``_id``.
        search_fields: Fields the ``multi_match`` query searches, boosts
            allowed (``["title^2", "text"]``); default ``[title_field, content_field]``.
        api_key: API key (default ``$ELASTICSEARCH_API_KEY``).
        username: Basic-auth user (default from the URL or ``$ELASTICSEARCH_USERNAME``).
        password: Basic-auth password (default from the URL or ``$ELASTICSEARCH_PASSWORD``).
        verify_certs: Verify the server's TLS certificate.
        client: A ready ``elasticsearch.Elasticsearch`` client; ``url`` and
            the credentials are then ignored (``url`` only names the server in messages).

    Raises:
        RetrievalError: No URL, conflicting field names, or the client package
            is missing (then also an ImportError).
    """

    def __init__(self, url: str | None = None, index: str = "regrad", *, content_field: str = "text",
                 title_field: str = "title", id_field: str | None = None, search_fields: list[str] | None = None,
                 api_key: str | None = None, username: str | None = None, password: str | None = None,
                 verify_certs: bool = True, client: Any = None):
        if not isinstance(index, str) or not index.strip():
            raise RetrievalError(f"index must be a non-empty name, got {index!r}")
        fields = [f for f in (content_field, title_field, id_field) if f is not None]
        clash = len(set(fields)) != len(fields) or "metadata" in fields
        if clash or any(not isinstance(f, str) or not f for f in fields):
            raise RetrievalError(f"content_field, title_field and id_field must be distinct names other than "
                                 f"'metadata', got {content_field!r}, {title_field!r}, {id_field!r}")
        self.index, self.content_field, self.title_field, self.id_field = index, content_field, title_field, id_field
        self.search_fields = list(search_fields) if search_fields else [title_field, content_field]
        self.verify_certs = verify_certs
        self._pending = False  # written since the last refresh
        self._mapping: dict | None = None
        url = url or os.environ.get(ENV_URL)
        self._owns_client = client is None
        if client is None:
            if not url:
                raise RetrievalError(f"no Elasticsearch URL: pass url=... (or --elasticsearch URL) or set {ENV_URL}")
            client, self._secrets = self._connect(url, api_key, username, password, verify_certs)
        else:
            self._secrets = (api_key, password)
            if not url:
                try:
                    url = client.transport.node_pool.all()[0].base_url
                except (AttributeError, IndexError):
                    url = "<client>"
        self._client = client
        self.url = redacted_url(url)

    @property
    def client(self) -> Any:
        """The ``elasticsearch.Elasticsearch`` client, for anything this class does not wrap."""
        return self._client

    @staticmethod
    def _connect(url: str, api_key, username, password, verify_certs) -> tuple[Any, tuple]:
        """Make a client; the first credential source that is set wins (arguments, URL, environment)."""
        es = _client_module()
        parts = urlsplit(url if "://" in url else f"http://{url}")
        url_user = unquote(parts.username) if parts.username else None
        url_password = unquote(parts.password) if parts.password else None
        if api_key is None and username is None and url_user is None:
            api_key = os.environ.get(ENV_API_KEY) or None
        if api_key is None:
            username = username or url_user or os.environ.get(ENV_USERNAME) or None
            password = password or url_password or os.environ.get(ENV_PASSWORD) or None
        auth = {"api_key": api_key} if api_key else {"basic_auth": (username, password or "")} if username else {}
        secrets = (api_key, password, url_password, parts.password)
        try:
            client = es.Elasticsearch(redacted_url(url), verify_certs=verify_certs, **auth)
        except ValueError as exc:
            raise RetrievalError(f"invalid Elasticsearch URL {redacted_url(url)!r} ({_scrub(str(exc), secrets)}); "
                                 f"write it as scheme://host:port, e.g. http://localhost:9200") from exc
        return client, secrets

    @classmethod
    def create(cls, url: str | None = None, index: str = "regrad", *, analyzer: str = "english",
               exist_ok: bool = False, **kwargs: Any) -> ElasticsearchIndex:
        """Create the index with a BM25 text mapping; other arguments as the constructor.

        Args:
            analyzer: Analyzer of the text fields (``"english"`` stems and drops
                stopwords like the embedded BM25 index; ``"standard"`` does not).
            exist_ok: Open the index if it already exists instead of refusing.

        Raises:
            RetrievalError: The index exists (without ``exist_ok``) or the server
                cannot be reached or refuses.
        """
        self = cls(url, index, **kwargs)
        with self._errors("create the index"):
            if self._client.indices.exists(index=self.index):
                if not exist_ok:
                    raise RetrievalError(f"Elasticsearch index {self.index} already exists at {self.url}: "
                                         f"open it, pass exist_ok=True, or choose another name")
                return self
            mappings = self.new_mappings(analyzer)
            self._client.indices.create(index=self.index, mappings=mappings,
                                        settings={"index": {"similarity": {"default": {"type": "BM25"}}}})
        self._mapping = {"properties": mappings["properties"]}
        return self

    def new_mappings(self, analyzer: str = "english") -> dict:
        """The mappings :meth:`create` gives a new index.

        Text and title are BM25 text fields, the id field a keyword; ``metadata``
        is kept in the source but not indexed (``dynamic: false``), so metadata
        values of mixed types never make a document fail.
        """
        properties: dict[str, Any] = {"metadata": {"type": "object", "dynamic": False}}
        for name in (self.content_field, self.title_field):
            _map_field(properties, name, {"type": "text", "analyzer": analyzer})
        if self.id_field:
            _map_field(properties, self.id_field, {"type": "keyword"})
        return {"properties": properties}

    @classmethod
    def open(cls, url: str | None = None, index: str = "regrad", **kwargs: Any) -> ElasticsearchIndex:
        """Connect to an existing index; arguments as the constructor.

        Raises:
            RetrievalError: There is no such index, or the server cannot be reached.
        """
        self = cls(url, index, **kwargs)
        self._fields()  # fetches the mapping: fails here if the index is missing
        return self

    @classmethod
    def from_info(cls, info: Mapping[str, Any], directory: Path | None = None) -> ElasticsearchIndex:
        """Open the index a store's ``regrad.json`` names; credentials come from the environment.

        The stored URL has no credentials; ``$ELASTICSEARCH_URL`` is used instead
        when it names the same server (it may carry ``user:password@``).
        """
        url = info["url"]
        env_url = os.environ.get(ENV_URL)
        if env_url and redacted_url(env_url) == url:
            url = env_url
        return cls.open(url, info["index"], content_field=info.get("content_field", "text"),
                        title_field=info.get("title_field", "title"), id_field=info.get("id_field"),
                        search_fields=info.get("search_fields"), verify_certs=info.get("verify_certs", True))

    def info(self) -> dict:
        """What a store's ``regrad.json`` records about this index (no credentials)."""
        return {"type": "elasticsearch", "url": self.url, "index": self.index, "content_field": self.content_field,
                "title_field": self.title_field, "id_field": self.id_field, "search_fields": self.search_fields,
                "verify_certs": self.verify_certs}

    def __str__(self) -> str:
        return f"Elasticsearch index {self.index} at {self.url}"

    def __repr__(self) -> str:
        return f"ElasticsearchIndex({self.url!r}, index={self.index!r}, content_field={self.content_field!r})"

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn client exceptions into a RetrievalError that names the server (without credentials)."""
        es = _client_module()
        where = f"Elasticsearch at {self.url}"
        try:
            yield
        except es.AuthenticationException as exc:
            raise RetrievalError(f"{where} rejected the credentials (401) trying to {action}: set {ENV_API_KEY}, "
                                 f"or {ENV_USERNAME} and {ENV_PASSWORD}") from exc
        except es.AuthorizationException as exc:
            raise RetrievalError(f"{where}: the user may not {action} on index {self.index} (403): "
                                 f"{self._reason(exc)}") from exc
        except es.NotFoundError as exc:
            if "index_not_found" in self._reason(exc) or "no such index" in self._reason(exc):
                raise RetrievalError(self._missing()) from exc
            raise RetrievalError(f"{where} could not {action} on index {self.index}: {self._reason(exc)}") from exc
        except es.UnsupportedProductError as exc:
            raise RetrievalError(f"{self.url} is not an Elasticsearch server the client supports: "
                                 f"{self._reason(exc)}") from exc
        except es.ApiError as exc:
            reason = self._reason(exc)
            if "media_type" in reason or "Accept version" in reason:
                reason += (f"; the client (elasticsearch {es.__versionstr__}) must have the server's major version: "
                           f"pip install 'elasticsearch>=8,<9' for an 8.x server")
            raise RetrievalError(f"{where} could not {action} on index {self.index} "
                                 f"({exc.meta.status}): {reason}") from exc
        except es.TransportError as exc:
            raise RetrievalError(
                f"cannot reach {where} to {action} ({self._reason(exc)}): check that the server runs, the URL's "
                f"scheme (http/https) and port, and TLS certificates (verify_certs); credentials come from "
                f"{ENV_API_KEY} or {ENV_USERNAME}/{ENV_PASSWORD}") from exc

    def _reason(self, exc: Exception) -> str:
        body = getattr(exc, "body", None)
        if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
            error = body["error"]
            text = f"{error.get('type', '')}: {error.get('reason', '')}"
        elif getattr(exc, "errors", None):  # transport errors: the cause (refused, timeout, TLS) is inside
            text = str(exc.errors[-1]) or repr(exc.errors[-1])
        else:
            text = getattr(exc, "message", None) or repr(exc)
        return _scrub(str(text), self._secrets)

    def _missing(self) -> str:
        return (f"no Elasticsearch index {self.index} at {self.url}: build it with "
                f"`regrad build --elasticsearch {self.url} --index {self.index}`")

    def _fields(self) -> dict:
        """Mapping facts, fetched once: the vector fields to leave out of hits, the field to match ids on."""
        if self._mapping is None:
            with self._errors("read the mapping"):
                response = self._client.indices.get_mapping(index=self.index)
            properties: dict = {}
            for entry in response.body.values():  # one per index behind an alias
                properties.update((entry.get("mappings") or {}).get("properties") or {})
            self._mapping = {"properties": properties}
        if "excludes" not in self._mapping:
            properties = self._mapping["properties"]
            id_term = self.id_field
            if id_term and _field(properties, id_term).get("type") == "text":
                keyword = (_field(properties, id_term).get("fields") or {}).get("keyword")
                id_term = f"{id_term}.keyword" if keyword else id_term
            self._mapping.update(excludes=_vector_fields(properties), id_term=id_term)
        return self._mapping

    def _sync(self) -> None:
        """Refresh if this object wrote since the last refresh (read-your-writes)."""
        if self._pending:
            self._client.indices.refresh(index=self.index)
            self._pending = False

    def _source(self, doc_id: str, text: str, meta: dict) -> dict:
        meta = dict(meta)
        title = meta.pop("title", None)
        source: dict[str, Any] = {}
        _set_path(source, self.content_field, text)
        source["metadata"] = meta
        if title is not None:
            _set_path(source, self.title_field, title)
        if self.id_field:
            _set_path(source, self.id_field, doc_id)
        return source

    def _hit(self, raw: Mapping[str, Any]) -> Hit:
        """A search/get hit as a :class:`Hit`: metadata is the title, ``metadata`` and other source fields."""
        source = dict(raw.get("_source") or {})
        text = _pop_path(source, self.content_field)
        title = _pop_path(source, self.title_field)
        doc_id = _pop_path(source, self.id_field) if self.id_field else None
        nested = source.pop("metadata", None)
        meta = dict(source)  # fields other tools put next to the text
        if isinstance(nested, dict):
            meta.update(nested)
        elif nested is not None:
            meta["metadata"] = nested
        if title is not None:
            meta["title"] = title
        return Hit(str(doc_id if doc_id is not None else raw["_id"]), text if isinstance(text, str) else "",
                   float(raw.get("_score") or 0.0), meta)

    def add(self, docs: Iterable[Any]) -> int:
        """Add or replace documents (by id); the same inputs as :meth:`BM25Index.add`.

        All documents are checked before anything is sent; a server-side
        failure can leave part of a batch written (the error says how much).

        Returns:
            The number of documents written.

        Raises:
            RetrievalError: A document lacks id/text or has metadata that is not
                JSON-serializable, or the server refused some documents.
        """
        actions = [{"_op_type": "index", "_index": self.index, "_id": doc_id,
                    "_source": self._source(doc_id, text, meta)} for doc_id, text, meta in records(docs)]
        if not actions:
            return 0
        es = _client_module()
        failed = []
        with self._errors("index documents"):
            self._pending = True
            for ok, item in es.helpers.streaming_bulk(self._client, actions, raise_on_error=False):
                if not ok:
                    failed.append(item["index"])
        if failed:
            first = failed[0]
            raise RetrievalError(f"Elasticsearch at {self.url} refused {len(failed)} of {len(actions)} documents; "
                                 f"first: id {first.get('_id')!r}: {_scrub(str(first.get('error')), self._secrets)}")
        return len(actions)

    def delete(self, ids: str | Iterable[str]) -> int:
        """Delete documents by id; unknown ids are ignored.

        Returns:
            The number of documents actually removed.
        """
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        if not ids:
            return 0
        es = _client_module()
        with self._errors("delete documents"):
            if self.id_field:
                response = self._client.delete_by_query(index=self.index, refresh=True,
                                                        query={"terms": {self._fields()["id_term"]: ids}})
                return int(response["deleted"])
            actions = [{"_op_type": "delete", "_index": self.index, "_id": i} for i in ids]
            results = es.helpers.streaming_bulk(self._client, actions, raise_on_error=False, ignore_status=(404,))
            removed = sum(item["delete"].get("result") == "deleted" for ok, item in results)
            self._pending = True
        return removed

    def get(self, doc_id: str) -> Hit:
        """Return document ``doc_id`` as a :class:`Hit` with score 0.0.

        Raises:
            KeyError: If there is no such document.
        """
        es = _client_module()
        excludes = self._fields()["excludes"] or None
        with self._errors("get a document"):
            if self.id_field:
                self._sync()
                hits = self._client.search(index=self.index, size=1, source_excludes=excludes,
                                           query={"term": {self._fields()["id_term"]: doc_id}})["hits"]["hits"]
                raw = hits[0] if hits else None
            else:
                try:
                    raw = self._client.get(index=self.index, id=doc_id, source_excludes=excludes).body
                except es.NotFoundError as exc:
                    if "index_not_found" in self._reason(exc):
                        raise
                    raw = None
        if raw is None:
            raise UnknownDocumentError(f"no document {doc_id!r} in Elasticsearch index {self.index} at {self.url}")
        return self._hit({**raw, "_score": 0.0})

    def __contains__(self, doc_id: object) -> bool:
        if not isinstance(doc_id, str):
            return False
        with self._errors("look up a document"):
            if not self.id_field:
                return bool(self._client.exists(index=self.index, id=doc_id))
            self._sync()
            query = {"term": {self._fields()["id_term"]: doc_id}}
            return self._client.count(index=self.index, query=query)["count"] > 0

    def __len__(self) -> int:
        with self._errors("count documents"):
            self._sync()
            return int(self._client.count(index=self.index)["count"])

    def missing(self, ids: Iterable[str], batch_size: int = 1000) -> list[str]:
        """Return the ids (in order) that are not in the index."""
        ids = list(dict.fromkeys(ids))
        if self.id_field:
            present = set(self.ids())
            return [i for i in ids if i not in present]
        out = []
        with self._errors("look up documents"):
            for start in range(0, len(ids), batch_size):
                response = self._client.mget(index=self.index, ids=ids[start:start + batch_size], source=False)
                out += [d["_id"] for d in response["docs"] if not d.get("found")]
        return out

    def documents(self, batch_size: int = 1000, *, source: Any = None) -> Iterator[Hit]:
        """Yield every document of the index (score 0.0), a page at a time (point in time + search_after)."""
        excludes = self._fields()["excludes"] or None
        with self._errors("read documents"):
            self._sync()
            pit = self._client.open_point_in_time(index=self.index, keep_alive=_KEEP_ALIVE)["id"]
            try:
                after = None
                while True:
                    page = self._client.search(pit={"id": pit, "keep_alive": _KEEP_ALIVE}, size=batch_size,
                                               sort=["_shard_doc"], search_after=after, track_total_hits=False,
                                               source=source, source_excludes=None if source is False else excludes)
                    hits = page["hits"]["hits"]
                    if not hits:
                        return
                    pit = page["pit_id"] if "pit_id" in page else pit
                    after = hits[-1]["sort"]
                    for raw in hits:
                        yield self._hit({**raw, "_score": 0.0})
            finally:
                try:
                    self._client.close_point_in_time(id=pit)
                except Exception:  # noqa: BLE001 - the point in time expires by itself
                    pass

    def ids(self) -> list[str]:
        """Return all document ids (in index order, not insertion order)."""
        source = [self.id_field] if self.id_field else False
        return [hit.id for hit in self.documents(source=source)]

    def _query(self, query: str) -> dict:
        return {"multi_match": {"query": query, "fields": self.search_fields}}

    def retrieve(self, query: str, k: int) -> list[Hit]:
        """Return up to ``k`` documents matching ``query``, best first (BM25 ``multi_match``).

        Raises:
            RequestError: If ``k`` is not a positive int or the query is empty or blank.
            RetrievalError: If the server cannot be reached or the search fails.
        """
        check_query([query], k)
        excludes = self._fields()["excludes"] or None
        with self._errors("search"):
            self._sync()
            response = self._client.search(index=self.index, query=self._query(query), size=int(k),
                                           track_total_hits=False, source_excludes=excludes)
        return [self._hit(raw) for raw in response["hits"]["hits"]]

    def retrieve_batch(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Return ``retrieve(q, k)`` for every query, in order, with one ``msearch`` request."""
        queries = check_query(queries, k)
        if not queries:
            return []
        body: dict[str, Any] = {"size": int(k), "track_total_hits": False}
        if self._fields()["excludes"]:
            body["_source"] = {"excludes": self._fields()["excludes"]}
        searches: list[dict] = []
        for q in queries:
            searches += [{}, {"query": self._query(q), **body}]
        with self._errors("search"):
            self._sync()
            responses = self._client.msearch(index=self.index, searches=searches)["responses"]
        out = []
        for q, response in zip(queries, responses):
            if "error" in response:
                error = response["error"]
                reason = error.get("reason", error) if isinstance(error, Mapping) else error
                raise RetrievalError(f"Elasticsearch at {self.url} failed to search index {self.index} for {q!r}: "
                                     f"{_scrub(str(reason), self._secrets)}")
            out.append([self._hit(raw) for raw in response["hits"]["hits"]])
        return out

    def save(self) -> None:
        """Refresh the index so every reader sees the writes (Elasticsearch persists them itself)."""
        with self._errors("refresh"):
            self._client.indices.refresh(index=self.index)
        self._pending = False

    def close(self) -> None:
        """Close the client's connections if this object made the client."""
        if self._owns_client:
            self._client.close()


def index_chunks(index: ElasticsearchIndex) -> list[Chunk]:
    """Every document of ``index`` as one chunk (never split: its id must stay the id retrieval returns).

    Documents without text are skipped.
    """
    return [Chunk(id=h.id, text=h.text, source_id=h.id, index=0, metadata=h.metadata)
            for h in index.documents() if h.text.strip()]
