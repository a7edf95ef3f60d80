"""Serve survives faults: the engine replica is killed (SIGKILL) while streams are open.

The live test runs ``serve.run(build_app(...))`` on a fresh local Ray with the tiny random bundle, opens three
long requests (a ``/v1/generate`` stream, an OpenAI chat stream through the ``openai`` client, a plain
``/v1/generate``), kills the process of the engine deployment's replica and checks that each one ends promptly
and cleanly: the streams with an error event and ``[DONE]`` (not a truncated body, not a hang), the plain request
with 503 ``unavailable``. Then it polls until a new request succeeds on the replica Serve started instead and
prints the recovery time (``pytest -rP`` shows it; docs/benchmarks.md records it).
"""

import json
import os
import pickle
import signal
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from bundle_factory import cached_tiny_bundle

from mage_ray.decode import TokenEvent
from mage_ray.serve.schema import ApiError
from mage_ray.serve.ticket import Ticket, error_event

STREAM_END_S = 30.0
"""An open stream must end (with its error event) this soon after the engine replica is killed."""
RECOVERY_S = 120.0
"""A new request must succeed this soon after the kill (Serve starts a replica and loads the bundle)."""


# ----- the pieces that cross the process boundary (no Ray) -----


def test_api_error_survives_pickling():
    """The engine deployment raises ApiError and the ingress renders it: every field must cross processes."""
    err = pickle.loads(pickle.dumps(ApiError(404, "no such model", "model", "invalid_request_error", "nf")))
    assert (err.status, err.message, err.field, err.type, err.code) == (
        404,
        "no such model",
        "model",
        "invalid_request_error",
        "nf",
    )


def test_ticket_next_batch_takes_what_is_queued_up_to_the_final_event():
    """Three deltas and the final event queued, then one more event: next_batch returns the four (it stops at the
    finishing one), and the late event stays queued."""
    import asyncio

    async def run():
        t = Ticket(request=None, interactive=True)
        for d in "abc":
            t.queue.put_nowait(TokenEvent(0, d))
        t.queue.put_nowait(error_event(0, "x"))
        t.queue.put_nowait(TokenEvent(0, "late"))
        return await t.next_batch(), t.queue.qsize()

    batch, left = asyncio.run(run())
    assert [e.delta for e in batch] == ["a", "b", "c", ""] and batch[-1].finished and left == 1


@pytest.mark.parametrize("hang_up", ["ClientDisconnect", "TaskCancelledError"])
def test_a_client_hang_up_mid_body_is_a_400_not_an_exception(hang_up):
    """Half a body, then the client is gone, as Serve's ``receive()`` reports it: an ``http.disconnect`` message
    (Starlette raises ClientDisconnect) or a raised ``TaskCancelledError`` (Serve cancelled the request and with it
    the call that fetches the body). Through the app's body-limit middleware and a route with a pydantic body,
    FastAPI answers 400 and no exception leaves the app for Serve to drop unread
    (test_serve.py::test_client_hanging_up_mid_body_leaves_no_traceback)."""
    import asyncio

    from fastapi import FastAPI
    from ray.exceptions import TaskCancelledError

    from mage_ray.serve.limits import BodyLimit
    from mage_ray.serve.schema import GenerateBody

    app = FastAPI()
    app.add_middleware(BodyLimit)
    app.state.max_body_bytes = 1000

    @app.post("/v1/generate")
    async def generate(body: GenerateBody):  # pragma: no cover  (never reached: the body never completes)
        return {}

    msgs = [{"type": "http.request", "body": b'{"prompt": "Hel', "more_body": True}]

    async def receive():
        if msgs:
            return msgs.pop(0)
        if hang_up == "TaskCancelledError":
            raise TaskCancelledError()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/generate",
        "raw_path": b"/v1/generate",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "headers": [(b"content-length", b"500")],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400


# ----- the live app -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo_root):
    import ray
    from ray import serve

    from mage_ray.serve.app import build_app

    bundle = cached_tiny_bundle(tmp_path_factory)
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = ["decode.max_tokens_limit=1600", "serve.batch_wait_timeout_s=0.05"]
        smoke = str(repo_root / "configs" / "smoke.yaml")
        serve.run(
            build_app({"bundle": str(bundle), "config": smoke, "overrides": overrides}),
            name="mage",
            route_prefix="/",
        )
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


