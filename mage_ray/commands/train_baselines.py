"""Train the baselines (RiC, MODPO, WRPO backbones) and the decoding-time reward models of GenARM and PARM.

All of them learn from the base policy's scored rollouts (``<run_dir>/rollouts``, generated first when missing)
and run as Ray Train runs (``backbone.num_workers`` workers each; several runs at once as Tune trials):

    ric    Rewards-in-Context SFT (+ ``--rounds`` - 1 online rounds) -> <run_dir>/ric/
    modpo  one MODPO policy per eval.grid_step preference          -> <run_dir>/modpo/mu_<...>/
    wrpo   the n WRPO backbones of B(beta) from source models    -> <run_dir>/backbones/beta_<b>/b<i>/
    arms   GenARM: one autoregressive reward model per objective -> <run_dir>/arms/<objective>/
    parm   PARM: one preference-aware reward model (PBLoRA)      -> <run_dir>/parm/ (pblora/, not adapter/)

Every output is ``adapter/`` (PARM: ``pblora/``) + ``manifest.json`` + ``metrics.jsonl``; complete ones are skipped, interrupted
ones resume from their last Ray Train checkpoint. WRPO sources: ``--sources`` or ``backbone.wrpo_sources``
(HF ids, model dirs, adapter dirs) plus complete non-WRPO backbones already under ``<run_dir>/backbones``.
Steps (``backbone.steps``), beta (``backbone.beta``) and the MODPO grid (``eval.grid_step``) are config fields,
set with ``key=value`` overrides.

    mage-ray train-baselines --config configs/smoke.yaml --which modpo backbone.steps=2 eval.grid_step=0.5
    mage-ray train-baselines --config configs/smoke.yaml --which wrpo --sources tiny-random:1
"""

from __future__ import annotations

import time


def add_arguments(parser) -> None:
    parser.add_argument("--which", choices=["ric", "modpo", "wrpo", "arms", "parm", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=1, help="RiC rounds (1 = offline only)")
    parser.add_argument(
        "--sources",
        default=None,
        help="WRPO: comma-separated source models / adapter dirs, instead of the discovered backbones + "
        "backbone.wrpo_sources",
    )
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: what fits)")
    parser.set_defaults(
        plan_stages=("ric", "modpo", "wrpo", "arms", "parm")
    )  # mage_ray.preflight's memory check


def _line(m: dict) -> str:
    fm = m.get("final_metrics", {})
    extra = " ".join(
        f"{k} {fm[k]:.4g}" for k in ("margin", "accuracy", "alpha") if isinstance(fm.get(k), float)
    )
    return (
        f"  {m.get('kind')} {m.get('name')}: {m.get('steps_done')} steps, "
        f"loss {fm.get('loss', float('nan')):.4f} {extra} ({m.get('wall_time_s', 0):.0f} s)"
    )


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    init_ray()
    from mage_ray.soup import preference_grid
    from mage_ray.train.preference_data import ensure_rollouts

    which = ["ric", "modpo", "wrpo", "arms", "parm"] if args.which == "all" else [args.which]
    t0 = time.time()
    rollouts = ensure_rollouts(cfg)
    print(f"rollouts ready: {rollouts} ({time.time() - t0:.0f} s)")
    for method in which:
        t = time.time()
        if method == "ric":
            from mage_ray.train.ric import train_ric_ray

            manifests = [train_ric_ray(cfg, rounds=args.rounds)]
        elif method == "modpo":
            from mage_ray.train.modpo import train_modpo_grid

            grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
            print(f"training {len(grid)} MODPO policies (grid step {cfg.eval.grid_step})")
            manifests = train_modpo_grid(cfg, grid, max_concurrent=args.max_concurrent)
        elif method == "arms":
            from mage_ray.train.arm import train_arms

            manifests = train_arms(cfg, max_concurrent=args.max_concurrent)
        elif method == "parm":
            from mage_ray.train.parm import train_parm_ray

            manifests = [train_parm_ray(cfg)]
        else:
            from mage_ray.train.wrpo import train_wrpo_backbones

            sources = args.sources.split(",") if args.sources else None
            manifests = train_wrpo_backbones(cfg, sources=sources, max_concurrent=args.max_concurrent)
        print(f"{method} done in {time.time() - t:.0f} s:")
        for m in manifests:
            print(_line(m))
