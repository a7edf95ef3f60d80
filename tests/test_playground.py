"""The preference playground: its endpoints (``/``, ``/playground``, ``/v1/front``, ``score`` on /v1/generate) and
the page itself in headless Chromium.

The live tests serve a copy of the tiny random bundle with an evaluation report beside it (``<run>/bundle`` and
``<run>/report``, as ``jobs/pipeline.py`` lays them out), written by the real report writer from hand-picked
scores, so the front's expected flags are known: for mage-e-m the rewards (0.1, 0.9), (0.5, 0.5), (0.2, 0.2) at
preferences (0, 1), (0.5, 0.5), (1, 0) put the first two on the front and the third off it (dominated by the
second); for bs (0, 0.8), (0.4, 0.4), (0.7, 0.1) are all on it.

The browser tests drive the system's chromium through Playwright (``executable_path``: Playwright never downloads
a browser here) and skip, saying so, where no chromium is installed (``make browser`` installs it as root).
"""

import json
import math
import os
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from bundle_factory import cached_tiny_bundle

from mage_ray.evaluate import summarise
from mage_ray.report import write_report
from mage_ray.serve.playground import REPORT_PLACES, front_json
from mage_ray.serve.schema import ApiError, GenerateBody, parse_body
from mage_ray.soup import preference_grid
from mage_ray.tasks.objectives import get_objective, score

TOKEN_ENV, TOKEN = "MAGE_PLAYGROUND_TEST_TOKEN", "play-token-123"
OBJECTIVES = ["conciseness", "readability"]
REWARDS = {  # method -> mean reward (one prompt) at preferences (0, 1), (0.5, 0.5), (1, 0)
    "mage-e-m": [[0.1, 0.9], [0.5, 0.5], [0.2, 0.2]],
    "bs": [[0.0, 0.8], [0.4, 0.4], [0.7, 0.1]],
}
FRONT = {"mage-e-m": [True, True, False], "bs": [True, True, True]}


def write_fake_report(out_dir, objectives=OBJECTIVES, rewards=REWARDS) -> None:
    """An evaluation report from the real writers (evaluate.summarise + report.write_report): one prompt, every
    method at the step-0.5 grid, its scores ``rewards``."""
    grid = preference_grid(len(objectives), 0.5)
    methods = list(rewards)
    rows = [
        {"method": m, "pref_index": p, "prompt_index": 0, "text": f"{m} {p}", "error": None}
        for m in methods
        for p in range(len(grid))
    ]
    scores = np.array([s for m in methods for s in rewards[m]], dtype=np.float64)
    ref = [-0.1] * len(objectives)
    results = summarise(rows, scores, grid, methods, ref)
    write_report(out_dir, rows, scores, ["a prompt"], grid, results, objectives, ref)


# ----- no server -----


