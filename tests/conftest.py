"""Shared fixtures: the tiny generated model, the default model, vocab files."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))  # the fuzz and soak harnesses, for their short runs

import mullama  # noqa: E402


#: fixtures that need the real default model: a test using one is an integration test
_DEFAULT_MODEL_FIXTURES = {"default_model_path", "default_model", "ctx", "default_server"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the real default model ``integration`` (the fast tier
    is ``pytest -m "not integration"``)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        named = {v for v in params.values() if isinstance(v, str)}  # (a fixture's name as a parameter)
        if _DEFAULT_MODEL_FIXTURES & (set(getattr(item, "fixturenames", ())) | named):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def no_open_owner_left():
    """After each test, no llama.cpp owner (model, context, engine) the test
    opened is still open: a test that leaks one fails, naming it. Owners of
    wider-scoped fixtures (opened before the test) are not the test's."""
    from mullama import _core

    before = weakref.WeakSet(_core._live)
    yield

    def left():
        return [o for o in list(_core._live) if o not in before and not o.closed]

    if left():
        gc.collect()  # what only the garbage collector would close (with a ResourceWarning)
        if left():
            pytest.fail(f"the test left open: {', '.join(sorted(type(o).__name__ for o in left()))}")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """Every async test runs on both backends; trio cannot be skipped silently."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 0.6 MB random-weight llama GGUF, written once per test run."""
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    with mullama.Model.load(tiny_model_path) as m:
        yield m


@pytest.fixture
def tiny_ctx(tiny_model):
    with tiny_model.create_context(context_size=512, threads=1) as ctx:
        yield ctx


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model, pulled into the cache by the suite itself if absent."""
    return mullama.default_model_path(progress=False)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    with mullama.Model.load(default_model_path) as m:
        yield m


@pytest.fixture
def ctx(default_model):
    with default_model.create_context(context_size=1024) as c:
        yield c


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    from fetch_llama_cpp import ensure_llama_cpp

    return ensure_llama_cpp()


@pytest.fixture
def cyclic_garbage():
    """A context manager that collects what the code in it left in reference cycles.

    The cyclic collector is off inside, so nothing is collected early; on exit
    ``gc.collect()`` finds the unreachable cycles, which are handed back in the
    list it yields (then dropped)."""
    import gc
    from contextlib import contextmanager

    @contextmanager
    def collect():
        found: list = []
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            yield found
        finally:
            gc.collect()
            found.extend(gc.garbage)
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()

    return collect


@pytest.fixture(scope="session")
def prometheus_families():
    """A function: the metric families of a Prometheus text (format 0.0.4) by name, parsed by
    prometheus_client, after checking what the parser lets through: every sample has a declared
    type and help, each family is declared once, values are finite, counters end in _total and
    are not negative, a histogram's buckets are cumulative with sorted bounds ending at +Inf,
    which holds _count."""
    import math

    from prometheus_client.parser import text_string_to_metric_families

    def parse(text: str) -> dict:
        assert text.endswith("\n")
        families = {}
        for f in text_string_to_metric_families(text):
            assert f.name not in families, f.name
            assert f.type in ("counter", "gauge", "histogram") and f.documentation, f
            families[f.name] = f
            assert all(math.isfinite(s.value) for s in f.samples), f
            if f.type == "counter":
                assert all(s.name == f.name + "_total" and s.value >= 0 for s in f.samples), f
            if f.type == "histogram":
                buckets = [s for s in f.samples if s.name == f.name + "_bucket"]
                bounds = [float(s.labels["le"]) for s in buckets]
                counts = [s.value for s in buckets]
                assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and bounds[-1] == math.inf, f
                assert counts == sorted(counts), f
                rest = {s.name: s.value for s in f.samples if s not in buckets}
                assert set(rest) == {f.name + "_sum", f.name + "_count"}, f
                assert counts[-1] == rest[f.name + "_count"], f
        return families

    return parse
