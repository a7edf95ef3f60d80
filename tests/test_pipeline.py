"""The whole chain on the smoke config: backbones -> rollouts -> value models -> sweep -> bundle -> report."""

import json

import pytest

from mage_ray.config import load_config


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_and_resume(tmp_path, repo_root):
    import ray
    from bundle_factory import make_tiny_reward_model

    from mage_ray.pipeline import run_pipeline, stage_done

    # The embedded objectives give a tiny random policy's gibberish their floor (0): score it with the two logits
    # of a tiny random reward model instead, so there are preference pairs (MODPO) and a non-zero hypervolume.
    rm = make_tiny_reward_model(tmp_path / "rm")
    cfg = load_config(
        repo_root / "configs" / "smoke.yaml",
        [
            f"storage.storage_path={tmp_path}",
            f"task.objectives=[hf:{rm}@0,hf:{rm}@1]",
            "eval.ref_point=[-10,-10]",
            # the evaluation grid is the two vertices: MODPO trains a model per grid point (2 Train runs, not 3)
            "eval.grid_step=1.0",
            # rs and mod (and their beta = 1 backbones) are left to summary's rehearsal, which runs them
            "eval.methods=[bs,mage-e-m,mage-i-m,ric,modpo,bs-wrpo]",
            "sweep.gammas=[0.0,1.0]",
            "sweep.alphas=[0.0]",
            # one beta: no beta trials here (the rehearsal of configs/hh_rlhf.yaml runs that Tune stage, its
            # decision and the warm start, tests/test_rehearse.py); this test covers the CPU path and the baselines
            "sweep.betas=[0.7]",
            # WRPO's sources: the run's backbones and a full model (a tiny one with another seed, sampled as a
            # Ray task)
            "backbone.wrpo_sources=[tiny-random:1]",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        out = run_pipeline(cfg)
        run = tmp_path / "smoke"
        bundle = json.loads((run / "bundle" / "bundle.json").read_text())
        assert bundle["beta"] == 0.7 and len(bundle["backbones"]) == 2 and len(bundle["values"]) == 2
        assert bundle["gamma"] in (0.0, 1.0) and out["gamma"] == bundle["gamma"]
        metrics = json.loads((run / "report" / "metrics.json").read_text())
        assert set(metrics["methods"]) == {
            "bs",
            "mage-e-m",
            "mage-i-m",
            "ric",
            "modpo",
            "bs-wrpo",
        }
        # the baselines trained in their own stages and joined the bundle
        assert bundle["ric"] is not None and len(bundle["modpo"]) == 2 and len(bundle["wrpo_backbones"]) == 2
        assert stage_done(cfg, "wrpo")["beta"] == bundle["beta"]
        from mage_ray.manifest import read_manifest

        # RiC, the MODPO grid and the WRPO backbones trained as Ray Train runs (their module tests train in-process)
        modpo = [json.loads(p.read_text()) for p in (run / "modpo").glob("mu_*/manifest.json")]
        assert len(modpo) == 2 and all(m["ray_train_run"] for m in modpo)
        assert read_manifest(run / "ric")["ray_train_run"]
        wrpo = [read_manifest(d) for d in stage_done(cfg, "wrpo")["backbones"]]
        assert all(m["ray_train_run"] for m in wrpo)
        assert [m["w"] for m in wrpo] == [pytest.approx([0.7, 0.3]), pytest.approx([0.3, 0.7])]
        assert all(m["trainer"] == "wrpo" and "tiny-random:1" in m["sources"] for m in wrpo)
        sampled = {p.stem for p in (run / "wrpo" / "sources").glob("*.parquet")}
        assert len(sampled) == 3 and any("tiny-random" in p for p in sampled), (
            sampled
        )  # 2 backbones + the model
        for f in ("generations.parquet", "front.png", "metrics.md", "sweep.md", "samples.md"):
            assert (run / "report" / f).exists(), f
        # every method has its degenerate rate per preference and intervals; the claims are checked
        assert all(len(m["degenerate"]) == 2 and "intervals" in m for m in metrics["methods"].values())
        assert {c["verdict"] for c in metrics["claims"]} <= {"holds", "fails", "no evidence"}
        # the claims' rows: each MAGE variant at its best gamma > 0 on validation (1.0, the only candidate > 0;
        # mage-i-m swept in its own stage), alpha 0 (no candidate > 0); serving keeps the sweep's decision
        settings = metrics["context"]["settings"]
        assert settings["mage-e-m"]["gamma"] == settings["mage-i-m"]["gamma"] == 1.0
        assert out["claims_gammas"]["mage-i-m"] == 1.0 and out["alpha_claims"] == 0.0
        assert metrics["context"]["serving"]["gamma"] == bundle["gamma"]
        assert metrics["context"]["mage_choice"]["method"] in ("mage-e-m", "mage-i-m")
        # the evaluation decoded with those settings, over the bundle's (the sweep's) defaults, not the YAML's
        import pyarrow.parquet as pq

        from mage_ray.bundle import load_bundle
        from mage_ray.decode import Engine, Request, decode_defaults

        b = load_bundle(run / "bundle")
        row = (
            pq.read_table(run / "report" / "generations.parquet")
            .to_pandas()
            .query("method == 'mage-e-m'")
            .iloc[0]
        )
        engine = Engine(b, decode_defaults(cfg, b))
        st = settings["mage-e-m"]
        again = engine.generate(
            [
                Request(
                    prompt=row.prompt,
                    preference=list(row.preference),
                    method="mage-e-m",
                    alpha=st["alpha"],
                    gamma=st["gamma"],
                )
            ]
        )
        assert again[0].text == row.response
        for stage in (
            "beta",
            "backbones",
            "rollouts",
            "values",
            "alpha",
            "gamma",
            "gamma_mage-i-m",
            "ric",
            "modpo",
            "wrpo",
            "evaluate",
        ):
            assert stage_done(cfg, stage), stage
        # A second run resumes: every stage is skipped, nothing is retrained or re-decoded.
        before = {p: p.stat().st_mtime for p in (run / "stages").iterdir()}
        run_pipeline(cfg)
        assert {p: p.stat().st_mtime for p in (run / "stages").iterdir()} == before
    finally:
        ray.shutdown()


def test_planned_stages_follow_the_methods(repo_root):
    """The stages a run goes through: the sweep's (rollouts and values only when an evaluated or swept method
    reads value models), then MORLHF and the baselines the evaluated methods need, then the evaluation."""
    from mage_ray.pipeline import planned_stages

    smoke = repo_root / "configs" / "smoke.yaml"
    cfg = load_config(smoke)  # eval.methods: rs bs mod mage-e mage-e-m mage-i mage-i-m; gamma on mage-e-m
    sweep = ["beta", "backbones", "rollouts", "values", "alpha", "gamma"]
    own = ["gamma_mage-e", "gamma_mage-i", "gamma_mage-i-m"]  # every other MAGE variant tunes its own gamma
    assert planned_stages(cfg) == [*sweep, *own, "evaluate"]
    assert planned_stages(cfg, evaluate=False) == [*sweep, *own]
    cfg = load_config(smoke, ["eval.methods=[rs,bs,mod,mage-e-m,mage-i-m,ric,modpo,bs-wrpo]"])
    assert planned_stages(cfg) == [
        *sweep,
        "gamma_mage-i-m",
        *("ric", "modpo", "wrpo", "evaluate"),
    ]  # the stages test_smoke_pipeline_end_to_end_and_resume finds recorded
    cfg = load_config(
        smoke, ["eval.methods=[bs,mage-i]", "sweep.gamma_method=mage-i-m", "backbone.morlhf=true"]
    )
    assert planned_stages(cfg) == [
        "beta",
        "backbones",
        "alpha",
        "gamma",
        "gamma_mage-i",
        "morlhf",
        "evaluate",
    ]
    cfg = load_config(smoke, ["eval.methods=[bs,genarm,genarm-m,parm]", "sweep.gamma_method=mage-i-m"])
    assert planned_stages(cfg) == [
        *("beta", "backbones", "alpha", "gamma", "arms", "parm"),
        *("gamma_genarm", "gamma_genarm-m", "gamma_parm", "evaluate"),
    ]  # each ARM method tunes its own gamma (= beta_r / beta) after its reward models are trained


def test_stage_lines_say_where_the_run_is_and_what_is_left(tmp_path, repo_root, capsys):
    """Records of beta (100 s) and backbones (200 s) exist; alpha, gamma and evaluate do not. The end line of
    backbones: its time, its place (2 of 5) and 3 stages left x the 150 s mean of the 2 finished = 450 s = 7m30s.
    A beta stage decided at once (0.4 s, one candidate) is not timed: 3 x 200 s = 10m00s."""
    from mage_ray.manifest import write_json_atomic
    from mage_ray.pipeline import StageClock

    cfg = load_config(
        repo_root / "configs" / "smoke.yaml", [f"storage.storage_path={tmp_path}", "eval.methods=[bs,mage-i]"]
    )
    stages = ["beta", "backbones", "alpha", "gamma", "evaluate"]
    clock = StageClock(cfg, stages)
    clock.start("backbones", "2 backbones")
    for stage, seconds in (("beta", 100.0), ("backbones", 200.0)):
        write_json_atomic(str(tmp_path / "smoke" / "stages" / f"{stage}.json"), {"seconds": seconds})
    clock.end("backbones", 200.0)
    start, end = capsys.readouterr().out.strip().splitlines()
    assert start.startswith("[pipeline] === backbones (stage 2/5, 0 s into this run): 2 backbones")
    assert end == (
        "[pipeline] stage 'backbones' done in 3m20s (stage 2/5, 0 s into this run); left: alpha, gamma, evaluate,"
        " about 7m30s (3 x the 2m30s mean of the 2 finished stages)"
    )
    write_json_atomic(str(tmp_path / "smoke" / "stages" / "beta.json"), {"seconds": 0.4})
    clock.end("backbones", 200.0)
    assert (
        capsys.readouterr().out.strip().endswith("about 10m00s (3 x the 3m20s mean of the 1 finished stage)")
    )