LONG = {"prompt": "Tell me about the sea", "max_tokens": 1500, "ignore_eos": True}


def _engine_pid(server) -> int:
    """The engine replica's process (``pid`` of /v1/stats), checked to be this app's engine before anyone kills
    it."""
    import psutil

    pid = requests.get(server.url + "/v1/stats", timeout=60).json()["pid"]
    cmd = " ".join(psutil.Process(pid).cmdline())
    assert "ServeReplica:mage:MageEngine" in cmd, cmd
    return pid


@pytest.mark.slow
def test_engine_replica_killed_mid_stream(server):
    import openai

    out: dict = {}
    streaming = threading.Barrier(3)  # the two streams have their first tokens, and the test thread

    def generate_stream():
        events = []
        try:
            r = requests.post(
                server.url + "/v1/generate", json={**LONG, "stream": True}, stream=True, timeout=60
            )
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events.append(line[6:].decode())
                    if len(events) == 3:
                        streaming.wait(60)
            out["generate"] = events
        except Exception as e:  # noqa: BLE001  (a truncated body lands here: the test reports it)
            out["generate"] = e
        out["generate_end"] = time.monotonic()

    def chat_stream():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        chunks = 0
        try:
            for _ in client.chat.completions.create(
                model="mage",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=1500,
                stream=True,
                extra_body={"mage": {"ignore_eos": True}},
            ):
                chunks += 1
                if chunks == 3:
                    streaming.wait(60)
            out["chat"] = "ended without an error"
        except Exception as e:  # noqa: BLE001
            out["chat"] = e
        out["chat_end"] = time.monotonic()

    def plain():
        out["plain"] = requests.post(server.url + "/v1/generate", json=LONG, timeout=60)

    pid = _engine_pid(server)
    threads = [threading.Thread(target=f) for f in (generate_stream, chat_stream, plain)]
    for t in threads:
        t.start()
    streaming.wait(60)
    deadline = time.monotonic() + 30
    while (
        requests.get(server.url + "/v1/stats", timeout=30).json()["active"] < 3
    ):  # the plain one decodes too
        assert time.monotonic() < deadline, "the three requests never ran together"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(STREAM_END_S + 10)
    assert not any(t.is_alive() for t in threads), f"a request hangs after the kill: {out}"

    events = out["generate"]
    assert isinstance(events, list), f"/v1/generate stream broke instead of ending: {events!r}"
    assert events[-1] == "[DONE]", events[-3:]
    final = json.loads(events[-2])
    assert final["finish_reason"] == "error" and "engine replica is unavailable" in final["error"], final
    assert all("finish_reason" not in json.loads(e) for e in events[:-2])  # token events up to the error
    assert out["generate_end"] - killed < STREAM_END_S

    chat = out["chat"]
    assert type(chat) is openai.APIError, f"chat stream: {chat!r}"  # not APIConnectionError (a cut body)
    assert chat.body["type"] == "unavailable" and "engine replica" in chat.body["message"]
    assert out["chat_end"] - killed < STREAM_END_S

    plain = out["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["type"] == "unavailable", plain.text

    recovered, tries = None, 0
    while recovered is None and time.monotonic() - killed < RECOVERY_S:
        tries += 1
        try:
            r = requests.post(
                server.url + "/v1/generate", json={"prompt": "Hello", "max_tokens": 2}, timeout=RECOVERY_S
            )
        except requests.RequestException:
            r = None
        if r is not None and r.status_code == 200:
            recovered = time.monotonic() - killed
        else:
            time.sleep(0.5)
    assert recovered is not None, f"no request succeeded within {RECOVERY_S:.0f} s of the kill"
    assert _engine_pid(server) != pid
    print(
        f"\nengine replica killed: streams ended {out['generate_end'] - killed:.2f} s (generate) and "
        f"{out['chat_end'] - killed:.2f} s (chat) after the kill; a new request succeeded {recovered:.1f} s "
        f"after it ({tries} tries)"
    )
