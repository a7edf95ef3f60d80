"""How far the reward models of a bundle move the base policy, and how far PARM moves between preferences.

    .venv/bin/python bench/arm_spread.py --bundle runs/v5arm/bundle
    .venv/bin/python bench/arm_spread.py --bundle runs/v5arm/bundle --retrain-parm 2e-3 \\
        --config configs/embedded.yaml --rollouts runs/v5arm/rollouts        # PARM again at another lr
    .venv/bin/python bench/arm_spread.py --run /abs/runs/embedded_long --config configs/embedded_long.yaml \\
        --rollouts /abs/runs/embedded_long/rollouts --search-parm 5e-4,1e-3,2e-3,5e-3 \\
        --parm-steps 24,48,96,144,192         # before the pipeline: the smallest PARM lr / steps that pass

Measure: the mean total variation distance between next-token distributions of two rows of the engine's mixing
(c = 0 is the base; an ARM is its one-hot column; PARM at mu is (1, mu) on its components), over the positions of
three fixed prompts (chat template applied) in two ways: ``prompt`` (every prompt position) and ``response``
(the positions that predict the base policy's greedy response, 32 tokens: where decoding reads the guide).

The PARM criterion (docs/results.md): TV(PARM(1, 0), PARM(0, 1)) at response positions is at least half of
TV(ARM[0], ARM[1]), the distance between GenARM's two reward models of the same run. The script prints the
ratio and PASS / FAIL.

``--run RUN_DIR`` reads the ARMs (and PARM, when trained) of a run directory instead of a bundle, with the base
policy of ``--config``: the PARM search can run once the ARMs are trained (``jobs/train_baselines.py --which
arms``), before the pipeline trains PARM.

``--retrain-parm LR`` first trains a PARM with ``train_parm`` (plain process, the config's arm section with
learning rate LR) on the given rollouts into a temporary directory and measures that one instead.
``--search-parm LR,LR,...`` trains PARM at each learning rate in ascending order (plain process, the config's arm
section, ``--parm-steps`` as checkpoints, at most their largest), measures TV(PARM(1, 0), PARM(0, 1)) at response
positions at each checkpoint (the PBLoRA model itself at mu = (1, 0) and (0, 1)), stops a run at its first
passing checkpoint, and stops the search at the first learning rate that passes: that (lr, steps) is the
smallest learning rate, and its smallest listed step count, meeting the criterion. It prints the overrides
``arm.parm_learning_rate=LR arm.parm_steps=STEPS``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from mage_ray.bundle import load_bundle
from mage_ray.decode import parts_from_bundle
from mage_ray.lora_mix import MixedLoraModel
from mage_ray.models import format_prompt

PROMPTS = [
    "How can I save more money each month?",
    "Why do we have time zones?",
    "Suggest a healthy breakfast I can make in five minutes.",
]
RESPONSE_TOKENS = 32
CRITERION = 0.5
"""PARM's TV between its two vertices must reach this share of the TV between the two GenARM ARMs."""


class _Passed(Exception):
    """Raised from the training hook to stop a PARM run at its first passing checkpoint."""


def greedy_inputs(model, tok) -> list[tuple[torch.Tensor, int]]:
    """Per prompt: (input ids [1, L] = prompt + the base policy's greedy response of up to RESPONSE_TOKENS
    tokens, the prompt length). ``model``: the base policy (a mixed model with no coefficients set is)."""
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(format_prompt(tok, prompt, True), add_special_tokens=False)["input_ids"]
            n_prompt = len(ids)
            for _ in range(RESPONSE_TOKENS):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
            out.append((torch.tensor([ids]), n_prompt))
    return out


