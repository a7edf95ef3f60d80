"""Config loading, overrides and validation; every shipped config loads."""

from pathlib import Path

import pytest

from mage_ray.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "embedded.yaml",
        "embedded3.yaml",
        "embedded_long.yaml",
        "smoke.yaml",
        "hh_rlhf.yaml",
        "summary.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.n_objectives >= 2
    assert 1 / cfg.n_objectives < cfg.backbone.beta <= 1


def test_the_long_study_is_the_demo_at_eight_times_the_budget():
    """configs/embedded_long.yaml = configs/embedded.yaml with 8x the GRPO steps per backbone (14 -> 112), the value,
    ARM and PARM budgets scaled the same (24 -> 192 steps), beta fixed at the demo's 0.8 (one candidate: no beta
    trials), the paper's alpha / gamma candidates (plus 0), and every guided method evaluated; nothing else
    differs."""
    root = Path(__file__).resolve().parents[1] / "configs"
    demo, long = (
        load_config(root / "embedded.yaml").to_dict(),
        load_config(root / "embedded_long.yaml").to_dict(),
    )
    assert long["backbone"]["steps"] == 8 * demo["backbone"]["steps"] == 112
    assert long["value"]["steps"] == 8 * demo["value"]["steps"] == 192
    assert long["arm"]["steps"] == 192 and long["arm"]["parm_steps"] in (0, 192)  # 0: the ARMs' steps
    assert demo["arm"]["steps"] in (0, demo["value"]["steps"])  # the demo's ARMs: the value models' budget
    assert long["sweep"]["betas"] == [0.8] == [demo["backbone"]["beta"]] and long["backbone"]["beta"] == 0.8
    assert long["sweep"]["alphas"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert long["sweep"]["gammas"] == [0.0, 0.1, 0.2, 1.0, 3.0, 5.0]
    assert set(long["eval"]["methods"]) == {
        "rs", "bs", "mage-e", "mage-e-m", "mage-i", "mage-i-m", "genarm", "genarm-m", "parm"
    }  # fmt: skip
    changed = {
        ("backbone", "steps"), ("value", "steps"), ("arm", "steps"), ("arm", "parm_steps"),
        ("arm", "parm_learning_rate"), ("sweep", "betas"), ("sweep", "alphas"), ("sweep", "gammas"),
        ("eval", "methods"), ("storage", "run_name"),
    }  # fmt: skip
    for section, fields in demo.items():
        for field, value in fields.items() if isinstance(fields, dict) else []:
            if (section, field) not in changed:
                assert long[section][field] == value, (section, field)


def test_paper_settings():
    hh = load_config(Path(__file__).resolve().parents[1] / "configs" / "hh_rlhf.yaml")
    assert hh.task.objectives == ["helpful", "harmless", "humor"]
    assert (hh.lora.r, hh.lora.lora_alpha) == (64, 128.0)
    assert hh.backbone.use_gpu and not hh.model.trust_remote_code


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["backbone.steps=7", "decode.gamma=2.5", "task.objectives=[a,b,c]", "lora.dropout=0.1"]
    )
    assert cfg.backbone.steps == 7 and cfg.decode.gamma == 2.5
    assert cfg.task.objectives == ["a", "b", "c"]
    assert cfg.lora.dropout == 0.1


