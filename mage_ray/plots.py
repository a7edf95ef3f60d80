"""Plots a person can read: Pareto fronts for 2 or more objectives, and one hyper-parameter sweep.

``plot_fronts`` draws one panel for n = 2 objectives and one panel per pair of objectives for n >= 3
(the same methods, colours and markers in every panel, one shared legend below). Every point carries its
full preference vector as a label, ``(.3,.7)``; points whose share of degenerate responses exceeds a
threshold are drawn hollow. ``plot_sweep`` draws a validation metric against one swept parameter.

matplotlib (Agg backend) is imported inside the functions, so importing this module stays cheap. Files
are written atomically: a temporary file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mage_ray.manifest import atomic_file

MARKERS = "os^Dv<>pPX*h"
# n >= 3: each method labels the same preferences, so each method puts its labels in its own direction
LABEL_OFFSETS = [
    (6, 5, "left", "bottom"),
    (6, -5, "left", "top"),
    (-6, 5, "right", "bottom"),
    (-6, -5, "right", "top"),
]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Front:
    """One method's front: the mean reward vector reached at each preference."""

    method: str
    """Name shown in the legend; unique among the fronts of one plot."""
    preferences: np.ndarray
    """(P, n) preference vectors mu, one per point, in the order the points are joined (n = 2)."""
    rewards: np.ndarray
    """(P, n) mean reward per preference (mean over prompts)."""
    stderr: np.ndarray | None = None
    """(P, n) standard error of each mean; None draws no error bars."""
    degenerate: np.ndarray | None = None
    """(P,) fraction of responses flagged degenerate at each preference, in [0, 1]; None: none flagged."""

    def __post_init__(self):
        self.preferences = np.asarray(self.preferences, dtype=np.float64)
        self.rewards = np.asarray(self.rewards, dtype=np.float64)
        if self.preferences.ndim != 2 or self.preferences.shape[1] < 2:
            raise ValueError(
                f"Front({self.method!r}).preferences must have shape (P, n >= 2), got {self.preferences.shape}"
            )
        if self.rewards.shape != self.preferences.shape:
            raise ValueError(
                f"Front({self.method!r}).rewards must have the shape of preferences {self.preferences.shape}, "
                f"got {self.rewards.shape}"
            )
        if self.stderr is not None:
            self.stderr = np.asarray(self.stderr, dtype=np.float64)
            if self.stderr.shape != self.rewards.shape:
                raise ValueError(
                    f"Front({self.method!r}).stderr must have the shape of rewards {self.rewards.shape}, "
                    f"got {self.stderr.shape}"
                )
        if self.degenerate is not None:
            self.degenerate = np.asarray(self.degenerate, dtype=np.float64)
            if self.degenerate.shape != (len(self.rewards),):
                raise ValueError(
                    f"Front({self.method!r}).degenerate must have shape ({len(self.rewards)},), "
                    f"got {self.degenerate.shape}"
                )
            if np.any((self.degenerate < 0) | (self.degenerate > 1)):
                raise ValueError(f"Front({self.method!r}).degenerate must lie in [0, 1]")


def preference_label(mu: Sequence[float]) -> str:
    """Compact preference label: (0.3, 0.7) -> "(.3,.7)", (0, 1) -> "(0,1)", (0.25, 0.25, 0.5) -> "(.25,.25,.5)"."""
    parts = []
    for v in mu:
        s = f"{round(float(v), 2):g}"
        parts.append(s[1:] if s.startswith("0.") else s)
    return "(" + ",".join(parts) + ")"


def _labelled_points(preferences: np.ndarray) -> list[int]:
    """Indices of the points to label: n = 2 every point (every second one beyond 11 points);
    n >= 3 only the simplex vertices and the point nearest the centre (1/n, ..., 1/n)."""
    p, n = preferences.shape
    if n == 2:
        return list(range(p)) if p <= 11 else list(range(0, p, 2))
    vertices = [k for k in range(p) if np.isclose(preferences[k].max(), 1.0)]
    centre = int(np.argmin(np.round(np.linalg.norm(preferences - 1.0 / n, axis=1), 9)))  # first of ties
    return sorted(set(vertices) | {centre})