def tv(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """Mean over prompts of the mean over positions of 0.5 * sum |p - q| (log-probabilities [L, V] in)."""
    return float(np.mean([0.5 * (x.exp() - y.exp()).abs().sum(-1).mean() for x, y in zip(p, q)]))


def positions(logp: torch.Tensor, n_prompt: int, where: str) -> torch.Tensor:
    """The rows of a [L, V] log-probability tensor at the prompt positions (those predicting prompt tokens and
    the first response token: 0 .. n_prompt - 1) or at the response positions (n_prompt - 1 .. L - 2: each
    predicts the next response token)."""
    return logp[:n_prompt] if where == "prompt" else logp[n_prompt - 1 : -1]


def measure_bundle(parts, mixed: MixedLoraModel, inputs) -> dict[tuple[str, str, str], float]:
    """TV of every pair of interest, at prompt and response positions, through the engine's mixing (``mixed``:
    columns the ARMs, then PARM's shared + n components)."""
    n = len(parts.arms)
    k = len(mixed.adapters)

    def row(cols: dict[int, float]) -> list[float]:
        c = [0.0] * k
        for j, w in cols.items():
            c[j] = w
        return c

    rows = {"base": row({}), **{f"arm[{i}]": row({i: 1.0}) for i in range(n)}}
    for i in range(n if k > n else 0):  # PARM at the one-hot preferences
        rows[f"parm(e{i})"] = row({n: 1.0, n + 1 + i: 1.0})
    logp: dict[str, list[torch.Tensor]] = {name: [] for name in rows}
    with torch.no_grad():
        for ids, _ in inputs:
            for name, c in rows.items():
                with mixed.coefficients(torch.tensor([c], dtype=torch.float32)):
                    logp[name].append(torch.log_softmax(parts.model(ids).logits[0].float(), -1))  # [L, V]
    pairs = [("base", f"arm[{i}]") for i in range(n)] + [("arm[0]", "arm[1]")]
    if k > n:  # PARM's components are there
        pairs += [("base", "parm(e0)"), ("parm(e0)", "parm(e1)")]
    out = {}
    for where in ("prompt", "response"):
        for a, b in pairs:
            pa = [positions(x, n_p, where) for x, (_, n_p) in zip(logp[a], inputs)]
            pb = [positions(x, n_p, where) for x, (_, n_p) in zip(logp[b], inputs)]
            out[(where, a, b)] = tv(pa, pb)
    return out


def search_parm(
    cfg, rollouts: str, lrs: list[float], steps: list[int], inputs, arm_tv: float
) -> tuple | None:
    """Train PARM at each lr (ascending), measuring TV(PARM(e0), PARM(e1)) at response positions at each of
    ``steps``; return the first (lr, step, tv) that reaches CRITERION * arm_tv, or None."""
    from mage_ray.config import config_from_dict
    from mage_ray.pblora import set_preference
    from mage_ray.train.parm import build_pblora_policy, train_parm
    from mage_ray.train.ray_shell import TrainContext

    probe, _ = build_pblora_policy(cfg, cfg.n_objectives)
    probe.eval()
    n = cfg.n_objectives

    def vertex_tv(trainable: dict) -> float:
        probe.load_state_dict(trainable, strict=False)
        logp = []
        with torch.no_grad():
            for i in range(2):
                set_preference(probe, np.eye(n)[i])
                logp.append(
                    [
                        positions(torch.log_softmax(probe(ids).logits[0].float(), -1), n_p, "response")
                        for ids, n_p in inputs
                    ]
                )
        return tv(logp[0], logp[1])

    print(
        f"\nPARM search: criterion TV(PARM(e0), PARM(e1)) >= {CRITERION} x TV(ARM[0], ARM[1]) = {CRITERION * arm_tv:.4f}"
    )
    print(
        "| lr | step | loss (mean of the last 8 steps) | TV(e0, e1), response positions | ratio to the ARMs' | |"
    )
    print("|---|---|---|---|---|---|")
    for lr in sorted(lrs):
        run = config_from_dict(
            cfg.to_dict(), [f"arm.parm_learning_rate={lr}", f"arm.parm_steps={max(steps)}"]
        )
        losses: list[float] = []
        found: list[tuple] = []

        def hook(step, m, snapshot, lr=lr, losses=losses, found=found):
            losses.append(float(m["loss"]))
            if step in steps:
                d = vertex_tv(snapshot()["trainable"])
                ok = d >= CRITERION * arm_tv
                print(
                    f"| {lr:g} | {step} | {np.mean(losses[-8:]):.3f} | {d:.4f} | {d / arm_tv:.3f} | {'PASS' if ok else ''} |",
                    flush=True,
                )
                if ok:
                    found.append((lr, step, d))
                    raise _Passed

        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="parm-search-") as tmp:
            try:
                train_parm(
                    run, tmp + "/parm", rollouts_path=rollouts, ctx=TrainContext(on_step=hook, quiet=True)
                )
            except _Passed:
                pass
        print(f"(lr {lr:g}: {time.time() - t0:.0f} s)", flush=True)
        if found:
            return found[0]
    return None


