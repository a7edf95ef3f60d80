"""Bundle format: build (copy in), load (validate), save (atomic), relocate, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mage_ray.bundle import BUNDLE_FILE, Bundle, BundleError, build_bundle, load_bundle, save_bundle
from mage_ray.config import ModelConfig


def _artifact(d: Path, value: bool = False) -> Path:
    """An artifact dir in the shared layout; bundle code checks files exist (the engine tests load real ones)."""
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"\0")
    (d / "manifest.json").write_text(json.dumps({"name": d.name, "complete": True}))
    if value:
        (d / "value_head.safetensors").write_bytes(b"\0")
    return d


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    return {
        "backbones": [_artifact(s / f"b{i}") for i in range(2)],
        "rs_backbones": [_artifact(s / f"rs{i}") for i in range(2)],
        "values": [_artifact(s / f"v{i}", value=True) for i in range(2)],
        "morlhf": [
            ([0.0, 1.0], _artifact(s / "m0")),
            {"preference": [1.0, 0.0], "adapter": _artifact(s / "m1")},
        ],
        "ric": {"adapter": _artifact(s / "ric"), "score_ranges": [[0, 1], [-1, 1]]},
    }


def _build(out, src, **kw):
    args = dict(
        model=ModelConfig(name_or_path="tiny-random", max_context=512),
        objectives=["a", "b"],
        beta=0.7,
        alpha=0.2,
        gamma=3.0,
        default_method="mage-i-m",
        ref_point=[-1.0, -2.0],
        **src,
    )
    args.update(kw)
    return build_bundle(out, **args)


def test_build_load_round_trip_and_relocation(tmp_path, src):
    b = _build(tmp_path / "bundle", src)
    assert b == load_bundle(tmp_path / "bundle") == load_bundle(tmp_path / "bundle" / BUNDLE_FILE)
    data = json.loads((tmp_path / "bundle" / BUNDLE_FILE).read_text())
    assert (
        data["version"] == 1 and data["base_model"] == "tiny-random" and data["model"]["max_context"] == 512
    )
    assert data["backbones"] == ["backbones/0_b0", "backbones/1_b1"]
    assert data["morlhf"][1] == {"preference": [1.0, 0.0], "adapter": "morlhf/1_m1"}
    assert data["ric"]["score_ranges"] == [[0, 1], [-1, 1]] and data["ric"]["adapter"] == "ric/0_ric"
    assert (tmp_path / "bundle" / "values" / "1_v1" / "value_head.safetensors").is_file()
    assert b.model_config().max_context == 512 and b.n_objectives == 2
    # Relocatable: every path is relative, so a moved bundle loads and resolves inside its new home.
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    moved = load_bundle(tmp_path / "moved")
    assert moved == b and moved.path(moved.values[0]) == (tmp_path / "moved" / "values/0_v0").resolve()


def test_save_bundle_rewrites_json_atomically(tmp_path, src):
    b = _build(tmp_path / "bundle", src)
    b.gamma, b.default_method = 0.5, "bs"
    save_bundle(b)
    again = load_bundle(tmp_path / "bundle")
    assert (again.gamma, again.default_method) == (0.5, "bs")
    assert [p.name for p in (tmp_path / "bundle").iterdir() if p.name.startswith(".")] == []  # no temp files
    b.gamma = -1.0
    with pytest.raises(BundleError, match="gamma"):
        save_bundle(b)
    assert load_bundle(tmp_path / "bundle").gamma == 0.5  # the failed save left the file alone


def test_optional_groups_may_be_empty_or_null(tmp_path, src):
    b = _build(tmp_path / "bundle", {"backbones": src["backbones"]}, default_method="bs", ref_point=None)
    assert (b.rs_backbones, b.values, b.morlhf, b.ric, b.ref_point) == ([], [], [], None, None)
    data = json.loads((tmp_path / "bundle" / BUNDLE_FILE).read_text())
    data.update(values=None, rs_backbones=None)
    (tmp_path / "bundle" / BUNDLE_FILE).write_text(json.dumps(data))
    assert load_bundle(tmp_path / "bundle").values == []


def test_build_bundle_is_atomic(tmp_path, src):
    _build(tmp_path / "bundle", src)
    with pytest.raises(BundleError, match=r"values\[1\].*does not exist"):
        _build(tmp_path / "bundle", {**src, "values": [src["values"][0], tmp_path / "nope"]}, gamma=9.0)
    assert load_bundle(tmp_path / "bundle").gamma == 3.0  # the old bundle is intact
    with pytest.raises(BundleError):
        _build(tmp_path / "fresh", {**src, "values": [src["values"][0]]})  # 1 value model for 2 objectives
    assert not (tmp_path / "fresh").exists()


def _edit(root: Path, **changes) -> None:
    data = json.loads((root / BUNDLE_FILE).read_text())
    data.update(changes)
    (root / BUNDLE_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"version": 2}, "'version'"),
        ({"objectives": ["a", "b", "c"]}, "'backbones'"),
        ({"objectives": ["a", "a"]}, "'objectives'"),
        ({"values": ["values/0_v0"]}, "'values'"),
        ({"beta": 0.4}, r"'beta'.*\(1/n, 1\]"),
        ({"alpha": -1.0}, "'alpha'"),
        ({"default_method": "greedy"}, "'default_method'"),
        ({"backbones": ["/abs/b0", "backbones/1_b1"]}, r"'backbones\[0\]'.*relative"),
        ({"backbones": ["../b0", "backbones/1_b1"]}, r"'backbones\[0\]'.*relative"),
        ({"morlhf": [{"preference": [1.0], "adapter": "morlhf/0_m0"}]}, r"'morlhf\[0\].preference'"),
        ({"ric": {"score_ranges": []}}, "'ric'"),
        ({"ref_point": [1.0]}, "'ref_point'"),
        ({"model": {"dtype": "int4"}}, "model.dtype"),
        ({"model": {"colour": "red"}}, "unknown keys"),
        ({"surprise": 1}, "unknown fields"),
    ],
)
def test_invalid_bundle_json_names_the_field(tmp_path, src, changes, match):
    _build(tmp_path / "bundle", src)
    _edit(tmp_path / "bundle", **changes)
    with pytest.raises(BundleError, match=match):
        load_bundle(tmp_path / "bundle")


def test_missing_files_name_the_adapter_path(tmp_path, src):
    root = tmp_path / "bundle"
    _build(root, src)
    (root / "backbones" / "1_b1" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"'backbones\[1\]'.*1_b1/adapter.*adapter_model.safetensors"):
        load_bundle(root)
    _build(root, src)
    (root / "values" / "0_v0" / "value_head.safetensors").unlink()
    with pytest.raises(BundleError, match=r"'values\[0\]'.*value_head.safetensors"):
        load_bundle(root)
    _build(root, src)
    shutil.rmtree(root / "morlhf" / "1_m1")
    with pytest.raises(BundleError, match=r"'morlhf\[1\].adapter'.*does not exist"):
        load_bundle(root)
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path / "src")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (root / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(root)
    (root / BUNDLE_FILE).write_text(json.dumps({"version": 1}))
    with pytest.raises(BundleError, match="missing required field"):
        load_bundle(root)


def test_bundle_from_json_requires_core_fields():
    with pytest.raises(BundleError, match="base_model"):
        Bundle.from_json({"objectives": ["a", "b"], "beta": 0.7, "backbones": []})


def _reward_models(s: Path, objectives=("a", "b")) -> dict:
    """GenARM ARMs (manifest names the objective) and a PARM dir (pblora/ files, manifest names the objectives)."""
    arms = []
    for o in objectives:
        d = _artifact(s / f"arm_{o}")
        (d / "manifest.json").write_text(json.dumps({"kind": "arm", "objective": o, "complete": True}))
        arms.append(d)
    parm = s / "parm"
    (parm / "pblora").mkdir(parents=True)
    for f in ("pblora_config.json", "pblora.safetensors"):
        (parm / "pblora" / f).write_bytes(b"{}")
    (parm / "manifest.json").write_text(json.dumps({"kind": "parm", "objectives": list(objectives)}))
    return {"arms": arms, "parm": parm}


def test_reward_models_round_trip_and_are_checked_against_the_objectives(tmp_path, src):
    """arms / parm / method_gammas survive build + load; a missing PBLoRA file, ARMs or a PARM trained for other
    objectives, and an unknown method in method_gammas are refused naming the field."""
    root = tmp_path / "bundle"
    b = _build(root, {**src, **_reward_models(tmp_path / "rm")}, method_gammas={"genarm": 2.0, "parm": 0.5})
    assert b.arms == ["arms/0_arm_a", "arms/1_arm_b"] and b.parm == "parm/0_parm"
    assert load_bundle(root).method_gammas == {"genarm": 2.0, "parm": 0.5}
    (root / "arms" / "1_arm_b" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"'arms\[1\]'.*1_arm_b/adapter.*adapter_model.safetensors"):
        load_bundle(root)
    b = _build(root, {**src, **_reward_models(tmp_path / "rm1")})
    (root / "parm" / "0_parm" / "pblora" / "pblora.safetensors").unlink()
    with pytest.raises(BundleError, match=r"'parm'.*missing pblora/pblora.safetensors"):
        load_bundle(root)
    with pytest.raises(BundleError, match=r"'arms\[0\]'.*trained for objective \['b'\].*'a'"):
        _build(root, {**src, **_reward_models(tmp_path / "rm2", ("b", "a"))})
    rm = _reward_models(tmp_path / "rm3")
    (rm["parm"] / "manifest.json").write_text(json.dumps({"objectives": ["a", "c"]}))
    with pytest.raises(BundleError, match=r"'parm'.*trained for objectives \['a', 'c'\]"):
        _build(root, {**src, **rm})
    with pytest.raises(BundleError, match="method_gammas"):
        _build(root, src, method_gammas={"nosuch": 1.0})
    with pytest.raises(BundleError, match=r"'arms'"):
        _build(root, {**src, "arms": rm["arms"][:1]})