def test_front_json_reads_the_report_beside_the_bundle(tmp_path):
    write_fake_report(tmp_path / "report")
    (tmp_path / "bundle").mkdir()
    f = front_json(tmp_path / "bundle", OBJECTIVES)
    assert f["available"] and f["source"] == "../report/metrics.json" and f["objectives"] == OBJECTIVES
    assert f["preferences"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    for m, R in REWARDS.items():
        np.testing.assert_allclose(f["methods"][m]["rewards"], R)
        assert f["methods"][m]["front"] == FRONT[m]
    # hv of mage-e-m over ref (-0.1, -0.1): the union of the boxes of (0.1, 0.9) and (0.5, 0.5)
    # = 0.2 * 1.0 + 0.6 * 0.6 - 0.2 * 0.6 = 0.44
    assert f["methods"]["mage-e-m"]["hv"] == pytest.approx(0.44)
    json.dumps(f, allow_nan=False)  # what Starlette sends: no NaN anywhere


def test_front_json_without_a_usable_report(tmp_path):
    """No report -> unavailable, naming where it looked; a report on other objectives -> unavailable, naming both;
    a NaN mean (every response at a point failed) -> None, and that point is off the front."""
    bundle = tmp_path / "run" / "bundle"
    bundle.mkdir(parents=True)
    f = front_json(bundle, OBJECTIVES)
    assert not f["available"] and all(p in f["reason"] for p in REPORT_PLACES)
    write_fake_report(tmp_path / "run" / "eval")  # jobs/evaluate.py's default place
    f = front_json(bundle, ["relevance", "readability"])
    assert not f["available"] and "['conciseness', 'readability']" in f["reason"]
    assert "['relevance', 'readability']" in f["reason"]
    path = tmp_path / "run" / "eval" / "metrics.json"
    report = json.loads(path.read_text())
    report["methods"]["bs"]["rewards"][1] = [math.nan, math.nan]
    path.write_text(json.dumps(report))
    f = front_json(bundle, OBJECTIVES)
    assert f["available"] and f["source"] == "../eval/metrics.json"
    assert f["methods"]["bs"]["rewards"][1] == [None, None] and f["methods"]["bs"]["front"] == [
        True,
        False,
        True,
    ]
    json.dumps(f, allow_nan=False)
    path.write_text("{not json")
    f = front_json(bundle, OBJECTIVES)
    assert not f["available"] and f["reason"].startswith(
        "../eval/metrics.json: not a readable evaluation report"
    )


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_schema_score_must_be_a_bool(value):
    with pytest.raises(ApiError) as e:
        parse_body(json.dumps({"prompt": "x", "score": value}).encode(), GenerateBody)
    assert e.value.status == 400 and e.value.field == "score", e.value.message
    assert parse_body(b'{"prompt": "x", "score": true}', GenerateBody).score is True


# ----- the live app -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo_root):
    """Serve on localhost: a copy of the tiny bundle at <run>/bundle, its fake report at <run>/report, auth on."""
    import ray
    from ray import serve

    from mage_ray.serve.app import build_app

    run = tmp_path_factory.mktemp("playground_run")
    shutil.copytree(cached_tiny_bundle(tmp_path_factory), run / "bundle")
    write_fake_report(run / "report")
    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: replicas inherit the environment
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = [f"serve.auth_token_env={TOKEN_ENV}", "serve.batch_wait_timeout_s=0.05"]
        app = build_app(
            {
                "bundle": str(run / "bundle"),
                "config": str(repo_root / "configs" / "smoke.yaml"),
                "overrides": overrides,
            }
        )
        serve.run(app, name="mage", route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", auth={"Authorization": f"Bearer {TOKEN}"})
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _post(server, body, **kw):
    return requests.post(server.url + "/v1/generate", json=body, headers=server.auth, timeout=120, **kw)


def _sse(resp) -> list:
    return [
        line[6:].decode() if line == b"data: [DONE]" else json.loads(line[6:])
        for line in resp.iter_lines()
        if line.startswith(b"data: ")
    ]


def test_page_needs_no_token_but_the_front_does(server):
    for path in ("/", "/playground"):
        r = requests.get(server.url + path, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert 'src="playground/app.js"' in r.text and 'href="playground/app.css"' in r.text
    r = requests.get(server.url + "/playground/app.js", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "v1/generate" in r.text
    assert (
        requests.get(server.url + "/playground/app.css", timeout=30)
        .headers["content-type"]
        .startswith("text/css")
    )
    r = requests.get(server.url + "/playground/secrets.txt", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    r = requests.get(server.url + "/v1/front", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"


def test_front_endpoint_serves_the_bundle_report(server):
    f = requests.get(server.url + "/v1/front", headers=server.auth, timeout=30).json()
    assert f["available"] and f["source"] == "../report/metrics.json" and f["objectives"] == OBJECTIVES
    assert {m: e["front"] for m, e in f["methods"].items()} == FRONT
    np.testing.assert_allclose(f["methods"]["bs"]["rewards"], REWARDS["bs"])


def test_generate_scores_the_completion(server):
    """score: true adds the objectives' scores of the text (the same numbers mage_ray.tasks.objectives.score
    gives that prompt and text), plain and in the stream's final event; without it there are none."""
    body = {"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "max_tokens": 8, "score": True}
    plain = _post(server, body).json()
    objs = [get_objective(o) for o in OBJECTIVES]
    expected = score(objs, [body["prompt"]], [plain["text"]])[0]
    assert plain["scores"] == pytest.approx(expected.tolist())
    events = _sse(_post(server, {**body, "stream": True}, stream=True))
    assert events[-1] == "[DONE]" and events[-2]["text"] == plain["text"]
    assert events[-2]["scores"] == pytest.approx(plain["scores"]) and events[-2]["error"] is None
    assert "scores" not in _post(server, {**body, "score": False}).json()
    r = _post(server, {**body, "score": "maybe", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "score", r.text


# ----- the page in a real browser -----


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "no chromium on PATH: install it with `make browser` (as root) or `apt-get install chromium`"
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # decoding on a busy 2-core machine; the default is 5 s
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(60_000)
    yield pg
    pg.close()


def _open_with_token(page, server):
    """Open the page with the token already in the tab's sessionStorage, once its sliders are built."""
    from playwright.sync_api import expect

    page.add_init_script(f"sessionStorage.setItem('mage_ray.token', {json.dumps(TOKEN)})")
    page.goto(server.url + "/playground")
    expect(page.locator("#pref-a .slider")).to_have_count(len(OBJECTIVES))
    expect(page.locator("#generate")).to_be_enabled()


WATCH_TEXT = """(selector) => {
  window.__texts = [];  // every text the element shows, in order (the page replaces its text node per chunk)
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) window.__texts.push(n.textContent);
  }).observe(document.querySelector(selector), {childList: true});
}"""


def _generations(page) -> list:
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/generate") else None)
    return sent


def test_page_streams_a_completion_at_the_slider_preference(server, page):
    """Without a token the page shows the server's 401 (naming Authorization); with it: 2 sliders named after the
    objectives; 10 ArrowRight presses on the first take (0.5, 0.5) to (0.6, 0.4); Generate sends that preference
    with stream=true; the text grows on the page in >= 2 steps (each a prefix of the next, seen by a
    MutationObserver) into the completion the API gives the same request unstreamed, with its scores in the
    table; the front rings the report's preference nearest (0.6, 0.4), i.e. (0.5, 0.5)."""
    from playwright.sync_api import expect

    sent = _generations(page)
    page.goto(server.url + "/playground")
    expect(page.locator("#error")).to_contain_text("server error 401 (field Authorization)")
    page.fill("#token", TOKEN)
    page.click("text=Use token")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#pref-a .slider label")).to_have_text(OBJECTIVES)
    expect(page.locator("#pref-a output")).to_have_text(["0.50", "0.50"])
    page.focus("#mu-a-0")
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    expect(page.locator("#pref-a output")).to_have_text(["0.60", "0.40"])
    page.fill("#prompt", "Tell me about the sea")
    page.fill("#max-tokens", "12")
    page.evaluate(WATCH_TEXT, "#out-a .text")
    page.click("#generate")
    expect(page.locator("#out-a")).to_have_attribute("data-state", "done")

    assert len(sent) == 1
    body = json.loads(sent[0].post_data)
    assert body["preference"] == pytest.approx([0.6, 0.4], abs=1e-9) and body["stream"] is True
    assert body["method"] == "mage-e-m" and body["max_tokens"] == 12 and body["score"] is True
    assert sent[0].headers["authorization"] == f"Bearer {TOKEN}"
    plain = _post(server, {**body, "stream": False}).json()
    text = page.locator("#out-a .text").text_content()
    assert text and text == plain["text"]
    steps = [t for t in page.evaluate("window.__texts") if t]  # what the page showed, in order
    assert len(steps) >= 2 and steps[-1] == text, steps
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(steps, steps[1:])), steps
    expect(page.locator("#out-a .scores td")).to_have_text([f"{s:.3f}" for s in plain["scores"]])
    expect(page.locator("#out-a .meta")).to_contain_text(f"{plain['usage']['completion_tokens']} tokens")
    assert page.get_attribute("#front-plot circle.current.a", "data-preference") == "0.5,0.5"
    expect(page.locator("#front-plot rect.scored.a")).to_have_count(1)  # the text's own scores


def test_page_draws_the_front_of_the_selected_method(server, page, tmp_path):
    """mage-e-m (the default): 3 points, 2 filled (on the front), bs's 3 grey; switching to bs fills all 3."""
    from playwright.sync_api import expect

    _open_with_token(page, server)
    expect(page.locator("#front-plot")).to_be_visible()
    expect(page.locator("#front-plot circle.point")).to_have_count(3)
    expect(page.locator("#front-plot circle.on-front")).to_have_count(2)
    expect(page.locator("#front-plot circle.other")).to_have_count(3)
    expect(page.locator("#front-note")).to_contain_text("mage-e-m: 3 preferences")
    page.select_option("#method", "bs")
    expect(page.locator("#front-plot circle.on-front")).to_have_count(3)
    page.route(
        "**/v1/front",
        lambda route: route.fulfill(json=front_json(tmp_path, OBJECTIVES)),
    )  # what a bundle without a report gets
    page.reload()
    expect(page.locator("#front-note")).to_contain_text("No front for this bundle: no evaluation report")
    expect(page.locator("#front-plot")).to_be_hidden()


def test_page_shows_server_errors(server, page):
    """A gamma over the schema's bound: the 400 message, naming the field, appears on the page."""
    from playwright.sync_api import expect

    _open_with_token(page, server)
    page.fill("#gamma", "5000")
    page.click("#generate")
    expect(page.locator("#out-a")).to_have_attribute("data-state", "error")
    expect(page.locator("#error")).to_contain_text("server error 400 (field gamma)")
    expect(page.locator("#error")).to_contain_text("less than or equal to 1000")
    page.fill("#gamma", "1")
    page.fill("#prompt", "   ")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("(field prompt): prompt is empty")


def test_compare_mode_streams_two_preferences(server, page):
    """Compare on, B's second slider to its maximum (End key): B = (0, 1). One Generate sends two streamed
    requests, A at (0.5, 0.5) and B at (0, 1); each panel shows its own completion."""
    from playwright.sync_api import expect

    sent = _generations(page)
    _open_with_token(page, server)
    page.check("#compare")
    expect(page.locator("#out-b")).to_be_visible()
    page.focus("#mu-b-1")
    page.keyboard.press("End")
    expect(page.locator("#pref-b output")).to_have_text(["0.00", "1.00"])
    page.fill("#max-tokens", "6")
    page.click("#generate")
    expect(page.locator("#out-a")).to_have_attribute("data-state", "done")
    expect(page.locator("#out-b")).to_have_attribute("data-state", "done")
    bodies = sorted((json.loads(r.post_data) for r in sent), key=lambda b: b["preference"])
    assert [b["preference"] for b in bodies] == [pytest.approx([0.0, 1.0]), pytest.approx([0.5, 0.5])]
    for which, b in zip("ba", bodies):
        want = _post(server, {**b, "stream": False}).json()["text"]
        assert page.locator(f"#out-{which} .text").text_content() == want
    assert page.get_attribute("#front-plot circle.current.b", "data-preference") == "0,1"
