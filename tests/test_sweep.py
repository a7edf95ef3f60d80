"""Sweep decisions: a trial replaces the config's default only when it is better beyond prompt noise."""

import numpy as np
import pytest

from mage_ray.config import load_config
from mage_ray.metrics import hypervolume
from mage_ray.soup import preference_grid
from mage_ray.sweep import decide, decision_text, rows_markdown, save_trial_rewards


@pytest.fixture
def cfg(tmp_path, repo_root):
    return load_config(
        repo_root / "configs" / "smoke.yaml",
        [
            f"storage.storage_path={tmp_path}",
            "task.objectives=[conciseness,readability]",
            "sweep.grid_step=0.5",
        ],
    )


def _trials(cfg, shifts: dict[float, float], n_prompts: int = 24, seed: int = 0) -> list[dict]:
    """Per-prompt rewards (P=3, N, 2) = a shared prompt difficulty + a per-trial shift + small noise, saved as
    each trial's file; returns the Tune-like rows (param, hv, error)."""
    rng = np.random.default_rng(seed)
    grid = preference_grid(2, 0.5)
    difficulty = rng.uniform(0.2, 0.6, size=(1, n_prompts, 1))
    rows = []
    for value, shift in shifts.items():
        X = np.clip(
            difficulty + grid[:, None, :] * 0.3 + shift + rng.normal(0, 0.05, (3, n_prompts, 2)), 0, 1
        )
        save_trial_rewards(cfg, "beta", value, X.tolist())
        rows.append({"backbone.beta": value, "hv": hypervolume(X.mean(1), [0, 0]), "error": None})
    return rows


def test_default_kept_when_the_best_trial_is_within_noise(cfg):
    """Shifts of +-0.002 against per-prompt noise of 0.05: the best trial is not distinguishable from the default
    0.7, which is kept; every row gets its HV interval and its paired difference to the default."""
    rows = _trials(cfg, {0.6: 0.002, 0.7: 0.0, 0.8: -0.002})
    chosen, decision = decide(cfg, "beta", "backbone.beta", rows, 0.7)
    assert chosen == 0.7 and decision["distinguishable"] is False and decision["default"] == 0.7
    for r in rows:
        assert (
            r["hv_lo"] <= r["hv"] <= r["hv_hi"]
            and r["diff_lo"] <= 0 <= r["diff_hi"]
            or r["backbone.beta"] == 0.7
        )
    text = decision_text("backbone.beta", decision)
    assert "not distinguishable" in text and "default is kept" in text
    rows[0]["degenerate_max"] = 0.0625
    md = rows_markdown(rows, ["backbone.beta"])
    assert "[" in md and "vs default" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, "every row has the header's number of cells"
    assert "| 6.2% |" in md


def test_clearly_better_trial_is_chosen(cfg):
    """A trial 0.1 better on every prompt beats the default beyond noise: it is chosen."""
    rows = _trials(cfg, {0.6: 0.1, 0.7: 0.0, 0.8: 0.0})
    chosen, decision = decide(cfg, "beta", "backbone.beta", rows, 0.7)
    assert chosen == 0.6 and decision["distinguishable"] is True
    assert "beyond prompt noise" in decision_text("backbone.beta", decision)


def test_missing_trial_rewards_fall_back_to_the_best_with_a_note(cfg):
    """Rows from an older run (no per-prompt files): the best point estimate, and the note says why."""
    rows = [
        {"backbone.beta": 0.6, "hv": 0.5, "error": None},
        {"backbone.beta": 0.7, "hv": 0.4, "error": None},
    ]
    chosen, decision = decide(cfg, "beta", "backbone.beta", rows, 0.7)
    assert chosen == 0.6 and "missing" in decision["note"]
    assert "0.6" in decision_text("backbone.beta", decision)


def test_claims_take_the_best_value_above_zero_while_serving_may_keep_zero(cfg):
    """Validation HV of gamma trials: 0 -> 0.62 (best), 0.5 -> 0.60, 1 -> 0.52 (default), 3 -> 0.58, 5 -> 0.595,
    plus a failed trial at 2. Serving keeps what decide() says (here it has no per-prompt files: the best point
    estimate, 0); the claims take the best gamma > 0 on validation: 0.5 (MAGE Sec 5.2.1's sets have no 0)."""
    from mage_ray.sweep import best_positive, claims_value

    hv = {0.0: 0.62, 0.5: 0.60, 1.0: 0.52, 3.0: 0.58, 5.0: 0.595}
    rows = [{"decode.gamma": g, "hv": v, "error": None} for g, v in hv.items()]
    rows.append({"decode.gamma": 2.0, "hv": None, "error": "RuntimeError: x"})
    chosen, decision = decide(cfg, "gamma", "decode.gamma", rows, 1.0)
    assert chosen == 0.0 and decision["chosen"] == 0.0
    assert best_positive(rows, "decode.gamma") == (0.5, 0.60)
    assert claims_value({"rows": rows}, "decode.gamma", 1.0) == 0.5
    assert claims_value({"rows": rows[:1]}, "decode.gamma", 1.0) == 1.0  # no candidate > 0: the fallback
    assert claims_value(None, "decode.gamma", 3.0) == 3.0  # a single candidate: no rows


