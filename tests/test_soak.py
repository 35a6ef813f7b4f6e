"""A short soak: random cancellations, timeouts and abandoned streams, then nothing left over
(the long one: python bench/soak.py --requests 1000)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio


async def test_short_soak(tiny_model_path):
    from soak import soak

    r = await soak(tiny_model_path, requests=300, seed=3, deadline_s=240)
    assert r["ended"] == 300  # every request ended: a result, a cancellation, a timeout or a left stream
    assert r["wrong_outputs"] == 0, r["first_wrong"]
    assert r["left"] == dict(model_kv=0, model_workers=0, model_waiting=0, pool_kv=0, pool_in_use=0, pool_waiting=0)
    assert r["mullama_threads_alive"] == []
    assert {"completed", "cancelled", "timed_out", "abandoned"} <= set(r["outcomes"])  # every path was taken
    assert r["ok"]