@pytest.mark.parametrize(
    "override, field",
    [
        ("backbone.steps=0", "backbone.steps"),
        ("decode.top_p=1.5", "decode.top_p"),
        ("decode.method=greedy-magic", "decode.method"),
        ("backbone.beta=0.3", "backbone.beta"),
        ("backbone.steps=abc", "backbone.steps"),
        ("model.dtype=int3", "model.dtype"),
        ("decode.gamma=nan", "decode.gamma"),
        ("eval.ref_point=[0.0]", "eval.ref_point"),
        ("task.objectives=[relevance]", "task.objectives"),
        ("eval.grid_step=0.3", "eval.grid_step"),
        ("sweep.grid_step=0.4", "sweep.grid_step"),
        ("eval.confidence=1.0", "eval.confidence"),
        ("task.n_objectives=1", "task.n_objectives"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_field_and_section():
    with pytest.raises(ConfigError, match="unknown config field.*stepz"):
        load_config(None, ["backbone.stepz=3"])
    with pytest.raises(ConfigError, match="unknown config field.*bogus"):
        load_config(None, ["bogus.x=1"])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="malformed"):
        load_config(None, ["backbone.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_relative_storage_path_is_made_absolute_at_load(tmp_path, monkeypatch):
    """Tune trials and Train workers run in other working dirs: a relative path must not follow them."""
    monkeypatch.chdir(tmp_path)
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    cfg = load_config(smoke, ["storage.storage_path=out"])
    assert cfg.storage.storage_path == str(tmp_path / "out")
    assert cfg.storage.run_dir == f"{tmp_path}/out/{cfg.storage.run_name}"
    uri = load_config(smoke, ["storage.storage_path=s3://bucket/runs"])
    assert uri.storage.storage_path == "s3://bucket/runs"


def test_grid_steps_that_divide_one_pass():
    for step in (1.0, 0.5, 0.25, 0.2, 0.1, 0.05):
        cfg = load_config(None, [f"eval.grid_step={step}", f"sweep.grid_step={step}"])
        assert cfg.eval.grid_step == step


def test_a_config_written_for_three_objectives_refuses_two():
    """embedded3.yaml sets task.n_objectives = 3: dropping an objective by override is refused, naming both."""
    three = Path(__file__).resolve().parents[1] / "configs" / "embedded3.yaml"
    assert load_config(three).n_objectives == 3
    with pytest.raises(ConfigError, match=r"task\.objectives.*3 objective names \(task\.n_objectives = 3\)"):
        load_config(three, ["task.objectives=[relevance,conciseness]"])


def test_config_from_dict_cross_validates():
    """Tune trials and Serve build configs with config_from_dict: the cross-field checks run there too."""
    from mage_ray.config import config_from_dict

    with pytest.raises(ConfigError, match="eval.ref_point"):
        config_from_dict({"eval": {"ref_point": [0.0]}})


@pytest.mark.parametrize(
    "override, expect",
    [
        ("task.objectives=[relevance,nosuchobj]", "unknown objective 'nosuchobj'; known: ["),
        ("eval.grid_step=0.3", "eval.grid_step"),
    ],
)
def test_jobs_refuse_bad_configs_before_ray_starts(override, expect):
    """One 'error:' line on stderr naming the field (and the known objectives), exit 2, in seconds: nothing starts."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--config", "configs/embedded.yaml", override],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
    assert "relevance" in lines[0] or "grid_step" in expect
    assert time.time() - t0 < 60


def test_every_config_field_has_a_doc_line():
    """Each dataclass field in mage_ray/config/sections.py is followed by its doc string (a doc line per
    field)."""
    import ast
    import inspect

    import mage_ray.config.sections as C

    tree = ast.parse(inspect.getsource(C))
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for i, st in enumerate(cls.body):
            if isinstance(st, ast.AnnAssign):
                nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
                doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                if not (doc and isinstance(nxt.value.value, str) and nxt.value.value.strip()):
                    missing.append(f"{cls.name}.{st.target.id}")
    assert not missing, missing


def test_renamed_field_keeps_its_old_spelling_with_one_deprecation_line(tmp_path, capsys):
    """``lora.alpha`` is now ``lora.lora_alpha`` (a bare alpha is Bone Soup's extrapolation): the old spelling
    works in YAML and as an override, each saying so on stderr once per process; the new one wins if both."""
    import mage_ray.config.load as load

    load._warned.clear()
    path = tmp_path / "old.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: 12\n")
    assert load_config(path).lora.lora_alpha == 12.0
    assert load_config(None, ["lora.alpha=6"]).lora.lora_alpha == 6.0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "deprecated: config field 'lora.alpha' is now 'lora.lora_alpha' (the old spelling still works)"
    ]
    both = tmp_path / "both.yaml"
    both.write_text("lora:\n  alpha: 12\n  lora_alpha: 20\n")
    assert load_config(both).lora.lora_alpha == 20.0


def test_config_by_shipped_name_or_path(tmp_path, monkeypatch):
    """--config NAME finds the shipped config from any directory; a file path wins over a name; anything else is
    one ConfigError listing the shipped names."""
    from mage_ray.config.load import resolve_config, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert resolve_config("smoke") == resolve_config("smoke.yaml") == shipped_configs()["smoke"]
    assert load_config("smoke").model.name_or_path == "tiny-random"
    (tmp_path / "smoke").write_text("decode:\n  max_new_tokens: 3\n")  # a file of that name here wins
    assert load_config("smoke").decode.max_new_tokens == 3
    with pytest.raises(ConfigError, match="shipped config: embedded, embedded3"):
        load_config("configs/smoke.yaml")
