"""Front and sweep plots: files written atomically, panels, hollow (degenerate) points, preference labels, and
what the image shows (read back as pixels: each method's colour, where it lies, hollow markers)."""

import numpy as np
import pytest

from mage_ray.plots import COLORS, Front, plot_fronts, plot_sweep, preference_label
from mage_ray.soup import preference_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def _only(tmp_path, *names):
    """The output directory holds exactly these files (no temp file left behind)."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _pixels(path, color: str, tol: float = 0.08) -> np.ndarray:
    """(rows, cols) of the image's pixels within ``tol`` (RGB distance, 0..1 scale) of ``color`` ('#rrggbb'),
    the legend strip at the bottom (last 20% of rows) left out."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]  # (H, W, 3) floats
    rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    near = np.linalg.norm(img - rgb, axis=-1) < tol
    near[int(0.8 * img.shape[0]) :] = False
    return np.argwhere(near)


def _front2(method: str, shift: float, degenerate=None, stderr=True) -> Front:
    mu = preference_grid(2, 0.1)  # (11, 2): (0, 1), (.1, .9), ..., (1, 0)
    rewards = np.stack([mu[:, 0] + shift, np.sqrt(1 - mu[:, 0] ** 2) + shift], axis=1)
    se = np.full_like(rewards, 0.02) if stderr else None
    return Front(method, mu, rewards, se, degenerate)


def test_preference_label():
    """(0, 1) -> "(0,1)"; (0.3, 0.7) -> "(.3,.7)"; 1/3 rounds to .33."""
    assert preference_label([0.0, 1.0]) == "(0,1)"
    assert preference_label([0.3, 0.7]) == "(.3,.7)"
    assert preference_label([0.25, 0.25, 0.5]) == "(.25,.25,.5)"
    assert preference_label([1 / 3, 1 / 3, 1 / 3]) == "(.33,.33,.33)"


def test_two_objectives_panel_labels_and_hollow(tmp_path):
    """Degenerate fractions 0.2 at points 2 and 7, 0.05 (not above the threshold) at 4: hollow = [2, 7]."""
    deg = np.zeros(11)
    deg[[2, 7]] = 0.2
    deg[4] = 0.05
    fronts = [
        _front2("mage", 0.0, deg),
        _front2("soup", -0.1),
        _front2("ric", -0.2, np.zeros(11), stderr=False),
    ]
    path = tmp_path / "front.png"
    drawn = plot_fronts(fronts, ["helpful", "harmless"], path)
    assert _is_png(path)
    _only(tmp_path, "front.png")
    assert drawn["panels"] == [(0, 1)]
    assert drawn["hollow"] == {"mage": [2, 7], "soup": [], "ric": []}
    expected = ["(0,1)", "(.1,.9)", "(.2,.8)", "(.3,.7)", "(.4,.6)", "(.5,.5)"]
    expected += ["(.6,.4)", "(.7,.3)", "(.8,.2)", "(.9,.1)", "(1,0)"]
    for method in ("mage", "soup", "ric"):
        assert drawn["labels"][method] == expected
    assert "hollow: more than 5% of responses flagged degenerate" in drawn["note"]
    # the image: every method is drawn in its colour, further right and higher the larger its rewards
    where = [_pixels(path, COLORS[k]) for k in range(3)]  # mage (shift 0), soup (-0.1), ric (-0.2)
    assert all(len(w) > 200 for w in where), [len(w) for w in where]
    cols = [w[:, 1].mean() for w in where]
    rows = [w[:, 0].mean() for w in where]  # image rows grow downwards
    assert cols[0] > cols[1] > cols[2] and rows[0] < rows[1] < rows[2], (cols, rows)


def test_hollow_points_are_drawn_hollow(tmp_path):
    """The same front drawn with 5 of its 11 points flagged (degenerate 0.2) has fewer pixels of its colour than
    drawn with none flagged: hollow markers are rings, not discs (bookkeeping that said 'hollow' while drawing
    them filled would give the same count). Error bars (drawn at alpha 0.6) add pixels of the colour blended
    with white."""
    deg = np.zeros(11)
    deg[[1, 3, 5, 7, 9]] = 0.2
    plain = _front2("m", 0.0, stderr=False)
    mu, rewards = plain.preferences, plain.rewards
    rgb = np.array([int(COLORS[0][i : i + 2], 16) for i in (1, 3, 5)])
    light = "#" + "".join(f"{int(round(0.6 * c + 0.4 * 255)):02x}" for c in rgb)  # the bars' colour on white
    counts, bar_pixels = {}, {}
    for name, front in {
        "filled": _front2("m", 0.0, np.zeros(11), stderr=False),
        "hollow": _front2("m", 0.0, deg, stderr=False),
        "bars": Front("m", mu, rewards, np.full_like(rewards, 0.06), np.zeros(11)),
    }.items():
        plot_fronts([front], ["a", "b"], tmp_path / f"{name}.png")
        counts[name] = len(_pixels(tmp_path / f"{name}.png", COLORS[0]))
        bar_pixels[name] = len(_pixels(tmp_path / f"{name}.png", light, tol=0.05))
    assert counts["hollow"] < 0.9 * counts["filled"], counts
    assert bar_pixels["bars"] > 1.5 * bar_pixels["filled"], bar_pixels


