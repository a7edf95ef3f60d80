"""Stage records and the pipeline's progress lines.

A finished stage writes ``<run_dir>/stages/<stage>.json`` (its record, with ``seconds``; the run directory may be
an object-store URI, :mod:`mage_ray.storage`); a rerun reads it
(:func:`stage_done`), says it skips it (:func:`skip_done`) and goes on. :class:`StageClock` prints one line when
a stage starts and one when it ends, with a plain estimate of what is left.
"""

from __future__ import annotations

import time

from mage_ray.config import Config
from mage_ray.manifest import read_json, write_json_atomic
from mage_ray.storage import exists, join, mtime


def stage_path(cfg: Config, stage: str) -> str:
    return join(cfg.storage.run_dir, "stages", f"{stage}.json")


def stage_done(cfg: Config, stage: str) -> dict | None:
    """The record of a finished stage (local or object-store run directory), or None."""
    p = stage_path(cfg, stage)
    return read_json(p) if exists(p) else None


def skip_done(cfg: Config, stage: str, rec: dict | None) -> dict | None:
    """``rec`` (a finished stage's record, or None); when it is a record, print the resumed run's line for it:
    ``[pipeline] stage 'beta': done at <time>, skipping``."""
    if rec:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime(stage_path(cfg, stage))))
        print(f"[pipeline] stage {stage!r}: done at {when}, skipping", flush=True)
    return rec


def _hms(seconds: float) -> str:
    """45 s, 5m46s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


class StageClock:
    """The pipeline's progress lines: one when a stage starts (its place in the run, the time since the run
    started) and one when it ends (its time, and an estimate of what is left).

    The estimate is plain arithmetic on the stages' own times, and the line says so: the stages still to run
    times the mean time of the finished stages of this run (their records, earlier invocations included; stages
    done in under a second, such as a sweep over one candidate, are left out). Stages differ a lot (a Tune sweep
    over training vs. a decode-only one), so it is a rough figure; the training stages' per-step lines and the
    evaluation's progress bar give the finer view inside a stage.
    """

    def __init__(self, cfg: Config, stages: list[str]):
        self.cfg, self.stages, self.t0 = cfg, stages, time.time()

    def _where(self, stage: str) -> str:
        i = self.stages.index(stage) + 1 if stage in self.stages else "?"
        return f"stage {i}/{len(self.stages)}, {_hms(time.time() - self.t0)} into this run"

    def start(self, stage: str, text: str) -> None:
        print(f"\n[pipeline] === {stage} ({self._where(stage)}): {text}", flush=True)

    def end(self, stage: str, seconds: float) -> None:
        records = {st: stage_done(self.cfg, st) for st in self.stages}
        left = [st for st, rec in records.items() if rec is None]
        # a stage decided without work (one candidate) says nothing about how long the others take
        timed = [rec["seconds"] for rec in records.values() if rec and rec.get("seconds", 0) >= 1]
        if not left:
            rest = "no stage left"
        elif timed:
            mean, n = sum(timed) / len(timed), len(timed)
            rest = (
                f"left: {', '.join(left)}, about {_hms(mean * len(left))} "
                f"({len(left)} x the {_hms(mean)} mean of the {n} finished stage{'s' * (n > 1)})"
            )
        else:
            rest = f"left: {', '.join(left)}"
        print(
            f"[pipeline] stage {stage!r} done in {_hms(seconds)} ({self._where(stage)}); {rest}", flush=True
        )


_clock: StageClock | None = None
"""The progress lines of the run in progress (the pipeline's run_sweep / run_pipeline sets it)."""


def set_clock(clock: StageClock | None) -> None:
    """Make ``clock`` print the start and end lines of the stages from now on (None: plain lines)."""
    global _clock
    _clock = clock


def _finish(cfg: Config, stage: str, record: dict, t0: float) -> dict:
    """Write a finished stage's record (with its ``seconds``) and print its end line; return the record."""
    record = {**record, "stage": stage, "seconds": round(time.time() - t0, 1)}
    write_json_atomic(stage_path(cfg, stage), record)
    if _clock is None:
        print(f"[pipeline] stage {stage!r} done in {_hms(record['seconds'])}", flush=True)
    else:
        _clock.end(stage, record["seconds"])
    return record


def _banner(stage: str, text: str) -> None:
    """Print a stage's start line (and, in a rehearsal, stamp later ledger entries with the stage)."""
    from mage_ray.devices import set_stage

    set_stage(stage)
    if _clock is None:
        print(f"\n[pipeline] === {stage}: {text}", flush=True)
    else:
        _clock.start(stage, text)
