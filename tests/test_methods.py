"""Method specs (mage_ray.guidance.REGISTRY) are the one description of a decoding method: these tests check that
what a spec declares is what its plan reads, and that config validation, bundle loading and the pipeline's stage
selection follow the specs."""

from __future__ import annotations

import numpy as np
import pytest

from mage_ray.guidance import (
    ADAPTER_GROUPS,
    REGISTRY,
    AdapterLayout,
    PlanArgs,
    groups_for,
    make_plan,
    method_names,
    register_method,
    stages_for,
)

N = 2
MU = np.array([0.5, 0.5])
RIC_INFO = {"score_low": [-1.0, -1.0], "score_high": [1.0, 1.0], "objectives": ["a", "b"], "mapping": "linf"}


def _layout(groups) -> AdapterLayout:
    """Backbones in columns 0..n-1, then one block of columns per adapter group in ``groups``."""
    col = N
    kw: dict = {}
    for g in ADAPTER_GROUPS:
        if g not in groups:
            continue
        if g in ("rs_backbones", "wrpo_backbones", "values", "arms"):
            kw[g] = tuple(range(col, col + N))
            col += N
        elif g == "parm":
            kw[g] = tuple(range(col, col + N + 1))
            col += N + 1
        elif g in ("morlhf", "modpo"):
            kw[g] = (((0.5, 0.5), col),)
            col += 1
        elif g == "ric":
            kw["ric"], kw["ric_info"] = col, RIC_INFO
            col += 1
    return AdapterLayout(k=col, n=N, beta=0.8, backbones=tuple(range(N)), **kw)


def _columns(layout: AdapterLayout, group: str) -> set[int]:
    """The columns of one adapter group in a layout."""
    cols = getattr(layout, group)
    if group in ("morlhf", "modpo"):
        return {c for _, c in cols}
    if group == "ric":
        return set() if cols is None else {cols}
    return set(cols)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_methods_declared_groups_are_enough_to_build_its_plan(method):
    """Every method plans on a layout with the backbones plus exactly the groups its spec declares. On a layout
    holding EVERY adapter group, its rows read no column outside its declared groups (and the backbones only when
    its spec says it reads them): a method that used a group it does not declare whenever that group is there
    (mod with the rs_backbones declared away, say) fails here, where a layout of only its declared groups cannot
    show it."""
    spec = REGISTRY[method]
    plan = make_plan(method, _layout(spec.groups), MU, PlanArgs(prompt="Hi"), gamma=1.0)
    assert plan.base, method
    full = _layout(ADAPTER_GROUPS)
    plan = make_plan(method, full, MU, PlanArgs(prompt="Hi"), gamma=1.0)
    used = {int(c) for row in plan.rows for c in np.flatnonzero(row.coeffs)}
    allowed = set().union(*(_columns(full, g) for g in spec.groups)) | (
        set(full.backbones) if spec.backbones else set()
    )
    assert used <= allowed, (method, sorted(used - allowed))


@pytest.mark.parametrize("method", [m for m in sorted(REGISTRY) if REGISTRY[m].groups])
def test_a_method_without_its_required_groups_fails_by_name(method):
    """Without its groups a method either falls back (mod / mage-i use the backbones as experts) or fails with
    an error that names the method."""
    try:
        make_plan(method, _layout(()), MU, PlanArgs(prompt="Hi"), gamma=1.0)
    except ValueError as e:
        assert repr(method) in str(e)
    else:
        assert method in ("mod", "mage-i"), f"{method} planned without its groups {REGISTRY[method].groups}"


def test_groups_and_stages_follow_the_specs():
    assert groups_for(["bs", "mage-i-m"]) == set() and stages_for(["bs", "mage-i-m"]) == set()
    assert groups_for(["rs", "mage-e-m"]) == {"rs_backbones", "values"}
    assert stages_for(["mage-e"]) == {"rollouts", "values"}
    assert stages_for(["ric", "bs-wrpo"]) == {"rollouts", "ric", "wrpo"}
    with pytest.raises(ValueError, match="nosuch"):
        groups_for(["nosuch"])


