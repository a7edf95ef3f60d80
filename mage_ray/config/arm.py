"""The ``arm`` section: autoregressive reward models of GenARM (Xu et al. 2025) and PARM (Lin et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mage_ray.config.checks import _check_range

__all__ = ["ArmConfig"]


@dataclass
class ArmConfig:
    """GenARM's per-objective ARMs and PARM's one preference-aware ARM: LoRAs on the base policy trained with the
    Bradley-Terry loss on pairs of the scored rollouts (``mage_ray.train.arm``); decoded by methods ``genarm``,
    ``genarm-m`` and ``parm`` with a guidance strength gamma on log pi_r. The ARM's reward is
    r = beta_r * log pi_r (what its loss compares), so KL-regularised decoding at strength beta samples
    pi_base * exp(r / beta) = pi_base * pi_r^(beta_r / beta): gamma = beta_r / beta, a free decoding strength
    (``gammas``), not 1 / beta_r."""

    steps: int = 0
    """Optimizer steps per ARM run (GenARM: per objective; PARM: its one run, n objectives' pairs per step);
    0 = value.steps, the value models' budget."""
    batch_size: int = 0
    """Preference pairs per objective and optimizer step; 0 = value.batch_size."""
    learning_rate: float = 5e-4
    """AdamW learning rate (PARM's run.sh: 5e-4)."""
    parm_steps: int = 0
    """Optimizer steps of PARM's run; 0 = the ARMs' (``steps``)."""
    parm_learning_rate: float = 0.0
    """AdamW learning rate of PARM's run; 0 = the ARMs' (``learning_rate``)."""
    val_fraction: float = 0.1
    """Share of the rollout prompts whose pairs are held out of ARM and PARM training (the same prompts for every
    objective) to measure each guide's held-out pair accuracy."""
    beta_r: float = 0.1
    """GenARM's beta_r (not backbone.beta): the ARM reward r(x, y) = beta_r * sum_t log pi_r(y_t | x, y_<t) in the
    Bradley-Terry loss (a training temperature; decoding's exponent on pi_r is gamma = beta_r / beta, swept as
    ``gammas``)."""
    min_margin: float = 0.1
    """A pair (y_w, y_l) of an objective needs r(y_w) - r(y_l) > min_margin, in that objective's rollout std."""
    lora_r: int = 8
    """LoRA rank of each GenARM ARM."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale alpha / r) of each GenARM ARM."""
    r1: int = 4
    """PBLoRA rank of PARM's preference-independent part (run.sh: 4)."""
    r2: int = 4
    """PBLoRA rank of PARM's preference-dependent part (run.sh: 4)."""
    pblora_alpha: float = 8.0
    """PBLoRA alpha; both parts are scaled by pblora_alpha / r2, as in PARM's code (run.sh: 8)."""
    pref_sample_p: float = 0.5
    """Concentration of the symmetric Dirichlet that PARM samples one training preference per step from (0.5)."""
    gammas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    """Candidate guidance strengths gamma (the exponent on pi_r: beta_r / beta for a KL strength beta) of genarm /
    genarm-m / parm, each method's own Tune sweep on validation prompts (decode only); the chosen one is the
    method's default in the bundle."""
    seed: int = 0
    """Seed of initialisation, data order and PARM's preference samples."""

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "parm_steps"):
            _check_range(f"arm.{f}", getattr(self, f), 0, 10_000_000)
        _check_range("arm.parm_learning_rate", self.parm_learning_rate, 0, 1)
        _check_range("arm.val_fraction", self.val_fraction, 0, 1, hi_open=True)
        for f in ("lora_r", "r1", "r2"):
            _check_range(f"arm.{f}", getattr(self, f), 1, 4096)
        _check_range("arm.learning_rate", self.learning_rate, 0, 1, lo_open=True)
        _check_range("arm.beta_r", self.beta_r, 0, 1000, lo_open=True)
        _check_range("arm.min_margin", self.min_margin, 0, 1000)
        _check_range("arm.lora_alpha", self.lora_alpha, 0, None, lo_open=True)
        _check_range("arm.pblora_alpha", self.pblora_alpha, 0, None, lo_open=True)
        _check_range("arm.pref_sample_p", self.pref_sample_p, 0, 1000, lo_open=True)
        for g in self.gammas:
            _check_range("arm.gammas[]", g, 0, 1000)
