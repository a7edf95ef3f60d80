"""Serving: the schema, the plain Generator core (no Ray), and the live Serve app on localhost.

The live tests run ``serve.run(build_app(...))`` on a fresh local Ray (``ray.init(address="local",
num_cpus=2)``) with the tiny random bundle, auth on, and small limits so the bad-input cases are cheap.
"""

import asyncio
import json
import os
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from bundle_factory import cached_tiny_bundle

from mage_ray.bundle import load_bundle
from mage_ray.config import load_config
from mage_ray.decode import Request
from mage_ray.metrics import pareto_mask
from mage_ray.serve.core import Generator, decode_defaults
from mage_ray.serve.schema import (
    ApiError,
    ChatBody,
    CompletionBody,
    GenerateBody,
    GridBody,
    Limits,
    error_body,
    parse_body,
    to_request,
)
from mage_ray.tasks.objectives import get_objective, score
from mage_ray.tasks.quality import degenerate_mask

TOKEN_ENV, TOKEN = "MAGE_SERVE_TEST_TOKEN", "s3cret-test-token"
LIMITS = Limits(n_objectives=2, methods=("bs", "mage-e-m"), max_tokens_limit=64, objectives=("a", "b"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def smoke(repo_root):
    return str(repo_root / "configs" / "smoke.yaml")


# ----- schema (no model) -----


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "preference": [0.2, 0.3, 0.5]}, "preference"),
        ({"prompt": "x", "preference": [-0.5, 1.5]}, "preference[0]"),
        ({"prompt": "x", "preference": [0.5, 0.6]}, "preference"),
        ({"prompt": "x", "method": "nope"}, "method"),
        ({"prompt": "x", "gamma": -1}, "gamma"),
        ({"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
        ({"prompt": "x", "temperature": 0}, "temperature"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
    ],
)
def test_schema_errors_name_the_field(body, field):
    with pytest.raises(ApiError) as e:
        to_request(parse_body(json.dumps(body).encode(), GenerateBody), LIMITS)
    assert e.value.status == 400 and e.value.field == field, e.value.message


def test_schema_builds_requests():
    """Omitted preference -> uniform; [0.33333, 0.66667] (off by 0) passes and is renormalised to sum 1."""
    r = to_request(parse_body(b'{"prompt": "hi", "max_tokens": 5, "stop": "x"}', GenerateBody), LIMITS)
    assert r.preference == [0.5, 0.5] and r.max_new_tokens == 5 and r.stop == ["x"] and r.method is None
    r = to_request(
        parse_body(
            b'{"messages": [{"role": "user", "content": "hi"}], "preference": [0.33333, 0.66667],'
            b' "temperature": 0.7}',
            GenerateBody,
        ),
        LIMITS,
    )
    assert r.prompt == [{"role": "user", "content": "hi"}] and r.do_sample is True
    assert sum(r.preference) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ApiError, match="not valid JSON") as e:
        parse_body(b'{"prompt": ', GenerateBody)
    assert e.value.field == "body"
    with pytest.raises(ApiError) as e:
        parse_body(b'{"prompt": "x", "preference": [NaN, 0.5]}', GenerateBody)
    assert e.value.field == "preference[0]"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}

OPENAI_BAD = [  # (body patch, endpoint model, field named, code)
    ({"stream": "maybe"}, "chat", "stream", None),
    ({"stream_options": 5}, "chat", "stream_options", None),
    ({"stream_options": {"include_usage": True}}, "chat", "stream_options", None),  # without stream
    (
        {"stream": True, "stream_options": {"include_usage": "x"}},
        "chat",
        "stream_options.include_usage",
        None,
    ),
    ({"bogus": 1}, "chat", "bogus", None),
    ({"n": 2}, "chat", "n", "unsupported_parameter"),
    ({"logprobs": True}, "chat", "logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function"}]}, "chat", "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "chat", "response_format", "unsupported_parameter"),
    ({"mage": {"gamma": -1}}, "chat", "mage.gamma", None),
    ({"echo": True}, "completion", "echo", "unsupported_parameter"),
    ({"best_of": 3}, "completion", "best_of", "unsupported_parameter"),
    ({"suffix": "x"}, "completion", "suffix", "unsupported_parameter"),
]


