"""Model caches that many processes fill at once (:func:`mage_ray.models.cached_dir`).

Processes use the spawn context (fresh interpreters, as Ray workers are) and a barrier, so they ask for the
entry at the same moment; the build functions sleep so that the builds would overlap without a lock.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from mage_ray.models import READY, STALE_TEMP_S, cached_dir

JOIN_S = 120
"""Hang guard for joining a child process (not a timing assertion)."""


def _build(tmp: Path, log: Path, hold_s: float) -> None:
    """Write part1, sleep, write part2; record each run in ``log`` (one line per build)."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    (tmp / "part1").write_text(str(os.getpid()))
    time.sleep(hold_s)
    (tmp / "part2").write_text(str(os.getpid()))


def _fill(target: Path, log: Path, hold_s: float, barrier, out: Path) -> None:
    """Child: wait for the others, get the entry, read it whole, write what it read to ``out``."""
    barrier.wait(timeout=JOIN_S)
    entry = cached_dir(target, functools.partial(_build, log=log, hold_s=hold_s))
    out.write_text((entry / "part1").read_text() + " " + (entry / "part2").read_text())


def _start(target, args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _join_ok(procs: list[mp.Process]) -> None:
    try:
        for p in procs:
            p.join(JOIN_S)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_concurrent_processes_build_once_and_all_read_it(tmp_path):
    """4 processes ask for one missing entry at once: one build, every process reads the entry that stays, and
    only the lock file is left beside it (the old threading-lock version built it 4 times and replaced the
    entry under the processes reading it)."""
    n, target, log = 4, tmp_path / "models" / "entry", tmp_path / "builds.log"
    barrier = mp.get_context("spawn").Barrier(n)
    outs = [tmp_path / f"out{i}" for i in range(n)]
    _join_ok([_start(_fill, (target, log, 1.0, barrier, out)) for out in outs])

    assert len(log.read_text().splitlines()) == 1  # the build ran exactly once
    builder = log.read_text().strip()
    assert (target / READY).is_file()
    assert (target / "part1").read_text() == (target / "part2").read_text() == builder
    assert [o.read_text() for o in outs] == [f"{builder} {builder}"] * n  # all read the one entry, whole
    assert _siblings(target) == [".entry.lock"]


def _build_together(tmp: Path, log: Path, barrier, delay_s: float) -> None:
    barrier.wait(timeout=JOIN_S)  # every process is inside build at once: no lock excluded them
    _build(tmp, log, delay_s)


def _fill_as_host(host: str, target: Path, log: Path, barriers, delay_s: float, out: Path) -> None:
    """Child on a pretend host whose file locks exclude nobody (a filesystem without cross-host locks)."""
    import contextlib
    import socket

    from mage_ray import models

    socket.gethostname = lambda: host  # this throwaway process plays another host
    models._entry_lock = lambda target: contextlib.nullcontext()
    barriers[0].wait(timeout=JOIN_S)
    entry = cached_dir(
        target, functools.partial(_build_together, log=log, barrier=barriers[1], delay_s=delay_s)
    )
    out.write_text((entry / "part1").read_text() + " " + (entry / "part2").read_text())


def test_without_working_locks_a_ready_entry_is_still_never_replaced(tmp_path):
    """Where file locks do not reach across hosts (some Lustre / GPFS mounts), 3 hosts all build; they finish one
    after another. The first rename wins, the others discard their copy: every process reads the same whole
    entry, and no build directory is left."""
    n, target, log = 3, tmp_path / "cache" / "entry", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    barriers = (ctx.Barrier(n), ctx.Barrier(n))
    outs = [tmp_path / f"out{i}" for i in range(n)]
    _join_ok([_start(_fill_as_host, (f"host{i}", target, log, barriers, 0.3 * i, outs[i])) for i in range(n)])

    assert len(log.read_text().splitlines()) == n  # the scenario: every host built
    winner = (target / "part1").read_text()
    assert (target / "part2").read_text() == winner
    assert [o.read_text() for o in outs] == [f"{winner} {winner}"] * n
    assert _siblings(target) == []


def _build_forever(tmp: Path, started: Path) -> None:
    (tmp / "part1").write_text("x")
    started.write_text(str(os.getpid()))
    time.sleep(600)


def _fill_forever(target: Path, started: Path) -> None:
    cached_dir(target, functools.partial(_build_forever, started=started))


def test_killed_writer_does_not_block_the_next(tmp_path):
    """A writer SIGKILLed while it holds the lock mid-build: the next process gets the lock, removes the dead
    writer's build directory and builds the entry."""
    target, started, log = tmp_path / "cache" / "entry", tmp_path / "started", tmp_path / "builds.log"
    writer = _start(_fill_forever, (target, started))
    deadline = time.monotonic() + JOIN_S
    while not started.exists() and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the first writer never started building"
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(JOIN_S)
    assert any(n.startswith(".entry.") for n in _siblings(target))  # it left a half-built directory
    assert not target.exists()

    barrier = mp.get_context("spawn").Barrier(1)
    _join_ok([_start(_fill, (target, log, 0.0, barrier, tmp_path / "out"))])
    assert (target / READY).is_file() and len(log.read_text().splitlines()) == 1
    assert _siblings(target) == [".entry.lock"]


def _load_tiny(cache: Path, barrier, out: Path) -> None:
    """Child: get the tiny checkpoint, read every tensor and the tokenizer; write the entry's inode and a digest.

    Read with safetensors (numpy) and ``tokenizers``, not transformers: only the process that builds pays for
    importing torch and transformers, which keeps the test fast; the parent loads the entry with transformers.
    """
    import json

    import numpy as np
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from mage_ray.models import tiny_checkpoint

    barrier.wait(timeout=JOIN_S)
    path = tiny_checkpoint(seed=0, cache_dir=cache)
    inode = os.stat(path).st_ino
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    with safe_open(path / "model.safetensors", framework="np") as f:
        total = sum(float(np.abs(f.get_tensor(k)).sum()) for k in f.keys())
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode("hello there").ids
    out.write_text(f"{inode} {layers} {total:.6f} {ids}")


def test_tiny_checkpoint_built_by_three_processes_loads_in_all(tmp_path):
    """3 processes build the tiny-random checkpoint (and the embedded tokenizer it needs) into an empty cache
    at once: each reads a complete checkpoint, all read the same directory (same inode: it was never
    replaced), nothing but the lock files is left, and it loads with transformers."""
    from transformers import LlamaForCausalLM

    cache, n = tmp_path / "cache", 3
    barrier = mp.get_context("spawn").Barrier(n)
    outs = [tmp_path / f"out{i}" for i in range(n)]
    _join_ok([_start(_load_tiny, (cache, barrier, out)) for out in outs])

    path = cache / "models" / "tiny-random-0"
    seen = {o.read_text() for o in outs}
    assert len(seen) == 1 and seen.pop().split()[0] == str(os.stat(path).st_ino)
    assert _siblings(path) == [".tiny-random-0.lock"]
    assert _siblings(cache / "tokenizers" / "smollm2-135m-instruct") == [".smollm2-135m-instruct.lock"]
    assert LlamaForCausalLM.from_pretrained(path).config.num_hidden_layers == 2


def test_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    target = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "part1").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_dir(target, broken)
    assert _siblings(target) == [".entry.lock"] and not target.exists()
    assert cached_dir(target, lambda tmp: (tmp / "w").write_text("ok")) == target
    assert (target / "w").read_text() == "ok"