def run_parts(run_dir: str, config: str):
    """What the measurement needs from a run directory without a bundle: the base policy and tokenizer (the
    config's model), the ARMs of ``<run>/arms/<objective>/adapter`` and PARM's components when ``<run>/parm`` is
    complete."""
    from types import SimpleNamespace

    from mage_ray.config import load_config
    from mage_ray.lora_mix import load_adapter
    from mage_ray.manifest import is_complete, join
    from mage_ray.models import load_policy
    from mage_ray.pblora import pblora_components
    from mage_ray.train.values import path_name

    cfg = load_config(config)
    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device="cpu")
    names = list(cfg.task.objectives)
    arms = [
        load_adapter(join(run_dir, "arms", path_name(o), "adapter"), name=f"arm{i}")
        for i, o in enumerate(names)
    ]
    parm_dir = join(run_dir, "parm")
    parm = pblora_components(join(parm_dir, "pblora"), n=len(names)) if is_complete(parm_dir) else []
    return SimpleNamespace(model=model, tokenizer=tok, arms=arms, parm=parm, objectives=names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="a bundle with GenARM's ARMs (and PARM)")
    where.add_argument(
        "--run", help="a run directory: its arms/<objective>/ (and parm/), before any bundle exists"
    )
    ap.add_argument("--retrain-parm", type=float, default=None, metavar="LR")
    ap.add_argument("--search-parm", default=None, metavar="LR,LR,...")
    ap.add_argument("--parm-steps", default="24,48,96,144,192", metavar="STEP,STEP,...")
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--rollouts", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    parts = parts_from_bundle(load_bundle(args.bundle), methods=["genarm", "parm"]) if args.bundle else None
    if parts is None:
        parts = run_parts(args.run, args.config)
    parm = list(parts.parm)
    if args.retrain_parm is not None:
        from mage_ray.config import load_config
        from mage_ray.pblora import pblora_components
        from mage_ray.train.parm import train_parm

        cfg = load_config(args.config, [f"arm.parm_learning_rate={args.retrain_parm}"])
        tmp = tempfile.TemporaryDirectory(prefix="arm_spread-")  # removed when the script ends
        out = tmp.name + "/parm"
        t0 = time.time()
        m = train_parm(cfg, out, rollouts_path=args.rollouts)
        losses = m["loss_by_step"]
        print(
            f"PARM at lr {args.retrain_parm}: {time.time() - t0:.0f} s, loss (mean of the first / last 8 steps) "
            f"{np.mean(losses[:8]):.3f} -> {np.mean(losses[-8:]):.3f}"
        )
        parm = pblora_components(out + "/pblora", n=len(parts.objectives))
    mixed = MixedLoraModel(parts.model, list(parts.arms) + parm)
    inputs = greedy_inputs(parts.model, parts.tokenizer)  # no coefficients set: the base policy
    out = measure_bundle(parts, mixed, inputs)
    for (where, a, b), d in out.items():
        print(f"TV({a}, {b}) at {where} positions = {d:.4f}")
    arm_tv = out[("response", "arm[0]", "arm[1]")]
    if parm:
        ratio = out[("response", "parm(e0)", "parm(e1)")] / arm_tv
        print(
            f"PARM criterion (response positions): TV(parm(e0), parm(e1)) / TV(arm[0], arm[1]) = {ratio:.3f} "
            f"({'PASS' if ratio >= CRITERION else 'FAIL'}: needs >= {CRITERION})"
        )
    if args.search_parm:
        from mage_ray.config import load_config

        cfg = load_config(args.config)
        lrs = [float(x) for x in args.search_parm.split(",")]
        steps = sorted(int(x) for x in args.parm_steps.split(","))
        hit = search_parm(cfg, args.rollouts, lrs, steps, inputs, arm_tv)
        if hit is None:
            print(f"\nno learning rate of {lrs} reaches the criterion within {max(steps)} steps")
        else:
            lr, step, d = hit
            print(
                f"\nsmallest passing: lr {lr:g}, {step} steps (TV {d:.4f}); overrides: "
                f"arm.parm_learning_rate={lr:g} arm.parm_steps={step}"
            )


if __name__ == "__main__":
    main()