def test_config_pipeline_and_claims_read_the_registry():
    """A method registered at run time is valid in a config, and the pipeline's stage selection sees what it
    needs, including through sweep.gamma_method."""
    from mage_ray.config import ConfigError, config_from_dict
    from mage_ray.pipeline import _needs

    cfg = config_from_dict({"model": {"name_or_path": "tiny-random"}})
    cfg.eval.methods = ["bs"]
    cfg.sweep.gamma_method = "mage-e-m"
    assert _needs(cfg, "values") and not _needs(cfg, "rs_backbones")
    cfg.sweep.gamma_method = "mage-i"
    assert _needs(cfg, "rs_backbones")
    with pytest.raises(ConfigError, match="eval.methods"):
        config_from_dict({"eval": {"methods": ["bs", "my-method"]}})

    @register_method("my-method", groups=["values"], stages=["rollouts", "values"], family="mage")
    def _mine(layout, mu, args):
        return make_plan("bs", layout, mu, args, gamma=0.0)

    try:
        assert "my-method" in method_names()
        cfg = config_from_dict({"eval": {"methods": ["bs", "my-method"]}})
        assert _needs(cfg, "values")
    finally:
        del REGISTRY["my-method"]


def test_register_method_refuses_unknown_groups_stages_and_families():
    for kw in ({"groups": ["value"]}, {"stages": ["valuez"]}, {"family": "other"}):
        with pytest.raises(ValueError, match="my-bad"):
            register_method("my-bad", **kw)
    assert "my-bad" not in REGISTRY


def test_layer_contracts_hold():
    """import-linter's contracts in pyproject.toml (layers; decoding and serving never import training)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_decoding_never_imports_training():
    """The decode path (guidance, decode, bundle, serve) imports nothing from mage_ray.train."""
    import subprocess
    import sys

    code = (
        "import sys, mage_ray.guidance, mage_ray.decode, mage_ray.bundle, mage_ray.serve.core, "
        "mage_ray.serve.schema; bad = [m for m in sys.modules if m.startswith('mage_ray.train')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_arm_methods_guide_the_base_with_their_reward_models():
    """genarm: base row (c = 0) + one row per ARM, V = sum_i mu_i log pi_r,i; genarm-m: one row with the ARMs
    mixed by mu; parm: one row with the PBLoRA components mixed by (1, mu); all summed over tokens (implicit)."""
    mu = np.array([0.25, 0.75])
    L = _layout({"arms", "parm"})  # arms in columns 2, 3; parm in 4, 5, 6
    g = make_plan("genarm", L, mu, PlanArgs(), gamma=2.0)
    assert [r.coeffs.tolist() for r in g.rows] == [[0.0] * 7, [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]
    assert g.base == [(0, 1.0)] and g.guide == [(1, "logp", 0.25), (2, "logp", 0.75)]
    assert g.value_kind == "implicit"
    gm = make_plan("genarm-m", L, mu, PlanArgs(), gamma=2.0)
    assert gm.rows[1].coeffs.tolist() == [0, 0, 0.25, 0.75, 0, 0, 0] and gm.guide == [(1, "logp", 1.0)]
    p = make_plan("parm", L, mu, PlanArgs(), gamma=2.0)
    assert p.rows[1].coeffs.tolist() == [0, 0, 0, 0, 1.0, 0.25, 0.75] and p.guide == [(1, "logp", 1.0)]
    # a one-hot preference drops the other ARM's row; gamma = 0 is plain base decoding (one row)
    assert len(make_plan("genarm", L, np.array([1.0, 0.0]), PlanArgs(), gamma=1.0).rows) == 2
    assert len(make_plan("parm", L, mu, PlanArgs(), gamma=0.0).rows) == 1
    assert all(
        REGISTRY[m].family == "arm" and not REGISTRY[m].backbones for m in ("genarm", "genarm-m", "parm")
    )
    assert stages_for(["genarm", "parm"]) == {"rollouts", "arms", "parm"}