def plot_fronts(
    fronts: Sequence[Front],
    objectives: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    degenerate_threshold: float = 0.05,
) -> dict:
    """Draw the fronts and write the figure to ``path``; return what was drawn.

    Returns ``{"panels": [(i, j), ...], "hollow": {method: [point index, ...]},
    "labelled": {method: [point index, ...]}, "labels": {method: [label, ...]}, "note": caption}``.
    """
    fronts = list(fronts)
    if not fronts:
        raise ValueError("fronts must hold at least one Front")
    n = len(objectives)
    if n < 2:
        raise ValueError(f"objectives must name at least 2 objectives, got {list(objectives)}")
    for f in fronts:
        if f.rewards.shape[1] != n:
            raise ValueError(f"Front({f.method!r}) has {f.rewards.shape[1]} objectives, objectives names {n}")
    methods = [f.method for f in fronts]
    if len(set(methods)) != len(methods):
        raise ValueError(f"method names must be unique, got {methods}")
    if not 0.0 <= degenerate_threshold <= 1.0:
        raise ValueError(f"degenerate_threshold must lie in [0, 1], got {degenerate_threshold}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [(0, 1)] if n == 2 else list(itertools.combinations(range(n), 2))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.5 if n == 2 else 4.6 * ncols, 5.2 if n == 2 else 4.4 * nrows),
        dpi=130, squeeze=False, layout="constrained",
    )  # fmt: skip
    drawn = {"panels": panels, "hollow": {}, "labelled": {}, "labels": {}}
    handles = []
    for k, f in enumerate(fronts):
        color, marker = COLORS[k % len(COLORS)], MARKERS[k % len(MARKERS)]
        degenerate = np.zeros(len(f.rewards)) if f.degenerate is None else f.degenerate
        hollow = degenerate > degenerate_threshold  # (P,)
        labelled = _labelled_points(f.preferences)
        labels = [preference_label(f.preferences[p]) for p in labelled]
        drawn["hollow"][f.method] = [int(p) for p in np.flatnonzero(hollow)]
        drawn["labelled"][f.method] = labelled
        drawn["labels"][f.method] = labels
        for ax, (i, j) in zip(axes.flat, panels, strict=False):
            x, y = f.rewards[:, i], f.rewards[:, j]
            if n == 2:  # the preference order is a path only along the n = 2 grid
                ax.plot(x, y, color=color, lw=1.3, alpha=0.8, zorder=2)
            if f.stderr is not None:
                ax.errorbar(
                    x, y, xerr=f.stderr[:, i], yerr=f.stderr[:, j], fmt="none",
                    ecolor=color, elinewidth=0.7, alpha=0.6, zorder=1,
                )  # fmt: skip
            ax.scatter(x[~hollow], y[~hollow], marker=marker, s=34, color=color, zorder=3)
            ax.scatter(
                x[hollow], y[hollow], marker=marker, s=34, facecolors="none", edgecolors=color,
                linewidths=1.3, zorder=3,
            )  # fmt: skip
            if n >= 3:  # ring the few labelled points so they can be found in the cloud
                ax.scatter(
                    x[labelled], y[labelled], marker="o", s=110, facecolors="none", edgecolors="black",
                    linewidths=0.8, zorder=3,
                )  # fmt: skip
            dx, dy, ha, va = (4, 3, "left", "bottom") if n == 2 else LABEL_OFFSETS[k % len(LABEL_OFFSETS)]
            for p, label in zip(labelled, labels, strict=True):
                if np.isfinite(x[p]) and np.isfinite(y[p]):
                    ax.annotate(
                        label, (x[p], y[p]), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                        fontsize=7, color=color, zorder=4,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
                    )  # fmt: skip
        handles.append(
            Line2D([], [], color=color, marker=marker, lw=1.3 if n == 2 else 0, ms=6, label=f.method)
        )
    for ax, (i, j) in zip(axes.flat, panels, strict=False):
        ax.set_xlabel(f"{objectives[i]} (mean reward)", fontsize=10)
        ax.set_ylabel(f"{objectives[j]} (mean reward)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)

    note = f"labels: preference weights ({', '.join(objectives)})"
    if n >= 3:
        note += ", shown (ringed) for the simplex vertices and the centre point"
    if any(f.degenerate is not None for f in fronts):
        note += f"; hollow: more than {degenerate_threshold:.0%} of responses flagged degenerate"
        handles.append(
            Line2D([], [], color="grey", marker="o", lw=0, ms=6, mfc="none", label="degenerate (hollow)")
        )
    drawn["note"] = note
    has_bars = any(f.stderr is not None for f in fronts)
    default_title = "Pareto fronts (mean over prompts" + ("; bars: ±1 s.e.)" if has_bars else ")")
    fig.suptitle(title or default_title, fontsize=12)
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=9)
    legend.set_title(note, prop={"size": 8})
    _save(fig, path)
    plt.close(fig)
    return drawn