def test_each_mage_variant_claims_its_own_gamma_and_the_choice_is_on_validation():
    """mage-i-m's stage prefers gamma 3 (validation HV 0.70), mage-e-m's gamma 0.2 (0.66; its gamma 3 is 0.50):
    each variant is evaluated at its own gamma, and mage-i-m, the larger validation HV, carries the MAGE claim.
    The evaluation rows: every method at the claims' alpha 0.4, the MAGE variants at their gammas, genarm at its
    own, bs once more at the serving alpha 0 as its own row."""
    from mage_ray.pipeline import evaluation_rows, mage_claims

    def rec(hv):
        return {"rows": [{"decode.gamma": g, "hv": v, "error": None} for g, v in hv.items()]}

    records = {
        "mage-i-m": rec({0.0: 0.71, 0.2: 0.6, 3.0: 0.70}),
        "mage-e-m": rec({0.0: 0.64, 0.2: 0.66, 3.0: 0.50}),
        "mage-e": rec({0.0: 0.5, 1.0: 0.9}),  # not evaluated: no say in the choice
    }
    claims = mage_claims(records, ["bs", "mage-i-m", "mage-e-m", "genarm"], default=1.0)
    assert claims["claims_gammas"] == {"mage-i-m": 3.0, "mage-e-m": 0.2, "mage-e": 1.0}
    assert claims["mage_choice"] == {
        "method": "mage-i-m",
        "validation_hv": {"mage-i-m": 0.70, "mage-e-m": 0.66},
    }
    summary = {"alpha": 0.0, "gamma": 0.0, "alpha_claims": 0.4, "method_gammas": {"genarm": 2.0}, **claims}
    labels, settings = evaluation_rows(None, ["rs", "bs", "mage-i-m", "mage-e-m", "genarm"], summary)
    assert labels == ["rs", "bs", "mage-i-m", "mage-e-m", "genarm", "bs (alpha 0)"]
    assert settings["bs"] == {"method": "bs", "alpha": 0.4, "gamma": 0.0}
    assert settings["mage-i-m"]["gamma"] == 3.0 and settings["mage-e-m"]["gamma"] == 0.2
    assert settings["genarm"]["gamma"] == 2.0
    assert settings["bs (alpha 0)"] == {"method": "bs", "alpha": 0.0, "gamma": 0.0}
    labels, _ = evaluation_rows(None, ["bs", "mage-i-m"], {**summary, "alpha_claims": 0.0})
    assert labels == ["bs", "mage-i-m"]  # serving and claims agree on alpha: no extra row


def test_guides_table_flags_a_guide_at_chance(cfg):
    """Manifests of a run's guides: the value model of conciseness ranks 22 of 24 held-out pairs right (above
    chance); the one of readability was written before held-out intervals existed (ranking accuracy 0.33 of 12
    pairs, rebuilt as 4 of 12: [0.12, 0.61], at chance); an ARM at 13 of 24 (at chance), next to the base policy's
    12 of 24. The sweep report's table lists each with its interval, the at-chance ones in bold."""
    from mage_ray.manifest import write_manifest
    from mage_ray.train.arm import arm_dir
    from mage_ray.train.guides import guide_accuracy, guides_markdown
    from mage_ray.train.values import value_model_dir
    from mage_ray.uncertainty import pair_accuracy

    write_manifest(
        value_model_dir(cfg, "conciseness"), {"val_accuracy": pair_accuracy(22, 0, 24), "val_mse": 0.5}
    )
    write_manifest(value_model_dir(cfg, "readability"), {"ranking_accuracy": 4 / 12, "n_val_pairs": 12})
    arm = {"val_accuracy": pair_accuracy(13, 0, 24), "val_accuracy_base": pair_accuracy(12, 0, 24)}
    write_manifest(arm_dir(cfg, "conciseness"), arm)
    rows = guide_accuracy(cfg)
    assert [(r["guide"], r["objective"]) for r in rows] == [
        ("value model", "conciseness"),
        ("value model", "readability"),
        ("ARM", "conciseness"),
    ]
    assert [r["accuracy"]["verdict"] for r in rows] == ["above chance", "at chance", "at chance"]
    assert rows[1]["accuracy"]["wins"] == 4 and rows[1]["accuracy"]["n_pairs"] == 12
    md = guides_markdown(rows)
    assert (
        md.count("| **at chance** |") == 2
        and "| above chance |" in md
        and "base policy 0.5 on the same pairs" in md
    )