@pytest.mark.parametrize(
    "patch, kind, field, code", OPENAI_BAD, ids=[f"{k}-{f}" for _, k, f, _ in OPENAI_BAD]
)
def test_openai_bodies_name_the_field_and_use_string_codes(patch, kind, field, code):
    """Every refused OpenAI field is named (the location cleaner keeps names starting with 'str': stream,
    stream_options); unknown keys are named; error codes are strings or null, as OpenAI's are."""
    base = CHAT if kind == "chat" else {"prompt": "hi"}
    model = ChatBody if kind == "chat" else CompletionBody
    with pytest.raises(ApiError) as e:
        to_request(parse_body(json.dumps({**base, **patch}).encode(), model), LIMITS)
    assert e.value.status == 400 and e.value.field == field, e.value.message
    assert e.value.code == code and error_body(e.value)["error"]["code"] == code
    assert field in e.value.message


def test_openai_fields_that_change_nothing_are_accepted():
    """Standard OpenAI fields with no effect here (user, metadata, store, the 'not used' values of the refused
    ones) pass, and the request decodes as without them."""
    body = {
        **CHAT,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = to_request(parse_body(json.dumps(body).encode(), ChatBody), LIMITS)
    assert r == to_request(parse_body(json.dumps(CHAT).encode(), ChatBody), LIMITS)


def test_every_problem_is_listed_and_grid_lattice_errors_name_the_step():
    """Two bad fields: the first is the param, both are in the message (an unknown key is not hidden); a lattice
    with step 0 names preferences.step, not "Input should be a valid list" of the other union branch."""
    with pytest.raises(ApiError) as e:
        parse_body(b'{"prompt": "x", "gamma": -1, "bogus": 1}', GenerateBody)
    assert e.value.field == "gamma" and "bogus: unknown field" in e.value.message
    with pytest.raises(ApiError) as e:
        parse_body(b'{"prompts": ["a"], "preferences": {"n_objectives": 2, "step": 0}}', GridBody)
    assert e.value.field == "preferences.step" and "valid list" not in e.value.message
    with pytest.raises(ApiError) as e:
        parse_body(b'{"prompts": ["a"], "preferences": [[0.5, "x"]]}', GridBody)
    assert e.value.field == "preferences[0][1]"


def test_decode_defaults_precedence(bundle, smoke):
    """Bundle method/gamma/alpha beat the YAML; a command-line override beats the bundle."""
    b = load_bundle(bundle)
    cfg = load_config(smoke, ["decode.gamma=3.0", "decode.max_new_tokens=5"])
    d = decode_defaults(cfg, b, [])
    assert (d.method, d.gamma, d.alpha, d.max_new_tokens) == (b.default_method, b.gamma, b.alpha, 5)
    d = decode_defaults(cfg, b, ["decode.gamma=3.0"])
    assert d.gamma == 3.0 and d.method == b.default_method


# ----- the core, driven without Ray -----


def _generator(bundle, smoke, batching: str) -> Generator:
    overrides = ["serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.05", f"serve.batching={batching}"]
    return Generator.from_bundle(bundle, load_config(smoke, overrides))


@pytest.fixture(scope="module")
def gen(bundle, smoke):
    g = _generator(bundle, smoke, "continuous")
    assert g.continuous  # the default, and the tiny Llama has full-attention caches
    yield g
    g.close()


@pytest.fixture(scope="module")
def gen_micro(bundle, smoke):
    g = _generator(bundle, smoke, "micro")
    yield g
    g.close()


@pytest.mark.parametrize("mode", ["micro", "continuous"])
def test_core_batches_mixed_requests_like_the_engine(gen, gen_micro, mode):
    """6 concurrent requests (3 methods, 6 preferences) with max_batch_size 4: every text equals what the engine
    gives the request alone (batching changes nothing). Micro-batching runs 2 engine batches; continuous
    batching runs 1, the last 2 requests admitted into it once the first 4 finish."""
    g = gen if mode == "continuous" else gen_micro
    reqs = [
        Request("Hello there", preference=[i / 5, 1 - i / 5], method=m, max_new_tokens=6)
        for i, m in enumerate(["bs", "mage-e-m", "mage-i-m", "bs", "mage-e-m", "mage-i-m"])
    ]
    solo = [g.engine.generate([r])[0] for r in reqs]
    before = dict(g.counters)

    async def run():
        return await asyncio.gather(*(g.generate(r) for r in reqs))

    got = asyncio.run(run())
    assert [c.text for c in got] == [c.text for c in solo]
    delta = {k: g.counters[k] - before[k] for k in ("batches", "admitted", "completed")}
    assert delta == (
        {"batches": 1, "admitted": 2, "completed": 6}
        if mode == "continuous"
        else {"batches": 2, "admitted": 0, "completed": 6}
    )


@pytest.mark.parametrize("mode", ["micro", "continuous"])
def test_core_late_request_joins_the_running_batch(gen, gen_micro, mode):
    """A short request sent while a long one decodes: with continuous batching it starts at the next step and
    finishes first (same text as alone); with micro-batching it waits for the long one to finish."""
    g = gen if mode == "continuous" else gen_micro
    short = Request("Hi", preference=[0.3, 0.7], method="mage-e-m", max_new_tokens=3)
    (alone,) = g.engine.generate([short])

    async def run():
        order = []
        long_t = g.submit(Request("Hello", preference=[0.5, 0.5], max_new_tokens=40, ignore_eos=True))
        await long_t.next()  # the long request is decoding
        short_t = g.submit(short)

        async def wait(name, t):
            c = await t.result()
            order.append(name)
            return c

        _, c = await asyncio.gather(wait("long", long_t), wait("short", short_t))
        return order, c

    before = dict(g.counters)
    order, c = asyncio.run(run())
    assert c.token_ids == alone.token_ids
    if mode == "continuous":
        assert order == ["short", "long"]
        assert (
            g.counters["admitted"] - before["admitted"] == 1
            and g.counters["batches"] - before["batches"] == 1
        )
    else:
        assert order == ["long", "short"] and g.counters["batches"] - before["batches"] == 2


def test_core_stream_cancel_frees_the_slot(gen):
    """Closing a stream after 3 events stops the engine on that request: finish_reason 'cancelled' with far
    fewer than max_new_tokens tokens, and the next request runs at once."""
    before = dict(gen.counters)

    async def run():
        t = gen.submit(Request("Hello", preference=[0.5, 0.5], max_new_tokens=500, ignore_eos=True))
        n = 0
        agen = t.events()
        async for _ev in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        nxt = await asyncio.wait_for(gen.generate(Request("Hi", preference=[1, 0], max_new_tokens=3)), 120)
        return t, nxt

    t, nxt = asyncio.run(run())
    assert t.completion.finish_reason == "cancelled"
    assert 3 <= len(t.completion.token_ids) < 100
    assert nxt.finish_reason == "length" and len(nxt.token_ids) == 3
    assert gen.counters["cancelled"] - before["cancelled"] == 1
    assert gen.stats()["active"] == 0 and gen.stats()["queued"] == 0


def test_core_cancelled_while_queued_never_runs(gen):
    async def run():
        a = gen.submit(Request("Hello", preference=[0.5, 0.5], max_new_tokens=2))
        b = gen.submit(Request("Hello", preference=[0.5, 0.5], max_new_tokens=50))
        b.cancel()
        return await a.result(), await b.result()

    a, b = asyncio.run(run())
    assert a.finish_reason == "length" and b.finish_reason == "cancelled" and b.token_ids == []


def test_core_survives_engine_failure_and_reports_stuck(gen, monkeypatch):
    """An exception inside the engine fails that batch's requests (error 'decoding failed') but not the
    scheduler; a batch with no step for longer than stuck_after_s makes health() false."""
    real = gen.engine.stream

    def broken(reqs, **kw):
        raise RuntimeError("CUDA out of memory (simulated)")
        yield  # pragma: no cover

    monkeypatch.setattr(gen.engine, "stream", broken)

    async def fail():
        return await gen.generate(Request("Hi", preference=[1, 0], max_new_tokens=2))

    c = asyncio.run(fail())
    assert c.finish_reason == "error" and "decoding failed" in c.error and "out of memory" in c.error

    def slow(reqs, **kw):
        time.sleep(0.6)
        yield from real(reqs, **kw)

    monkeypatch.setattr(gen.engine, "stream", slow)
    monkeypatch.setattr(gen, "stuck_after_s", 0.3)

    async def run():
        task = asyncio.ensure_future(gen.generate(Request("Hi", preference=[1, 0], max_new_tokens=2)))
        await asyncio.sleep(0.45)
        during = gen.health()
        done = await task
        return during, done, gen.health()

    during, done, after = asyncio.run(run())
    assert during[0] is False and "stuck" in during[1]
    assert done.finish_reason == "length" and after == (True, "ok")


# ----- the live app -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle, smoke):
    import ray
    from ray import serve

    from mage_ray.serve.app import build_app

    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: replicas inherit the environment
    port, metrics_port = _free_port(), _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,  # Prometheus text of the node's metrics (ours included)
        _system_config={"metrics_report_interval_ms": 500},  # workers report every 0.5 s (default 10 s)
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = [
            f"serve.auth_token_env={TOKEN_ENV}",
            "serve.max_body_bytes=20000",
            "serve.max_grid_points=5",
            "serve.max_prompts_per_grid=3",
            "decode.max_tokens_limit=1600",
            "serve.batch_wait_timeout_s=0.2",
            "serve.api_docs=true",
        ]
        serve.run(
            build_app({"bundle": str(bundle), "config": smoke, "overrides": overrides}),
            name="mage",
            route_prefix="/",
        )
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            auth={"Authorization": f"Bearer {TOKEN}"},
            metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, headers=server.auth, timeout=120, **kw)


