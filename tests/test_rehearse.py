"""Rehearsals: the paper configs' stage graph and Ray resource requests on logical GPUs, with tiny stand-ins.

The fast tests check the pieces (budget cuts that leave every resource field alone, the stand-ins' classes and
tokenizers, the cluster shape); the slow ones rehearse configs/hh_rlhf.yaml and configs/summary.yaml end to end and
re-introduce the GPU placement defects the rehearsal exists to catch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from mage_ray.config import config_from_dict, load_config
from mage_ray.rehearse import cluster_shape, rehearsal_overrides
from mage_ray.twins import KNOWN, TwinError, build_model_twin, family_of

RESOURCE_FIELDS = [
    ("backbone", "num_workers"),
    ("backbone", "use_gpu"),
    ("backbone", "resources_per_worker"),
    ("backbone", "placement_strategy"),
    ("backbone", "prompts_per_step"),
    ("backbone", "num_generations"),
    ("value", "num_workers"),
    ("value", "use_gpu"),
    ("value", "resources_per_worker"),
    ("value", "rollout_batch_size"),
    ("value", "batch_size"),
    ("decode", "num_cpus"),
    ("decode", "num_gpus"),
    ("decode", "batch_size"),
    ("serve", "num_cpus"),
    ("serve", "num_gpus"),
    ("serve", "max_batch_size"),
    ("task", "reward_device"),
    ("task", "objectives"),
    ("model", "name_or_path"),
    ("model", "dtype"),
    ("eval", "methods"),
]


@pytest.mark.parametrize("name", ["hh_rlhf", "summary"])
def test_rehearsal_cuts_budgets_and_keeps_every_resource_request(repo_root, tmp_path, name):
    user = load_config(repo_root / "configs" / f"{name}.yaml")
    cut = config_from_dict(user.to_dict(), rehearsal_overrides(user, str(tmp_path)))
    for section, f in RESOURCE_FIELDS:
        assert getattr(getattr(cut, section), f) == getattr(getattr(user, section), f), (section, f)
    assert cut.backbone.steps == 2 and cut.value.steps == 2 and cut.storage.storage_path == str(tmp_path)
    assert len(cut.sweep.betas) == len(cut.sweep.alphas) == len(cut.sweep.gammas) == 2  # still Tune sweeps
    assert cut.backbone.beta in cut.sweep.betas and cut.decode.gamma in cut.sweep.gammas
    gpus = cluster_shape(cut)[1]
    # the n backbone runs of a stage start together: n x workers x GPUs per worker
    assert gpus == user.n_objectives * user.backbone.num_workers * user.backbone.resources_per_worker["GPU"]


def test_stand_ins_keep_the_class_and_the_special_tokens(tmp_path):
    """A BART twin's tokenizer adds </s> as BART's does (its classifier pools at the </s> tokens), a GPT-2 twin's
    adds nothing; each scores through the real reward-model code path."""
    from mage_ray.tasks.hf_rewards import PAPER_REWARD_MODELS, score_reward_model

    texts = ["The cat sat on the mat.", "A short post about cooking dinner for friends."] * 20
    for alias in ("faithful", "helpful", "humor"):
        spec = PAPER_REWARD_MODELS[alias]
        fam = family_of(spec.model, "seqcls")
        path = build_model_twin(spec.model, fam, tmp_path / alias, texts)
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == fam.model_type and cfg["architectures"][0].endswith(
            "ForSequenceClassification"
        )
        from transformers import AutoConfig, AutoTokenizer

        assert AutoConfig.from_pretrained(path).num_labels == KNOWN[spec.model].num_labels

        ids = AutoTokenizer.from_pretrained(path)("hello there")["input_ids"]
        if fam.model_type == "bart":
            assert ids[-1] == cfg["eos_token_id"] and ids[0] == cfg["bos_token_id"]
        if fam.model_type == "gpt2":
            assert cfg["eos_token_id"] not in ids
        local = type(spec)(str(path), spec.logit_index, spec.input_format)
        scores = score_reward_model(local, ["Summarise: a post.", "Hi"], ["A summary.", "Hello!"])
        assert scores.shape == (2,) and all(abs(s) < 1e6 for s in scores)


def test_unknown_hub_id_is_refused_by_name():
    with pytest.raises(TwinError, match="no stand-in for hub id 'someone/unknown-model'"):
        family_of("someone/unknown-model")
    assert family_of("meta-llama/Llama-3.1-8B").model_type == "llama"  # by its owner


# ---------------------------------------------------------------------------------------------
# The paper configs, rehearsed end to end (slow)

WORKERS = 1
"""Ray Train workers per run in the suite's rehearsals (``--workers``): every other resource request is the
config's, and each worker still holds the config's ``resources_per_worker``. On 2 cores a run's cost is its
workers' start-up (~8 CPU-s each importing torch, transformers, TRL, Ray Train): hh_rlhf at its full shape starts
66 of them (~9.5 min here), at one worker per run 17. The full-shape rehearsals' times are in docs/cluster.md."""


