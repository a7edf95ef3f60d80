"""Stage 1 "Seek": train the n LoRA backbones of B(beta) concurrently (Ray Train runs inside Ray Tune).

Backbone i is trained with GRPO / RLOO (backbone.trainer) on h_i = w_i^T r, w_i = column i of
B(backbone.beta) (Eq. 11-12 of MAGE (arXiv 2510.03782)). With backbone.morlhf=true it also trains the MORLHF baseline: one
model per point mu of the eval.grid_step preference grid, on w = mu. Writes

    <run_dir>/backbones/beta_<beta>/b<i>/   adapter/, manifest.json, metrics.jsonl
    <run_dir>/morlhf/mu_<mu_1>-<mu_2>/      (same layout)

Complete backbones are skipped; an interrupted one resumes from its last Ray Train checkpoint.
Progress: one line per backbone step, e.g. ``[b0] step 3/30 | reward 0.41 | relevance 0.30 positivity 0.52
| kl 1.2e-03 | 4.3 s/step``. Config fields are set by ``section.field=value`` overrides only (no flag shadows
a field).

    mage-ray train-backbones --config configs/smoke.yaml                  # smoke run, tiny model
    mage-ray train-backbones --config configs/embedded.yaml backbone.beta=0.8 backbone.steps=6
"""

from __future__ import annotations

import time


def add_arguments(parser) -> None:
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: what fits)")
    parser.set_defaults(plan_stages=("backbones", "morlhf"))  # mage_ray.preflight's memory check


def _summary(manifests: list[dict], root: str) -> None:
    for m in manifests:
        fm = m.get("final_metrics", {})
        objs = "  ".join(
            f"{o} {fm.get(f'rewards/{o}/mean', float('nan')):.4f}" for o in m.get("objectives", [])
        )
        w = ", ".join(f"{x:.3f}" for x in m.get("w", []))
        print(
            f"  {m.get('name')}: w=({w}) steps {m.get('steps_done')}  reward {fm.get('reward', float('nan')):.4f}"
            f"  {objs}  ({m.get('wall_time_s', 0):.0f} s)"
        )
    print(f"  adapters: {root}/<name>/adapter")


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    init_ray()
    # Imported after init_ray: importing ray earlier would freeze its log settings before init_ray sets them.
    from mage_ray.soup import preference_grid
    from mage_ray.train.ray_train import train_backbones, train_morlhf

    beta = cfg.backbone.beta
    t0 = time.time()
    print(
        f"training {cfg.n_objectives} backbones of B({beta}) on {cfg.task.objectives} ({cfg.backbone.trainer})"
    )
    manifests = train_backbones(cfg, beta=beta, max_concurrent=args.max_concurrent)
    print(f"backbones done in {time.time() - t0:.0f} s:")
    _summary(manifests, f"{cfg.storage.run_dir}/backbones/beta_{beta:.4g}")
    if cfg.backbone.morlhf:
        grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
        print(f"training {len(grid)} MORLHF models (w = mu, grid step {cfg.eval.grid_step})")
        morlhf = train_morlhf(cfg, grid, max_concurrent=args.max_concurrent)
        _summary(morlhf, f"{cfg.storage.run_dir}/morlhf")
