"""How far the reward models of a bundle move the base policy, and how far PARM moves between preferences.

    .venv/bin/python bench/arm_spread.py --bundle runs/v5arm/bundle
    .venv/bin/python bench/arm_spread.py --bundle runs/v5arm/bundle --retrain-parm 2e-3 \\
        --config configs/embedded.yaml --rollouts runs/v5arm/rollouts        # PARM again at another lr

Measure: the mean total variation distance between next-token distributions, over every position of three fixed
prompts (chat template applied), of two rows of the engine's mixing (c = 0 is the base; an ARM is its one-hot
column; PARM at mu is (1, mu) on its components). GenARM's two ARMs show how far an objective's reward model moves
the policy; PARM(1, 0) vs PARM(0, 1) shows whether PARM's preference-dependent part moved at all (docs/results.md,
"GenARM and PARM"). ``--retrain-parm LR`` first trains a PARM with ``train_parm`` (plain process, the config's arm
section with learning rate LR) on the given rollouts into a temporary directory and measures that one instead.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--retrain-parm", type=float, default=None, metavar="LR")
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--rollouts", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    parts = parts_from_bundle(load_bundle(args.bundle), methods=["genarm", "parm"])
    parm = list(parts.parm)
    if args.retrain_parm is not None:
        from mage_ray.config import load_config
        from mage_ray.pblora import pblora_components
        from mage_ray.train.parm import train_parm

        cfg = load_config(args.config, [f"arm.learning_rate={args.retrain_parm}"])
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
    arms = list(parts.arms)
    n = len(arms)
    mixed = MixedLoraModel(parts.model, arms + parm)  # columns: ARMs, then PARM's shared + n components
    k = n + len(parm)

    def row(cols: dict[int, float]) -> list[float]:
        c = [0.0] * k
        for j, w in cols.items():
            c[j] = w
        return c

    rows = {"base": row({}), **{f"arm[{i}]": row({i: 1.0}) for i in range(n)}}
    for i in range(n):  # PARM at the one-hot preferences
        rows[f"parm(e{i})"] = row({n: 1.0, n + 1 + i: 1.0})
    tok = parts.tokenizer
    logp: dict[str, list[torch.Tensor]] = {name: [] for name in rows}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok(format_prompt(tok, prompt, True), add_special_tokens=False)["input_ids"]])
            for name, c in rows.items():
                with mixed.coefficients(torch.tensor([c], dtype=torch.float32)):
                    logp[name].append(torch.log_softmax(parts.model(ids).logits[0].float(), -1))  # [L, V]

    def tv(a: str, b: str) -> float:
        return float(
            np.mean([0.5 * (x.exp() - y.exp()).abs().sum(-1).mean() for x, y in zip(logp[a], logp[b])])
        )

    pairs = [("base", f"arm[{i}]") for i in range(n)] + [("arm[0]", "arm[1]"), ("base", "parm(e0)")]
    pairs.append(("parm(e0)", "parm(e1)"))
    for a, b in pairs:
        print(f"TV({a}, {b}) = {tv(a, b):.4f}")


if __name__ == "__main__":
    main()