def _rehearse(repo_root, config: str, out, *flags: str, patch: str = "") -> subprocess.CompletedProcess:
    """``mage-ray rehearse`` in a subprocess (it starts its own Ray); ``patch`` is Python run first, to put a
    defect back into the code for that run only."""
    code = f"{patch}\nimport sys\nfrom mage_ray.cli import main\nsys.exit(main(sys.argv[1:]))"
    cmd = [
        sys.executable,
        "-c",
        code,
        "rehearse",
        "--config",
        f"configs/{config}.yaml",
        "--out",
        str(out),
        "--workers",
        str(WORKERS),
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "RAY_ADDRESS": ""}
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def hh_rehearsal(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearse") / "hh_rlhf"
    t0 = time.time()
    # summary's rehearsal runs grid and Serve
    proc = _rehearse(repo_root, "hh_rlhf", out, "--no-grid", "--no-serve", *HH_OVERRIDES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"rehearsal of hh_rlhf: {time.time() - t0:.0f} s")
    return out, json.loads((out / "rehearsal.json").read_text())


FULL_GRAPH = (
    "beta",
    "backbones",
    "rollouts",
    "values",
    "alpha",
    "gamma",
    "morlhf",
    "evaluate",
    "grid",
    "serve",
)


HH_GRAPH = tuple(s for s in FULL_GRAPH if s not in ("rollouts", "values", "grid", "serve"))
"""The hh_rlhf rehearsal's stages in the suite: the pipeline's graph less the value-model stages (rollouts, values)
and the Ray Data grid and Serve replica after it, which summary's rehearsal runs (tests/test_rehearse_summary.py),
reading its bundle from the object store."""

HH_OVERRIDES = ("eval.methods=[bs,mage-i-m,morlhf]", "sweep.gamma_method=mage-i-m")
"""What the suite leaves out of hh_rlhf.yaml's methods: the ones that read the beta = 1 backbones (rs, mod, mage-i:
training those is a second run of the backbone stage's code with the same requests) and the ones guided by value
models (mage-e, mage-e-m: rollouts and value-model runs, the same code and requests at n = 2); summary's rehearsal
runs them. The gamma stage's decode trials are mage-i-m's. What is hh_rlhf's own: n = 3, the beta trials and their
warm start, MORLHF, the GPT-2 reward models and the hh-rlhf dataset format."""


def _check_report(report: dict, n: int, planned: tuple[str, ...] = FULL_GRAPH) -> None:
    stages = report["stages"]
    assert [s for s in planned if s in stages] == list(planned), list(stages)
    assert report["failures"] == [] and report["violations"] == []

    def models(stage: str) -> set[str]:
        return {m["model"] for m in stages[stage]["gpu_models"] if m["status"] == "ok"}

    def roles(stage: str) -> set[str]:
        return {g["role"] for g in stages[stage]["got"]}

    # every model that goes on cuda does so in a process that holds a GPU, by stage (the defects of the past)
    for st in ("alpha", "gamma"):  # decode trials hold a decode worker's GPU: engine + reward models on it
        assert "decode trial" in roles(st) and "decode engine" in models(st)
        assert sum(m.startswith("reward model") for m in models(st)) == n
        assert any(
            "GPU: 1" in r["resources"] for r in stages[st]["requested"] if r["who"].startswith("Tune trial")
        )
    if "beta" in planned:  # beta trials' validation
        assert "decode worker (task)" in roles("beta") and "decode engine" in models("beta")
        assert {"Ray Train worker", "beta trial"} <= roles("beta")
    assert "decode worker (task)" in roles("evaluate") and "decode engine" in models(
        "evaluate"
    )  # not the driver
    assert "Ray Train worker" in roles("backbones")
    if "rollouts" in planned:
        assert "rollout sampler actor" in roles("rollouts") and "rollout scorer actor" in roles("rollouts")
    if "grid" in planned:
        assert "grid decode actor" in roles("grid") and report["grid_rows"] > 0
    if "serve" in planned:
        assert "Serve engine replica" in roles("serve")
        assert report["serve_reply"]["finish_reason"] in ("length", "stop")
    assert isinstance(report["idle_gpu_stages"], list)


@pytest.mark.slow
def test_rehearse_hh_rlhf(hh_rehearsal):
    """The whole hh_rlhf graph ran with its own requests; what the pipeline produced is what a cluster run would."""
    out, report = hh_rehearsal
    _check_report(report, 3, HH_GRAPH)
    assert (out / "rehearsal.md").read_text().count("| beta |") == 1
    run = out / "runs" / "hh_rlhf"
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["base_model"] == "meta-llama/Llama-2-7b-hf"  # the config's hub id (the stand-in behind it)
    assert [len(bundle[k] or []) for k in ("backbones", "rs_backbones", "values", "morlhf")] == [3, 0, 0, 3]
    # the beta stage was a Tune sweep of two trials, each training 3 backbones at once, decided by the bootstrap
    beta = json.loads((run / "stages" / "beta.json").read_text())
    assert sorted(r["backbone.beta"] for r in beta["rows"]) == [0.6, 0.7]
    assert all(r["error"] is None and r["hv"] is not None for r in beta["rows"])
    assert beta["decision"]["chosen"] == bundle["beta"] and beta["decision"]["default"] == 0.7
    # the full backbones continued from the chosen trial's adapters (1 trial step + 1 = backbone.steps)
    warm = json.loads((run / "stages" / "backbones.json").read_text())["warm_start"]
    assert warm["steps"] == 1 and all(f"b{i}_s1" in warm["from"][i] for i in range(3))
    full = json.loads((run / "backbones" / f"beta_{bundle['beta']:g}" / "b0" / "manifest.json").read_text())
    assert full["init_adapter"] == warm["from"][0] and full["steps_done"] == 1
    # the trials' short backbones land in the run dir (not in a Tune trial's working directory)
    for b in ("0.6", "0.7"):
        for i in range(3):
            assert (run / "backbones" / f"beta_{b}" / f"b{i}_s1" / "adapter").is_dir(), (b, i)
    assert all("hv_lo" in r for r in beta["rows"])
    assert "vs default" in (run / "report" / "sweep.md").read_text()
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert {"bs", "mage-i-m", "morlhf"} <= set(metrics["methods"])
    for f in ("generations.parquet", "front.png", "metrics.md", "sweep.md", "samples.md"):
        assert (run / "report" / f).exists(), f
    # the 3 backbones of B(beta) ran at once, each worker on its own (logical) GPU
    check_runs_held_distinct_gpus(out, 3, ("backbones",))


def check_runs_held_distinct_gpus(out, n: int, stages: tuple[str, ...]) -> None:
    """The n Ray Train runs of each of ``stages`` (backbones, values) ran at once (n concurrent Tune trials), each
    worker on its own (logical) GPU: Ray hands a freed GPU out again, so runs one after the other would share one."""
    from mage_ray.rehearse import read_ledger

    ledger = read_ledger(out / "ledger")
    user = load_config(out / "config.yaml")
    for stage in stages:
        section = user.backbone if stage == "backbones" else user.value
        gpus = {
            e["pid"]: tuple(e["gpu_ids"])
            for e in ledger
            if e.get("stage") == stage and e["kind"] == "process" and e["role"] == "Ray Train worker"
        }
        n_workers = n * min(WORKERS, section.num_workers)
        assert len(gpus) == n_workers and all(len(g) == 1 for g in gpus.values()), (stage, gpus)
        assert len(set(gpus.values())) == n_workers, (stage, gpus)


def _rerun_from(out, stages: list[str]) -> None:
    """Forget ``stages`` of a finished rehearsal's run (records, Tune state, trial rewards), so a resumed
    rehearsal runs them again and skips the rest."""
    run = out / "runs" / "hh_rlhf"
    for st in stages:
        (run / "stages" / f"{st}.json").unlink(missing_ok=True)
        shutil.rmtree(run / "tune" / st, ignore_errors=True)
        shutil.rmtree(run / "sweep" / st, ignore_errors=True)


@pytest.mark.slow
def test_rehearsal_fails_when_decode_trials_reserve_no_gpu(hh_rehearsal, tmp_path, repo_root):
    """The defect that sank the first sweep trial: decode-only Tune trials reserved {CPU: 1} while the trial loads
    the reward models on task.reward_device = cuda. Put back, the rehearsal fails naming stage, process, model."""
    out = tmp_path / "hh"
    shutil.copytree(hh_rehearsal[0], out)
    _rerun_from(out, ["alpha", "gamma", "evaluate"])
    patch = "import mage_ray.pipeline as p; p.decode_trial_resources = lambda cfg: {'CPU': 1}"
    proc = _rehearse(
        repo_root, "hh_rlhf", out, "--resume", "--no-grid", "--no-serve", *HH_OVERRIDES, patch=patch
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert re.search(
        r"stage 'alpha': reward model 'Ray2333/gpt2-large-helpful-reward_model' placed on cuda in Ray worker pid \d+ "
        r"\(actor .*\), to which Ray assigned no GPU",
        line,
    ), line


@pytest.mark.slow
def test_rehearsal_fails_when_the_driver_decodes(hh_rehearsal, tmp_path, repo_root):
    """The evaluation stage built its engine in the job's driver (a GPU-less head node on a cluster)."""
    out = tmp_path / "hh"
    shutil.copytree(hh_rehearsal[0], out)
    _rerun_from(out, ["evaluate"])
    patch = "import mage_ray.evaluate as e; e.on_decode_worker = lambda decode, fn, *a, **k: fn(*a, **k)"
    proc = _rehearse(
        repo_root, "hh_rlhf", out, "--resume", "--no-grid", "--no-serve", *HH_OVERRIDES, patch=patch
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert re.search(
        r"stage 'evaluate': .* placed on cuda in the driver \(pid \d+\), to which Ray assigned no GPU", line
    )
