"""Integration fixtures: a tiny ReGrad engine (sdpa float64, so batched == one at a time exactly)."""

from __future__ import annotations

import inspect

import pytest

from tests.conftest import DOCS, IN_BANK, QUESTIONS, make_engine  # noqa: F401 (re-exported to tests)


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    """Read-only for the tests (no write-back): shared by a module's tests."""
    engine = make_engine(tokenizer, tmp_path_factory.mktemp("store"))
    yield engine
    engine.space.remove()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """``async def`` tests here run under pytest-asyncio without marks (langchain-tests'
    standard suites have some): the asyncio mark is added before pytest-asyncio looks."""
    items = yield
    if items and inspect.iscoroutinefunction(getattr(obj, "__func__", obj)):
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, pytest.Function) and item.get_closest_marker("asyncio") is None:
                item.add_marker(pytest.mark.asyncio)
    return items
