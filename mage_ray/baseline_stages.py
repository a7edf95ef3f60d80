"""Pipeline stages of the baselines and the ARM methods: MORLHF, RiC, MODPO, WRPO, GenARM's ARMs, PARM.

Each trains what the evaluated methods need (their specs' ``stages``), records itself like every stage
(:mod:`mage_ray.stages`) and is skipped when a resumed run finds its record.
"""

from __future__ import annotations

import time
from typing import Any

from mage_ray.config import Config
from mage_ray.guidance import stages_for
from mage_ray.stages import _banner, _finish, skip_done, stage_done

__all__ = ["backbone_dirs", "stage_baselines", "stage_morlhf"]


def backbone_dirs(cfg: Config, beta: float, names: list[str]) -> list[str]:
    from mage_ray.train.ray_train import backbone_dir

    return [backbone_dir(cfg, beta, nm) for nm in names]


def stage_morlhf(cfg: Config) -> list[tuple[list[float], str]]:
    from mage_ray.soup import preference_grid
    from mage_ray.train.ray_train import morlhf_dir, train_morlhf

    grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
    rec = stage_done(cfg, "morlhf")
    if not skip_done(cfg, "morlhf", rec):
        t0 = time.time()
        _banner("morlhf", f"{len(grid)} MORLHF models (w = mu) x {cfg.backbone.steps} steps")
        train_morlhf(cfg, grid)
        rec = _finish(cfg, "morlhf", {"grid": grid.tolist()}, t0)
    return [(list(map(float, mu)), morlhf_dir(cfg, mu)) for mu in grid]


def stage_baselines(cfg: Config, methods: list[str], beta: float, bb: dict) -> dict[str, Any]:
    """Train what the baselines in ``methods`` need (stages ``ric``, ``modpo``, ``wrpo``); return bundle extras.

    RiC and MODPO train on the base policy's scored rollouts (the ``rollouts`` stage); MODPO one adapter per
    evaluation-grid preference. WRPO backbones (``wrpo_b<i>`` of the chosen B(beta)) take the GRPO backbones
    of this run (the chosen beta's and the beta = 1 ones) plus ``backbone.wrpo_sources`` as source models.
    """
    from mage_ray.soup import preference_grid

    extra: dict[str, Any] = {}
    stages = stages_for(methods)
    if "ric" in stages:
        from mage_ray.train.ric import ric_dir, train_ric_ray

        rec = stage_done(cfg, "ric")
        if not skip_done(cfg, "ric", rec):
            t0 = time.time()
            _banner("ric", f"RiC: SFT on score-conditioned rollouts x {cfg.backbone.steps} steps")
            train_ric_ray(cfg)
            rec = _finish(cfg, "ric", {"dir": ric_dir(cfg)}, t0)
        extra["ric"] = rec["dir"]
    if "modpo" in stages:
        from mage_ray.train.modpo import modpo_dir, train_modpo_grid

        grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
        rec = stage_done(cfg, "modpo")
        # a new grid trains only its missing points
        if not skip_done(cfg, "modpo", rec if rec and rec.get("grid") == grid.tolist() else None):
            t0 = time.time()
            _banner("modpo", f"{len(grid)} MODPO policies (one per preference) x {cfg.backbone.steps} steps")
            train_modpo_grid(cfg, grid)
            rec = _finish(cfg, "modpo", {"grid": grid.tolist()}, t0)
        extra["modpo"] = [(list(map(float, mu)), modpo_dir(cfg, mu)) for mu in grid]
    if "wrpo" in stages:
        from mage_ray.train.wrpo import train_wrpo_backbones

        names = [f"wrpo_b{i}" for i in range(cfg.n_objectives)]
        rec = stage_done(cfg, "wrpo")
        if not skip_done(cfg, "wrpo", rec if rec and rec.get("beta") == beta else None):
            t0 = time.time()
            sources = [*bb["backbones"], *bb.get("rs_backbones", []), *cfg.backbone.wrpo_sources]
            _banner("wrpo", f"{len(names)} WRPO backbones of B({beta}) from {len(sources)} source models")
            train_wrpo_backbones(cfg, beta=beta, names=names, sources=sources)
            rec = _finish(cfg, "wrpo", {"beta": beta, "backbones": backbone_dirs(cfg, beta, names)}, t0)
        extra["wrpo_backbones"] = rec["backbones"]
    if "arms" in stages:
        from mage_ray.train.arm import arm_dir, train_arms

        rec = stage_done(cfg, "arms")
        if not skip_done(cfg, "arms", rec):
            t0 = time.time()
            _banner(
                "arms", f"{cfg.n_objectives} GenARM reward models (one per objective), Bradley-Terry pairs"
            )
            train_arms(cfg)
            rec = _finish(cfg, "arms", {"arms": [arm_dir(cfg, o) for o in cfg.task.objectives]}, t0)
        extra["arms"] = rec["arms"]
    if "parm" in stages:
        from mage_ray.train.parm import parm_dir, train_parm_ray

        rec = stage_done(cfg, "parm")
        if not skip_done(cfg, "parm", rec):
            t0 = time.time()
            _banner("parm", "one PARM reward model (PBLoRA) over Dirichlet-sampled preferences")
            train_parm_ray(cfg)
            rec = _finish(cfg, "parm", {"dir": parm_dir(cfg)}, t0)
        extra["parm"] = rec["dir"]
    return extra