def _sse(resp) -> list:
    """The data payloads of an SSE response ('[DONE]' kept as a string)."""
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_auth_and_objectives(server):
    assert requests.get(server.url + "/healthz", timeout=30).json()["status"] == "ok"  # no auth needed
    r = requests.get(server.url + "/v1/objectives", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
    r = requests.get(server.url + "/v1/objectives", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    info = requests.get(server.url + "/v1/objectives", headers=server.auth, timeout=30).json()
    assert info["objectives"] == ["conciseness", "readability"]
    assert info["defaults"]["method"] == "mage-e-m" and info["defaults"]["beta"] == 0.7
    assert {"bs", "mage-e-m", "mage-i-m"} <= set(info["methods"])


def test_generate_plain_and_streamed_agree(server):
    body = {"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "max_tokens": 8}
    plain = _post(server, "/v1/generate", body).json()
    assert plain["finish_reason"] in ("length", "eos") and plain["usage"]["completion_tokens"] <= 8
    assert plain["preference"] == [0.3, 0.7] and plain["method"] == "mage-e-m"
    r = _post(server, "/v1/generate", {**body, "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["finish_reason"] == plain["finish_reason"] and final["usage"] == plain["usage"]
    assert "".join(e["text"] for e in events[:-2]) == final["text"] == plain["text"]


def test_openai_client_works_unchanged(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    msgs = [{"role": "user", "content": "Say hello"}]
    out = client.chat.completions.create(
        model="mage",
        messages=msgs,
        max_tokens=6,
        extra_body={"preference": [0.2, 0.8], "mage": {"method": "bs"}},
    )
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model="mage",
            messages=msgs,
            max_tokens=6,
            stream=True,
            extra_body={"preference": [0.2, 0.8], "mage": {"method": "bs"}},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    comp = client.completions.create(
        model="mage", prompt=["Hi", "Why?"], max_tokens=4, extra_body={"preference": [1.0, 0.0]}
    )
    assert len(comp.choices) == 2 and [c.index for c in comp.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mage", messages=msgs, extra_body={"preference": [0.5, 0.6]})
    assert "sums to" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_openai_models_usage_and_model_names(server):
    """models.list / retrieve name the served model ("mage", created = the bundle's write time); a request for
    another model is a 404 model_not_found; streams carry usage only with stream_options.include_usage, in a
    last chunk with no choices (OpenAI's rule)."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["mage"] and models[0].created > 1_700_000_000
    assert client.models.retrieve("mage").id == "mage"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    msgs = [{"role": "user", "content": "Say hello"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    plain = list(client.chat.completions.create(model="mage", messages=msgs, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason is not None
    with_usage = list(
        client.chat.completions.create(
            model="mage", messages=msgs, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens <= 4
    assert all(c.usage is None for c in with_usage[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_usage[:-1]) == "".join(
        c.choices[0].delta.content or "" for c in plain
    )
    comp = list(
        client.completions.create(
            model="mage", prompt="Hi", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert comp[-1].choices == [] and comp[-1].usage.total_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mage", messages=msgs, n=2)
    assert e.value.code == "unsupported_parameter" and e.value.param == "n"


def test_reward_model_methods_through_every_api(server, bundle):
    """genarm / genarm-m / parm (the tiny bundle carries two ARMs and a PBLoRA) are listed, decode through
    /v1/generate exactly as the in-process engine does, answer the OpenAI API (method in ``mage``) and grids;
    a PARM request whose preference has the wrong length is a 400 naming ``preference``."""
    import openai

    from mage_ray.bundle import load_bundle
    from mage_ray.decode import Engine, Request

    info = requests.get(server.url + "/v1/objectives", headers=server.auth, timeout=30).json()
    assert {"genarm", "genarm-m", "parm"} <= set(info["methods"])
    engine = Engine(load_bundle(bundle))
    for method in ("genarm", "genarm-m", "parm"):
        body = {"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "max_tokens": 6, "gamma": 1.5}
        got = _post(server, "/v1/generate", {**body, "method": method})
        assert got.status_code == 200, got.text
        want = engine.generate(
            [Request(body["prompt"], [0.3, 0.7], method=method, gamma=1.5, max_new_tokens=6)]
        )
        assert got.json()["text"] == want[0].text and got.json()["method"] == method
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    out = client.chat.completions.create(
        model="mage",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=5,
        extra_body={"preference": [0.8, 0.2], "mage": {"method": "parm", "gamma": 0.5}},
    )
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    grid = {"prompts": ["Hi"], "preferences": {"n_objectives": 2, "step": 0.5}, "max_tokens": 3}
    r = _post(server, "/v1/grid", {**grid, "method": "genarm"})
    assert r.status_code == 200 and len(r.json()["points"]) == 3
    r = _post(server, "/v1/generate", {"prompt": "Hi", "preference": [0.2, 0.3, 0.5], "method": "parm"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preference"


def test_client_hanging_up_mid_body_leaves_no_traceback(server):
    """A client that sends half its body and closes: no replica logs a traceback, and the app keeps serving.

    Serve cancels such a request with ``ray.cancel``, which also cancels the ingress replica's call that fetches
    the body from the proxy; ``receive()`` then raises ``TaskCancelledError`` in ``read_body`` (or, when the
    proxy had already forgotten the request, Starlette raises ``ClientDisconnect``). Let out of the route, that
    error could finish the replica's call future just before Serve cancelled it, and Serve dropped it unread:
    "Future exception was never retrieved ... TaskCancelledError". It is a race: without the fix, 2 and 4 traces
    in two runs of 20 hang-ups (so about 0.15 per hang-up), and 2 of 3 runs of 8 hang-ups failed; with 16
    hang-ups a regression goes unseen in about 1 run in 13 (0.85 ** 16). test_serve_faults.py::test_read_body_turns_a_client_hang_up_into_a_400 checks the fix
    itself without the race.
    """
    import ray

    host, port = server.url.removeprefix("http://").split(":")
    for path in ("/v1/generate", "/v1/chat/completions") * 8:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 500\r\n\r\n".encode()
                + b'{"prompt": "Hel'
            )
            time.sleep(0.5)  # the request reaches the replica, which waits for the rest of the body
    time.sleep(5)  # Python reports an unretrieved future's exception when the future is collected
    ok = _post(server, "/v1/generate", {"prompt": "Hello", "preference": [0.5, 0.5], "max_tokens": 2})
    assert ok.status_code == 200
    text = ""
    for root, _, files in os.walk(ray._private.worker._global_node.get_logs_dir_path()):
        for name in files:
            if name.endswith((".log", ".err", ".out")):
                with open(os.path.join(root, name), errors="replace") as f:
                    text += f.read()
    for needle in ("ClientDisconnect", "TaskCancelledError", "never retrieved"):
        i = text.find(needle)
        assert i < 0, f"{needle!r} in the Ray logs:\n{text[max(0, i - 2000) : i + 500]}"


BAD = [
    ({"preference": [0.2, 0.3, 0.5]}, "preference"),
    ({"preference": [-0.2, 1.2]}, "preference[0]"),
    ({"preference": [0.5, 0.6]}, "preference"),
    ({"method": "mage-x"}, "method"),
    ({"gamma": 1e9}, "gamma"),
    ({"gamma": -0.1}, "gamma"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hello " * 2100}, "prompt"),  # > 2048-token context of the tiny bundle
    ({"max_tokens": 5000}, "max_tokens"),
]


@pytest.mark.parametrize("patch, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, patch, field):
    r = _post(server, "/v1/generate", {"prompt": "Hello", "preference": [0.5, 0.5], "max_tokens": 3, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_malformed_and_oversized_bodies(server):
    h = {**server.auth, "Content-Type": "application/json"}
    r = requests.post(server.url + "/v1/generate", data=b'{"prompt": "x", ', headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(
        server.url + "/v1/generate", data=b'{"prompt": "x", "preference": [NaN, 0.5]}', headers=h, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "preference[0]"
    big = b'{"prompt": "' + b"a" * 30000 + b'"}'
    r = requests.post(server.url + "/v1/generate", data=big, headers=h, timeout=30)  # Content-Length: 30013
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = requests.post(
        server.url + "/v1/generate",
        data=(big[i : i + 4096] for i in range(0, len(big), 4096)),
        headers=h,
        timeout=30,
    )  # chunked: no Content-Length, counted as it arrives
    assert r.status_code == 413
    stats = requests.get(server.url + "/v1/stats", headers=server.auth, timeout=30).json()
    ok = _post(server, "/v1/generate", {"prompt": "Hello", "preference": [0.5, 0.5], "max_tokens": 2})
    assert ok.status_code == 200
    after = requests.get(server.url + "/v1/stats", headers=server.auth, timeout=30).json()
    assert after["requests"] == stats["requests"] + 1  # same replica, counters not reset by a restart


def test_grid_endpoint(server):
    """2 prompts x 3 points (step 0.5), scored: per point the mean of the objectives' scores of its texts, the
    degenerate flag of each text and their fraction, and front = pareto_mask of the means. Over the limits (11 points > 5, 4 prompts > 3) -> 400."""
    prompts = ["Hello there", "Tell me a story"]
    r = _post(
        server,
        "/v1/grid",
        {
            "prompts": prompts,
            "preferences": {"n_objectives": 2, "step": 0.5},
            "max_tokens": 5,
            "method": "bs",
            "score": True,
        },
    )
    assert r.status_code == 200, r.text
    g = r.json()
    assert [p["preference"] for p in g["points"]] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    objs = [get_objective("conciseness"), get_objective("readability")]
    means = np.array([score(objs, prompts, p["texts"]).mean(0) for p in g["points"]])
    np.testing.assert_allclose([p["mean_rewards"] for p in g["points"]], means)
    assert g["front"] == list(pareto_mask(means)) and g["usage"]["requests"] == 6
    for p in g["points"]:  # the quality gate's flag of every text, and the flagged fraction of the point
        flags = degenerate_mask(prompts, p["texts"]).tolist()
        assert p["degenerate"] == flags and p["degenerate_fraction"] == pytest.approx(sum(flags) / len(flags))
    r = _post(server, "/v1/grid", {"prompts": prompts, "preferences": [[0.1, 0.9], [0.8, 0.3]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preferences[1]"
    r = _post(server, "/v1/grid", {"prompts": prompts, "preferences": {"n_objectives": 2, "step": 0.1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preferences.step"
    r = _post(server, "/v1/grid", {"prompts": ["a", "b", "c", "d"], "preferences": [[1, 0]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompts"


def test_disconnect_frees_slot_and_other_streams_are_unaffected(server):
    """Streams A (150 tokens) and B (1500 tokens) share a batch; B's client leaves after 2 events while bad
    requests arrive. A finishes all 150 tokens with the text it gets alone; B is cancelled after fewer tokens than
    A has (the engine stopped decoding it mid-batch; measured: 3 tokens); a following request completes."""
    a_body = {
        "prompt": "Tell me about the sea",
        "preference": [0.4, 0.6],
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
    }
    before = requests.get(server.url + "/v1/stats", headers=server.auth, timeout=30).json()
    result = {}

    def stream_a():
        result["a"] = _sse(_post(server, "/v1/generate", a_body, stream=True))

    def stream_b():
        r = _post(
            server,
            "/v1/generate",
            {
                "prompt": "Hello",
                "preference": [0.9, 0.1],
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            },
            stream=True,
        )
        n = 0
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                n += 1
                if n == 2:
                    break
        r.close()  # the client goes away mid-stream
        result["b_events"] = n

    ta, tb = threading.Thread(target=stream_a), threading.Thread(target=stream_b)
    tb.start()
    ta.start()
    tb.join(120)
    for patch, _ in BAD[:4]:
        r = _post(
            server, "/v1/generate", {"prompt": "Hello", "preference": [0.5, 0.5], "max_tokens": 3, **patch}
        )
        assert r.status_code == 400
    ta.join(300)
    final = result["a"][-2]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 150
    assert "".join(e["text"] for e in result["a"][:-2]) == final["text"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = requests.get(server.url + "/v1/stats", headers=server.auth, timeout=30).json()
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.2)
    assert stats["cancelled"] == before["cancelled"] + 1, stats
    b_tokens = stats["tokens"] - before["tokens"] - 150  # B's partial completion
    assert b_tokens < 150, b_tokens  # B stopped while A, its batch mate, was still decoding
    solo = _post(server, "/v1/generate", {**a_body, "stream": False})
    assert solo.json()["text"] == final["text"]


# ----- the API as the ecosystem expects it: typed bodies, OpenAI defaults, bearer auth, Prometheus -----


BODIES = {  # route -> its body model, as /openapi.json must list them
    "/v1/generate": "GenerateBody",
    "/v1/chat/completions": "ChatBody",
    "/v1/completions": "CompletionBody",
    "/v1/grid": "GridBody",
}


def test_openapi_lists_the_request_bodies_and_the_bearer_scheme():
    """The routes take the schema's pydantic models as parameters: the OpenAPI schema has each POST route's body
    (a $ref to its model, whose fields are listed) and the bearer scheme; /docs and /openapi.json are not routes
    of the API it describes."""
    from mage_ray.serve.app import api

    spec = api.openapi()
    for path, model in BODIES.items():
        post = spec["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"
        }
        assert post["security"] == [{"HTTPBearer": []}]
    schemas = spec["components"]["schemas"]
    assert {"prompt", "messages", "preference", "stream", "score"} <= set(
        schemas["GenerateBody"]["properties"]
    )
    assert {"messages", "preference", "mage", "max_tokens"} <= set(schemas["ChatBody"]["properties"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert not {"/docs", "/openapi.json"} & set(spec["paths"])


def test_api_docs_are_off_by_default():
    """serve.api_docs is false unless configured, and then /docs and /openapi.json answer 404."""
    from mage_ray.config import ServeConfig
    from mage_ray.serve.app import MageIngress

    assert ServeConfig().api_docs is False
    ingress = object.__new__(MageIngress.func_or_class)
    ingress.api_docs = False
    with pytest.raises(ApiError) as e:
        ingress._docs()
    assert e.value.status == 404


def test_api_docs_need_the_token(server):
    """With serve.api_docs on (the fixture) and a token configured: /openapi.json and /docs are 401 without the
    token; with it, the schema lists the request bodies and /docs is Swagger UI."""
    for path in ("/openapi.json", "/docs"):
        r = requests.get(server.url + path, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", path
    spec = requests.get(server.url + "/openapi.json", headers=server.auth, timeout=30).json()
    for path, model in BODIES.items():
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"
        }
    r = requests.get(server.url + "/docs", headers=server.auth, timeout=30)
    assert r.status_code == 200 and "swagger" in r.text.lower()


RAW_BAD = [  # (route, raw body, body model): what parse_body says of it, the live app must say too
    ("/v1/generate", b'{"prompt": ', GenerateBody),
    ("/v1/generate", b"", GenerateBody),
    ("/v1/generate", b"[1, 2]", GenerateBody),
    ("/v1/generate", b'"text"', GenerateBody),
    ("/v1/generate", b'{"prompt": "x", "bogus": 1}', GenerateBody),
    (
        "/v1/generate",
        b'{"prompt": "x", "gamma": -1, "top_k": -2, "seed": "a", "stream": 3, "x": 1}',
        GenerateBody,
    ),
    ("/v1/generate", b'{"prompt": "x", "preference": [NaN, 0.5]}', GenerateBody),
    ("/v1/chat/completions", b'{"messages": 5}', ChatBody),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "y"}]}', ChatBody),
    ("/v1/completions", b'{"prompt": ["a", 3]}', CompletionBody),
    ("/v1/grid", b'{"prompts": ["a"], "preferences": {"n_objectives": 1, "step": 0.5}}', GridBody),
]


@pytest.mark.parametrize(
    "route, raw, model", RAW_BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(RAW_BAD)]
)
def test_typed_bodies_keep_the_validation_messages(server, route, raw, model):
    """FastAPI validates the typed body; the 400 carries exactly the message and param parse_body gives."""
    with pytest.raises(ApiError) as want:
        parse_body(raw, model)
    h = {**server.auth, "Content-Type": "application/json"}
    r = requests.post(server.url + route, data=raw, headers=h, timeout=30)
    assert r.status_code == 400, r.text
    got = r.json()["error"]
    assert (got["message"], got["param"]) == (want.value.message, want.value.field)


def test_a_body_is_json_whatever_its_content_type(server):
    """``curl -d`` sends application/x-www-form-urlencoded: the body is still read as JSON, as before."""
    body = json.dumps({"prompt": "Hello", "preference": [0.5, 0.5], "max_tokens": 2})
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        h = {**server.auth, **({"Content-Type": ctype} if ctype else {})}
        r = requests.post(server.url + "/v1/generate", data=body.encode(), headers=h, timeout=60)
        assert r.status_code == 200, (ctype, r.text)


def _former_auth_ok(header: str | None, token: str) -> bool:
    """The check the API made before it used FastAPI's HTTPBearer (kept here as the reference)."""
    import hmac

    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", f"Basic {TOKEN}",
     f"Bearer{TOKEN}", f"Bearer {TOKEN}x", f"Bearer x{TOKEN}", f"Token {TOKEN}", f" Bearer {TOKEN}"],
)  # fmt: skip
def test_httpbearer_accepts_exactly_what_the_former_check_did(header):
    """fastapi.security.HTTPBearer + the token comparison (mage_ray.serve.app.authorized) let through exactly
    the Authorization headers the former hand-written check let through."""
    import asyncio

    from starlette.requests import Request as StarletteRequest

    from mage_ray.serve.app import BEARER, authorized

    app = SimpleNamespace(state=SimpleNamespace(auth_token=TOKEN))
    headers = [] if header is None else [(b"authorization", header.encode())]
    req = StarletteRequest({"type": "http", "method": "GET", "headers": headers, "app": app})

    async def check() -> bool:
        try:
            await authorized(req, await BEARER(req))
        except ApiError as e:
            assert e.status == 401
            return False
        return True

    assert asyncio.run(check()) == _former_auth_ok(header, TOKEN)


def test_openai_routes_follow_openai_defaults():
    """Omitted temperature: sampling at 1; temperature 0 or mage.do_sample false: greedy; omitted max_tokens:
    serve.openai_max_tokens (capped by the server's limit). /v1/generate keeps the config's defaults (greedy)."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    r = to_request(parse_body(json.dumps(chat).encode(), ChatBody), LIMITS, openai_max_tokens=40)
    assert (r.do_sample, r.temperature, r.max_new_tokens) == (True, 1.0, 40)
    r = to_request(parse_body(json.dumps(chat).encode(), ChatBody), LIMITS, openai_max_tokens=500)
    assert r.max_new_tokens == LIMITS.max_tokens_limit
    r = to_request(parse_body(json.dumps({**chat, "temperature": 0}).encode(), ChatBody), LIMITS)
    assert (r.do_sample, r.temperature) == (False, None)
    r = to_request(parse_body(json.dumps({**chat, "mage": {"do_sample": False}}).encode(), ChatBody), LIMITS)
    assert (r.do_sample, r.temperature) == (False, None)
    r = to_request(
        parse_body(json.dumps({**chat, "temperature": 0.3, "max_tokens": 9}).encode(), ChatBody), LIMITS
    )
    assert (r.do_sample, r.temperature, r.max_new_tokens) == (True, 0.3, 9)
    r = to_request(parse_body(b'{"prompt": "hi"}', CompletionBody), LIMITS, openai_max_tokens=30)
    assert (r.do_sample, r.temperature, r.max_new_tokens) == (True, 1.0, 30)
    r = to_request(parse_body(b'{"prompt": "hi"}', GenerateBody), LIMITS)
    assert (r.do_sample, r.temperature, r.max_new_tokens) == (None, None, None)  # the config's: greedy, 48


def _scrape(url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=30).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples, name: str, **labels) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


WATCHED = [  # (metric, route, extra labels) the stream and the 401 below must move
    ("ray_mage_requests_total", "/v1/generate", {"status": "200"}),
    ("ray_mage_requests_total", "/v1/stats", {"status": "401"}),
    ("ray_mage_tokens_total", "/v1/generate", {"kind": "completion"}),
    ("ray_mage_time_to_first_token_seconds_count", "/v1/generate", {}),
    ("ray_mage_request_seconds_count", "/v1/generate", {}),
    ("ray_mage_request_batch_rows_count", "/v1/generate", {}),
]


def _watched(url: str) -> list[float]:
    samples = _scrape(url)
    return [_value(samples, name, route=route, **labels) for name, route, labels in WATCHED]


def test_prometheus_metrics_move_during_a_request(server):
    """Ray's metrics endpoint (the node's metrics export port) carries the app's metrics: while a long stream
    decodes, the engine's running-requests gauge is at least 1; once it ends, the request counter of its route and
    status grew by one, the completion tokens by exactly its tokens, and the time-to-first-token, latency and
    rows histograms by one observation each. A 401 is counted under its status."""
    before, previous = None, _watched(server.metrics)  # settled: earlier tests' requests all reported
    while before != previous:
        time.sleep(1.0)
        before, previous = _watched(server.metrics), before
    done = {}

    def stream():
        body = {
            "prompt": "Tell me",
            "preference": [0.5, 0.5],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        done["events"] = _sse(_post(server, "/v1/generate", body, stream=True))

    t = threading.Thread(target=stream)
    t.start()
    running_seen = False
    while t.is_alive() and not running_seen:
        running_seen = _value(_scrape(server.metrics), "ray_mage_engine_running_requests") >= 1
        time.sleep(0.2)
    t.join(300)
    assert running_seen, "the running-requests gauge never showed the stream while it decoded"
    tokens = done["events"][-2]["usage"]["completion_tokens"]
    assert requests.get(server.url + "/v1/stats", timeout=30).status_code == 401
    want = [1, 1, tokens, 1, 1, 1]
    deadline = time.monotonic() + 60
    while (got := [a - b for a, b in zip(_watched(server.metrics), before)]) != want:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
