"""Serving under load, driven through the plain Generator (no Ray): admission by a KV-token budget, and a server
that loads and serves only the methods of ``serve.methods``."""

from __future__ import annotations

import asyncio

import pytest
from bundle_factory import cached_tiny_bundle

from mage_ray.config import load_config
from mage_ray.config.checks import ConfigError
from mage_ray.decode import Engine, Request
from mage_ray.serve.core import Generator
from mage_ray.serve.schema import ApiError, GenerateBody, parse_body, to_request


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def smoke(repo_root):
    return str(repo_root / "configs" / "smoke.yaml")


def test_admission_keeps_the_running_batch_within_the_token_budget(bundle, smoke, monkeypatch):
    """8 requests of 1-3 rows, all with the same prompt and length L = prompt + max_tokens, sent at once with
    max_batch_tokens = 4 L and room for 16 requests: every decode step runs at most 4 rows (the budget; counting
    requests, all 14 rows would run together), the queue is served in order, and every text is what the request
    gives alone. With a budget below one request's cost, a 3-row request runs alone, and the 1-row ones behind it
    wait for it."""
    g = Generator.from_bundle(
        bundle, load_config(smoke, ["serve.max_batch_size=16", "serve.max_ongoing_requests=64"])
    )
    try:
        methods = ["mage-e", "bs", "mage-e-m", "bs", "mage-e", "bs", "bs", "mage-e-m"]
        reqs = [
            Request(
                "Hello there", [0.2 + 0.1 * i, 0.8 - 0.1 * i], method=m, max_new_tokens=6, ignore_eos=True
            )
            for i, m in enumerate(methods)
        ]
        jobs = [g.engine.prepare(r) for r in reqs]
        rows = [j.n_rows for j in jobs]
        assert rows == [3, 1, 2, 1, 3, 1, 1, 2]
        L = len(jobs[0].prompt_ids) + 6
        solo = [g.engine.generate([r])[0].token_ids for r in reqs]
        step_rows: list[int] = []
        orig = g.engine._forward

        def spy(ids, *a, **k):
            if ids.shape[1] == 1:
                step_rows.append(ids.shape[0])
            return orig(ids, *a, **k)

        monkeypatch.setattr(g.engine, "_forward", spy)

        async def run(batch: list[Request]) -> list:
            for r in batch:
                await g.check(r)
            tickets = [g.submit(r) for r in batch]
            return [await t.result() for t in tickets]

        g.max_batch_tokens = 4 * L
        got = asyncio.run(run([Request(**{**r.__dict__, "prepared": None}) for r in reqs]))
        print(f"budget 4 L: rows per decode step {step_rows}")
        assert [c.token_ids for c in got] == solo
        assert max(step_rows) == 4 and g.stats()["kv_budget_used"] == 0

        step_rows.clear()
        g.max_batch_tokens = L  # below the 3-row request's cost
        got = asyncio.run(run([Request(**{**reqs[i].__dict__, "prepared": None}) for i in (0, 1, 3)]))
        print(f"budget L: rows per decode step {step_rows}")
        assert [c.token_ids for c in got] == [solo[0], solo[1], solo[3]]
        assert set(step_rows) == {3, 1} and step_rows[:5] == [3] * 5  # alone first, then the bs requests
    finally:
        g.close()
    with pytest.raises(ConfigError, match="serve.max_batch_tokens"):
        load_config(smoke, ["serve.max_batch_tokens=0"])


def test_server_loads_and_serves_only_its_methods(bundle, smoke):
    """serve.methods = [bs, mage-i-m]: only the backbones are loaded (the bundle's value models, ARMs and PARM are
    not), /v1/objectives lists just those methods, a request for another one is refused with 400 naming
    ``method``, and what is served gives the tokens of an engine holding every adapter of the bundle."""
    cfg = load_config(smoke, ["serve.methods=[bs, mage-i-m]", "decode.method=bs"])
    g = Generator.from_bundle(bundle, cfg, ["decode.method=bs"])
    try:
        assert g.methods == ("bs", "mage-i-m") and g.info()["methods"] == ["bs", "mage-i-m"]
        assert (
            len(g.engine.mixed.adapters) == 2 and g.engine.layout.values == () and g.engine.layout.arms == ()
        )
        with pytest.raises(ApiError) as e:
            asyncio.run(g.check(Request("Hi", [0.5, 0.5], method="mage-e-m")))
        assert e.value.status == 400 and e.value.field == "method"
        with pytest.raises(ApiError) as e:
            to_request(parse_body(b'{"prompt": "x", "method": "genarm"}', GenerateBody), g.limits)
        assert e.value.status == 400 and e.value.field == "method"
        req = Request("Hello there", [0.3, 0.7], method="mage-i-m", alpha=0.2, max_new_tokens=8)
        got = asyncio.run(g.generate(Request(**req.__dict__)))
    finally:
        g.close()
    full = Engine.from_bundle(bundle)
    assert len(full.mixed.adapters) > 2
    assert got.token_ids == full.generate([req])[0].token_ids

    with pytest.raises(ConfigError, match="serve.methods.*default method 'mage-e-m'"):
        Generator.from_bundle(bundle, load_config(smoke, ["serve.methods=[bs]"]))
    with pytest.raises(ConfigError, match=r"serve.methods.*cannot serve \['rs'\]"):
        Generator.from_bundle(bundle, load_config(smoke, ["serve.methods=[rs, mage-e-m]"]))
    with pytest.raises(ConfigError, match=r"serve.methods\[\]"):
        load_config(smoke, ["serve.methods=[nope]"])
