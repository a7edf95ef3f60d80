"""The decode engine under sustained load: a batch that never empties keeps a bounded KV cache, reads its step's
results back once per step, and multiplies only by the adapters its rows use.

Outputs are checked token for token against each request run alone (tests/test_decode.py checks those against the
slow reference decoder).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_decode import CFG, PROMPTS, _parts, make_artifacts

from mage_ray.decode import Engine, Request
from mage_ray.decode import engine as engine_module

PROMPTS_LOAD = PROMPTS + [
    "A",
    "Explain, in one long and winding sentence, how rivers carve canyons over time and why.",
]
METHODS = ["bs", "mage-e-m", "mage-i-m", "bs"]
"""Methods of the read-back test (1, 2 and 3 rows at alpha = 0.3)."""


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("load_art"))


@pytest.fixture(scope="module")
def engine(art):
    return Engine(_parts(art), CFG)


def _request(rng: random.Random, k: int) -> Request:
    mu = round(rng.random(), 3)
    return Request(
        PROMPTS_LOAD[k % len(PROMPTS_LOAD)],
        [mu, round(1 - mu, 3)],
        method=("bs", "mage-e-m")[k % 2],
        max_new_tokens=rng.randint(8, 32),
        ignore_eos=True,
    )


@pytest.fixture
def one_thread():
    """One torch thread for a test of hundreds of tiny steps: on a shared 2-core machine two OpenMP threads spend
    most of such a step spin-waiting (measured at load averages of 10-30: this test took 3.8 s of CPU with one
    thread, 25-30 s with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_kv_cache_stays_bounded_while_the_batch_never_empties(engine, monkeypatch, one_thread):
    """6 requests of 8-32 new tokens stay live for 300+ decode steps (every finished one is replaced at once
    through ``stream(admit=...)``, so the batch never empties): the KV cache's width at every decode step is at
    most the longest live prompt + generated tokens (+ 1 slack column). Without trimming it grows by one column
    per step (the width of a batch whose requests all started at step 0) and reaches the number of steps."""
    rng = random.Random(0)
    live: dict[int, list[int]] = {}  # request index -> [prompt tokens, tokens received]
    reqs: list[Request] = []

    def new_request() -> Request:
        r = _request(rng, len(reqs))
        live[len(reqs)] = [len(engine.prepare(r).prompt_ids), 0]
        reqs.append(r)
        return r

    first = [new_request() for _ in range(6)]
    widths: list[tuple[int, int, int]] = []  # (step, cache width at the forward, bound)
    orig = engine._forward

    def spy(ids, mask, *a, **k):
        if ids.shape[1] == 1:  # a decode step: the cache holds mask.shape[1] columns after it
            bound = max(p + n for p, n in live.values())
            widths.append((len(widths), mask.shape[1], bound))
        return orig(ids, mask, *a, **k)

    monkeypatch.setattr(engine, "_forward", spy)
    finished: dict[int, list[int]] = {}
    pending_replacements = 0

    def admit():
        nonlocal pending_replacements
        if len(widths) >= 300:
            return []
        out = [new_request() for _ in range(pending_replacements)]
        pending_replacements = 0
        return out

    for events in engine.stream(first, admit=admit):
        for ev in events:
            live[ev.index][1] += 1
            if ev.finished:
                assert ev.finish_reason == "length", ev.completion.error
                finished[ev.index] = ev.completion.token_ids
                del live[ev.index]
                pending_replacements += 1
    monkeypatch.undo()

    assert len(widths) >= 300 and len(finished) == len(reqs) > 30
    worst = max(w - b for _, w, b in widths)
    print(f"{len(widths)} steps, {len(reqs)} requests; widths {widths[::50]}; worst width - bound = {worst}")
    assert worst <= 1, [x for x in widths if x[1] - x[2] > 1][:5]
    assert max(w for _, w, _ in widths) < 100  # the live requests need < 100 columns; untrimmed: ~300
    for i in (6, 7, 8, len(reqs) - 1):  # requests that joined a running batch: as they run alone
        (alone,) = engine.generate([reqs[i]])
        assert finished[i] == alone.token_ids, i


def _reads_per_step(engine, monkeypatch, reqs: list[Request]) -> tuple[list[int], int, int]:
    """(tensor -> Python reads in each decode step, decode steps, to_host calls) of one engine.generate(reqs).

    A read is a call of Tensor.item / tolist / __float__ / __int__ / __bool__ (each one a device synchronisation
    on a GPU); steps are delimited by the decode forwards (one new token per row)."""
    reads = [0]
    per_step: list[int] = []
    host_calls = [0]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads[0] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    orig_host = engine_module.to_host

    def host(*ts):
        host_calls[0] += 1
        return orig_host(*ts)

    monkeypatch.setattr(engine_module, "to_host", host)
    orig_forward = engine._forward

    def spy(ids, *a, **k):
        if ids.shape[1] == 1:
            per_step.append(reads[0])
            reads[0] = 0
        return orig_forward(ids, *a, **k)

    monkeypatch.setattr(engine, "_forward", spy)
    engine.generate(reqs)
    monkeypatch.undo()
    return (
        per_step[1:],
        len(per_step),
        host_calls[0],
    )  # per_step[i]: reads between decode forwards i and i + 1


def test_one_read_back_per_step_whatever_the_number_of_requests(engine, monkeypatch, one_thread):
    """Greedy decoding reads its step's results back once: the reads per decode step are the same for 1 request
    and for 8 (the old loop read log pi and V of every request's chosen token one by one: 2 more per request), and
    ``to_host`` runs once per step (prefill included) also with sampled and beam requests in the batch."""

    def reqs(n: int, **kw) -> list[Request]:
        return [
            Request(
                PROMPTS[i % 3],
                [i / 8, 1 - i / 8],
                method=METHODS[(i + 1) % 4],
                max_new_tokens=10,
                ignore_eos=True,
                **kw,
            )
            for i in range(n)
        ]

    one, _, _ = _reads_per_step(engine, monkeypatch, reqs(1))
    eight, _, _ = _reads_per_step(engine, monkeypatch, reqs(8))
    print(f"reads per decode step: 1 request {one}, 8 requests {eight}")
    assert one[1:-1] == eight[1:-1] and len(set(one[1:-1])) == 1  # steady state: no composition change
    mixed = (
        reqs(3)
        + reqs(2, do_sample=True, seed=1, top_p=0.9)
        + [
            Request(
                PROMPTS[0],
                [0.5, 0.5],
                method="bs",
                max_new_tokens=10,
                ignore_eos=True,
                beam_width=2,
                lookahead=3,
            )
        ]
    )
    _, steps, calls = _reads_per_step(engine, monkeypatch, mixed)
    assert calls == steps + 1  # one per decode step and one for the prefill


def test_rows_multiply_only_by_the_adapters_they_use(art, engine):
    """A batch whose rows use only the 2 backbones of an engine holding 9 adapters runs each adapted module with
    the backbones' 8 LoRA columns (not all 9 adapters' columns), skips the modules only unused adapters target, and
    gives the logits of an engine holding just those 2 backbones (atol 1e-5: the same sums, other matmul shapes)."""
    small = Engine(_parts(art, rs=False, values=False, extras=False), CFG)
    mixed, mixed_small = engine.mixed, small.mixed
    assert len(mixed.adapters) == 9 and len(mixed_small.adapters) == 2
    ids = torch.tensor([engine.prepare(Request(PROMPTS[1], [0.3, 0.7])).prompt_ids] * 2)
    c_small = torch.tensor([[2.5, -1.5], [-0.5, 1.5]])
    c = torch.zeros(2, 9)
    c[:, list(engine.layout.backbones)] = c_small
    with torch.inference_mode():
        with mixed_small.coefficients(c_small):
            want = small.model(ids).logits
        with mixed.coefficients(c):
            got = engine.model(ids).logits
            q = engine.model.model.layers[
                0
            ].self_attn.q_proj  # targeted by backbones, rs, values, morlhf, ric
            gate = engine.model.model.layers[0].mlp.gate_proj  # targeted by the value adapters only
            assert q.lora_A_cat.shape[0] == 4 * 9 and q._used_weights()[0].shape == (8, q.in_features)
            assert mixed._state.rows[gate.layout] is None
        with mixed.coefficients(
            torch.eye(9)[:2] + torch.eye(9)[[5, 6]]
        ):  # another set of adapters: re-gathered
            assert q._used_weights()[0].shape[0] == 16
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - small.model(ids).logits).abs().max() > 1.0  # the backbones do change the logits