def test_two_objectives_many_points_label_every_second(tmp_path):
    mu = preference_grid(2, 0.05)  # 21 points
    drawn = plot_fronts([Front("m", mu, mu[:, ::-1])], ["a", "b"], tmp_path / "f.png")
    assert drawn["labelled"]["m"] == list(range(0, 21, 2))


def test_three_objectives_pairs_and_vertex_labels(tmp_path):
    mu = preference_grid(3, 0.25)  # (15, 3); centre-most point (.25,.25,.5) comes first in grid order
    rng = np.random.default_rng(0)
    fronts = [
        Front(m, mu, mu + 0.1 * k, np.full_like(mu, 0.01), rng.uniform(0, 0.1, len(mu)))
        for k, m in enumerate(["mage", "soup"])
    ]
    path = tmp_path / "front3.png"
    drawn = plot_fronts(fronts, ["helpful", "harmless", "humor"], path, title="three objectives")
    assert _is_png(path)
    _only(tmp_path, "front3.png")
    assert drawn["panels"] == [(0, 1), (0, 2), (1, 2)]
    labels = drawn["labels"]["mage"]
    assert {"(1,0,0)", "(0,1,0)", "(0,0,1)"} <= set(labels)
    assert len(labels) == 4  # three vertices and the centre-most point
    assert "(.25,.25,.5)" in labels
    assert drawn["hollow"]["soup"] == [int(p) for p in np.flatnonzero(fronts[1].degenerate > 0.05)]


def test_no_stderr_no_degenerate(tmp_path):
    mu = preference_grid(3, 0.5)
    drawn = plot_fronts([Front("m", mu, mu)], ["a", "b", "c"], tmp_path / "f.png")
    assert _is_png(tmp_path / "f.png")
    assert drawn["hollow"] == {"m": []}
    assert "hollow" not in drawn["note"]


def test_bad_input_named():
    mu = preference_grid(2, 0.5)
    with pytest.raises(ValueError, match="rewards"):
        Front("m", mu, mu[:2])
    with pytest.raises(ValueError, match="degenerate"):
        Front("m", mu, mu, degenerate=np.array([0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="objectives"):
        plot_fronts([Front("m", mu, mu)], ["a", "b", "c"], "unused.png")


def test_sweep_with_interval_failure_default_chosen(tmp_path):
    rows = [
        {"train.lr": lr, "hv": hv, "hv_lo": hv - 0.05, "hv_hi": hv + 0.04, "error": None}
        for lr, hv in [(1e-5, 0.4), (3e-5, 0.55), (1e-4, 0.6), (3e-4, 0.5)]
    ]
    rows.append({"train.lr": 1e-3, "hv": None, "error": "RuntimeError: nan loss"})
    path = tmp_path / "sweep.png"
    plot_sweep(rows, "train.lr", path, default=3e-5, chosen=1e-4)
    assert _is_png(path)
    _only(tmp_path, "sweep.png")
    # the image: the failed trial's red dashed line and the chosen trial's star (#e6a100) are drawn
    assert len(_pixels(path, "#ff8080", tol=0.1)) > 50  # red at alpha 0.5 on white
    assert len(_pixels(path, "#e6a100")) > 20
    plot_sweep(rows[:4], "train.lr", tmp_path / "ok.png", default=3e-5)  # no failure, nothing chosen
    assert len(_pixels(tmp_path / "ok.png", "#ff8080", tol=0.1)) == 0
    assert len(_pixels(tmp_path / "ok.png", "#e6a100")) == 0


def test_sweep_old_row_format(tmp_path):
    rows = [{"beta": b, "hv": 0.1 * b, "error": None} for b in (0.1, 0.5, 1.0)]
    rows.append({"beta": 2.0, "hv": None, "error": "ValueError: x"})
    plot_sweep(rows, "beta", tmp_path / "sweep.png")
    assert _is_png(tmp_path / "sweep.png")
    _only(tmp_path, "sweep.png")