def test_debris_is_cleaned_but_another_hosts_live_build_is_kept(tmp_path):
    """Under the lock: this host's build directories are a dead writer's, and an entry without READY is debris,
    so both go; another host's build directory goes only once it is STALE_TEMP_S old (it may be live where
    file locks do not reach across hosts)."""
    import socket

    target = tmp_path / "entry"
    mine = tmp_path / f".entry.tmp.{socket.gethostname()}.dead1"
    live = tmp_path / ".entry.tmp.other-host.live1"
    old = tmp_path / ".entry.tmp.other-host.old1"
    for d in (mine, live, old, target):
        d.mkdir()
        (d / "part1").write_text("partial")
    os.utime(old, (time.time() - STALE_TEMP_S - 60,) * 2)

    cached_dir(target, lambda tmp: (tmp / "w").write_text("new"))
    assert (target / "w").read_text() == "new" and not (target / "part1").exists()
    assert _siblings(target) == [".entry.lock", live.name]


def test_ready_entry_is_never_rebuilt(tmp_path):
    target = tmp_path / "entry"
    cached_dir(target, lambda tmp: (tmp / "w").write_text("first"))

    def rebuild(tmp: Path) -> None:
        raise AssertionError("a READY entry was built again")

    assert cached_dir(target, rebuild) == target
    assert (target / "w").read_text() == "first"


def test_reward_model_hub_id_is_read_from_the_hub_cache(tmp_path, monkeypatch):
    """A reward model given as a hub id loads from HF_HUB_CACHE (where the policy's hub ids, `hf download` and
    preflight look), not from mage_ray's cache_dir: offline, with the model only in the hub cache, it loads."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from mage_ray.models import embedded_tokenizer_dir
    from mage_ray.tasks.hf_rewards import load_reward_model

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: nothing is downloaded
    hub, commit = tmp_path / "hub", "0" * 40
    snapshot = hub / "models--test-org--tiny-rm" / "snapshots" / commit
    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    cfg.pad_token_id = tok.pad_token_id or 0
    LlamaForSequenceClassification(cfg).save_pretrained(snapshot, safe_serialization=True)
    tok.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    net, _, _ = load_reward_model("test-org/tiny-rm", cache_dir=tmp_path / "mage_ray_cache")
    assert net.config.num_hidden_layers == 1