def plot_sweep(
    rows: Sequence[dict],
    param: str,
    path: str | Path,
    *,
    metric: str = "hv",
    default=None,
    chosen=None,
) -> None:
    """Validation ``metric`` against the swept ``param``: one point per successful trial, vertical bars
    from ``row[f"{metric}_lo"]`` to ``row[f"{metric}_hi"]`` where present, failed trials (``row["error"]``
    not None) as red dashed lines, ``default`` as a grey dotted line and ``chosen`` as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [
        r
        for r in rows
        if r.get("error") is None and r.get(metric) is not None and np.isfinite(r[metric]) and param in r
    ]
    ok.sort(key=lambda r: r[param])
    xs, ys = [r[param] for r in ok], [float(r[metric]) for r in ok]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=130, layout="constrained")
    ax.plot(xs, ys, "o-", color=COLORS[0], ms=5, lw=1.3, label=f"validation {metric}", zorder=3)
    lo_key, hi_key = f"{metric}_lo", f"{metric}_hi"
    bars = [r for r in ok if r.get(lo_key) is not None and r.get(hi_key) is not None]
    if bars:
        y = np.array([float(r[metric]) for r in bars])
        lo = np.array([float(r[lo_key]) for r in bars])
        hi = np.array([float(r[hi_key]) for r in bars])
        ax.errorbar(
            [r[param] for r in bars], y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="none",
            ecolor=COLORS[0], elinewidth=0.9, capsize=3, alpha=0.7, label=f"{lo_key} .. {hi_key}", zorder=2,
        )  # fmt: skip
    failed = [r[param] for r in rows if r.get("error") is not None and param in r]
    for k, x in enumerate(failed):
        ax.axvline(x, color="red", ls="--", lw=1, alpha=0.5, label="failed trial" if k == 0 else "_nolegend_")
    if default is not None:
        ax.axvline(
            default,
            color="grey",
            ls=":",
            lw=1.5,
            label=f"default ({_fmt(default)})",
        )
    if chosen is not None:
        hit = [
            y
            for x, y in zip(xs, ys, strict=True)
            if x == chosen or (_is_number(x) and _is_number(chosen) and math.isclose(x, chosen))
        ]
        text = f"chosen ({_fmt(chosen)})"
        if hit:
            ax.plot(
                [chosen], [hit[0]], "*", color="#e6a100", mec="black", mew=0.6, ms=15, label=text, zorder=4
            )
        else:
            ax.axvline(chosen, color="#e6a100", lw=1.5, label=text)
    values = xs + failed + [v for v in (default, chosen) if v is not None]
    if values and all(_is_number(v) and v > 0 for v in values) and max(values) / min(values) >= 100:
        ax.set_xscale("log")
    if not ok:
        ax.text(
            0.5, 0.5, "no successful trial", transform=ax.transAxes, ha="center", va="center", color="red"
        )
    ax.set_xlabel(param, fontsize=10)
    ax.set_ylabel(f"validation {metric}", fontsize=10)
    ax.set_title(f"Sweep: validation {metric} vs {param}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    _save(fig, path)
    plt.close(fig)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _fmt(v) -> str:
    return f"{v:g}" if _is_number(v) else str(v)


def _save(fig, path: str | Path) -> None:
    """Write ``fig`` to ``path`` atomically (``mage_ray.manifest.atomic_file``)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
