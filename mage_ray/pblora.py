"""PARM's preference-aware bilinear LoRA (PBLoRA; Lin et al., ICML 2025, arXiv 2505.06274) in plain torch.

One PBLoRA layer adapts a frozen ``nn.Linear`` W0 [d_out, d_in] with a preference mu on the simplex (n
objectives) as ``peft/src/peft/tuners/pblora/layer.py`` of PARM's code computes it (``_get_lora_matrices``):

    dW(mu) = s * ( B[:, :r1] W1 A[:r1] + B[:, r1:] (sum_k mu_k W2[k].view(r2, r2)) A[r1:] ),   s = alpha / r2

    A [r1+r2, d_in], B [d_out, r1+r2], W1 [r1, r1], W2 [n, r2*r2]

The first r1 ranks are shared by every preference; the last r2 carry a bilinear weight that is linear in mu.
Both parts are scaled by s = alpha / r2, as PARM's code does (``scaling = lora_alpha / r2``). Initialisation as
PARM: A, W1, W2 ``kaiming_uniform_(a=sqrt(5))``, B zeros (so dW = 0 at the start).

Because dW(mu) is linear in (1, mu_1, ..., mu_n), it is the mixture of n + 1 plain LoRAs with coefficients
(1, mu): :func:`pblora_components` returns them (A[:r1], B[:, :r1] W1) and (A[r1:], B[:, r1:] W2[k]), all with
scaling s, so :class:`mage_ray.lora_mix.MixedLoraModel` serves PARM exactly, with a preference per batch row.

Departure from PARM's layer: no LoRA dropout (PARM trains with 0.05; the per-row mixing identity only holds
without it, and the decode side never uses dropout), and only the list-of-suffixes / regex target matching of
PEFT (no ``layers_to_transform``).

Files (:func:`save_pblora` / :func:`load_pblora`): ``pblora.safetensors`` ("<module>.pblora_A", "_B", "_W1",
"_W2", float32) + ``pblora_config.json`` (r1, r2, n, alpha, scaling, target_modules, modules, objectives,
base_model).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mage_ray.lora_mix import AdapterError, LoraAdapter
from mage_ray.manifest import publish_dir, scratch_dir
from mage_ray.storage import local_copy

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PBLoraLinear",
    "apply_pblora",
    "load_pblora",
    "pblora_components",
    "pblora_modules",
    "save_pblora",
    "set_preference",
]

WEIGHTS_FILE = "pblora.safetensors"
CONFIG_FILE = "pblora_config.json"
_PARTS = ("pblora_A", "pblora_B", "pblora_W1", "pblora_W2")
_CONFIG_FIELDS = (
    "r1",
    "r2",
    "n",
    "alpha",
    "scaling",
    "target_modules",
    "modules",
    "objectives",
    "base_model",
)


class PBLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a PBLoRA delta at the preference in the ``pref`` buffer mu [n]:

        y = base(x) + x dW(mu)^T = base(x) + s * [ (x A1^T) W1^T , (x A2^T) M^T ] B^T
        M = (mu W2).view(r2, r2)

    so dW [d_out, d_in] is never materialised: the cost per token is (r1 + r2)(d_in + d_out) + r1^2 + r2^2.
    The adapter tensors are float32 parameters (PEFT's choice for low-precision bases); ``pref`` is a
    non-persistent buffer (an input, not a weight).
    """

    def __init__(self, base: nn.Linear, r1: int, r2: int, n: int, alpha: float):
        super().__init__()
        if type(base) is not nn.Linear:
            raise AdapterError(f"PBLoRA wraps nn.Linear only, got {type(base).__name__}")
        for field_name, v in (("r1", r1), ("r2", r2), ("n", n)):
            if int(v) < 1:
                raise AdapterError(f"PBLoRA {field_name} must be >= 1, got {v}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r1, self.r2, self.n, self.alpha = int(r1), int(r2), int(n), float(alpha)
        self.scaling = self.alpha / self.r2  # s = alpha / r2 (PARM: both parts)
        d_in, d_out = base.in_features, base.out_features
        dev = base.weight.device
        self.pblora_A = nn.Parameter(torch.empty(r1 + r2, d_in))  # [r1+r2, d_in]
        self.pblora_B = nn.Parameter(torch.zeros(d_out, r1 + r2))  # [d_out, r1+r2]
        self.pblora_W1 = nn.Parameter(torch.empty(r1, r1))  # [r1, r1]
        self.pblora_W2 = nn.Parameter(torch.empty(n, r2 * r2))  # [n, r2*r2]
        # PARM's reset_lora_parameters, drawn on the CPU so the values do not depend on the device
        with torch.no_grad():
            for p in (self.pblora_A, self.pblora_W1, self.pblora_W2):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.to(dev)
        self.register_buffer("pref", torch.full((n,), 1.0 / n, device=dev), persistent=False)  # mu [n]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def bilinear(self) -> torch.Tensor:
        """M(mu) = sum_k mu_k W2[k].view(r2, r2): [r2, r2]."""
        mu = self.pref.to(self.pblora_W2.dtype)  # [n]
        return (mu @ self.pblora_W2).view(self.r2, self.r2)

    def delta_weight(self) -> torch.Tensor:
        """dW(mu) = s (B1 W1 A1 + B2 M(mu) A2): [d_out, d_in] (for tests and merging; forward avoids it)."""
        r1, A, B = self.r1, self.pblora_A, self.pblora_B
        return self.scaling * (B[:, :r1] @ self.pblora_W1 @ A[:r1] + B[:, r1:] @ self.bilinear() @ A[r1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # W0 x + b: [..., d_out]
        xa = F.linear(x.to(self.pblora_A.dtype), self.pblora_A)  # x A^T: [..., r1+r2]
        h1 = F.linear(xa[..., : self.r1], self.pblora_W1)  # x A1^T W1^T: [..., r1]
        h2 = F.linear(xa[..., self.r1 :], self.bilinear())  # x A2^T M^T: [..., r2]
        delta = F.linear(torch.cat([h1, h2], dim=-1), self.pblora_B)  # [..., d_out]
        return (y + self.scaling * delta).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r1={self.r1}, r2={self.r2}, n={self.n}, scaling={self.scaling:g}"


def _targeted(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's matching: a string is a regex on the full module name, a list holds names or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def apply_pblora(
    model: nn.Module, target_modules: str | Sequence[str], r1: int, r2: int, n: int, alpha: float
) -> list[str]:
    """Replace every targeted ``nn.Linear`` of ``model`` by a :class:`PBLoraLinear` (in place) and freeze
    every other parameter; return the replaced module names. AdapterError when nothing matches or it is
    already applied.
    """
    if any(isinstance(m, PBLoraLinear) for m in model.modules()):
        raise AdapterError("model already holds PBLoRA layers; apply_pblora to a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and _targeted(name, target_modules)
    ]
    if not names:
        raise AdapterError(f"target_modules {target_modules!r} match no nn.Linear of the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PBLoraLinear(getattr(owner, child), r1, r2, n, alpha))
    return names


def pblora_modules(model: nn.Module) -> dict[str, PBLoraLinear]:
    """Module name -> PBLoRA layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PBLoraLinear)}


def set_preference(model: nn.Module, mu: Sequence[float] | torch.Tensor) -> None:
    """Write mu [n] into every PBLoRA layer's ``pref`` buffer (in place: device and dtype stay)."""
    layers = pblora_modules(model)
    if not layers:
        raise AdapterError("model has no PBLoRA layers (apply_pblora first)")
    mu = torch.as_tensor(mu, dtype=torch.float32).detach().flatten()
    for name, layer in layers.items():
        if mu.shape != layer.pref.shape:
            raise ValueError(
                f"mu has {mu.numel()} entries, PBLoRA layer {name!r} has n = {layer.n} objectives"
            )
        layer.pref.copy_(mu)


# ----- files -----


def save_pblora(
    model: nn.Module,
    out_dir: str,
    *,
    objectives: Sequence[str],
    base_model: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``pblora.safetensors`` (the PBLoRA tensors only, float32, keys "<module>.pblora_A" ...) and
    ``pblora_config.json`` to a scratch dir, then publish it to ``out_dir`` atomically; return ``out_dir``."""
    from safetensors.torch import save_file

    layers = pblora_modules(model)
    if not layers:
        raise AdapterError("model has no PBLoRA layers to save")
    first = next(iter(layers.values()))
    if len(objectives) != first.n:
        raise AdapterError(f"objectives has {len(objectives)} names, the PBLoRA has n = {first.n}")
    tensors = {
        f"{name}.{part}": getattr(layer, part).detach().float().cpu().contiguous()
        for name, layer in layers.items()
        for part in _PARTS
    }
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = {
        **(extra or {}),  # more fields (the trainer's); the ones below always win
        "r1": first.r1,
        "r2": first.r2,
        "n": first.n,
        "alpha": first.alpha,
        "scaling": first.scaling,
        "target_modules": targets,
        "modules": list(layers),
        "objectives": list(objectives),
        "base_model": base_model,
    }
    with scratch_dir("mage-pblora") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return publish_dir(tmp, out_dir)


def _check(tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> None:
    """AdapterError naming the config field or tensor key when the config and the tensors disagree."""
    missing = [f for f in _CONFIG_FIELDS if f not in config]
    if missing:
        raise AdapterError(f"{where}: {CONFIG_FILE} lacks field(s) {missing}")
    r1, r2, n = (int(config[f]) for f in ("r1", "r2", "n"))
    if len(config["objectives"]) != n:
        raise AdapterError(
            f"{where}: field 'objectives' names {len(config['objectives'])} objectives, 'n' = {n}"
        )
    expected = {f"{m}.{part}" for m in config["modules"] for part in _PARTS}
    if set(tensors) != expected:
        raise AdapterError(
            f"{where}: {WEIGHTS_FILE} keys disagree with field 'modules': missing "
            f"{sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}"
        )
    for m in config["modules"]:
        A, B, W1, W2 = (tensors[f"{m}.{part}"] for part in _PARTS)
        checks = [  # (tensor, its shape, the shape it needs, spec, the config field a mismatch contradicts)
            ("pblora_A", A.shape, (r1 + r2, A.shape[-1]), "[r1+r2, d_in]", "r1/r2"),
            ("pblora_B", B.shape, (B.shape[0], r1 + r2), "[d_out, r1+r2]", "r1/r2"),
            ("pblora_W1", W1.shape, (r1, r1), "[r1, r1]", "r1"),
            ("pblora_W2", W2.shape, (n, W2.shape[-1]), "[n, r2*r2]", "n"),
            ("pblora_W2", W2.shape, (n, r2 * r2), "[n, r2*r2]", "r2"),
        ]
        for part, got, want, spec, field_name in checks:
            if tuple(got) != tuple(want):
                raise AdapterError(
                    f"{where}: {m}.{part} has shape {tuple(got)}; field {field_name!r} of {CONFIG_FILE} "
                    f"(r1={r1}, r2={r2}, n={n}) needs {spec} = {tuple(want)}"
                )


def load_pblora(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of a :func:`save_pblora` directory; safetensors only. FileNotFoundError naming a
    missing file, AdapterError naming the field when the config and the tensors disagree."""
    from safetensors.torch import load_file

    path = local_copy(directory)  # a URI: its local copy
    if not path.is_dir():
        raise FileNotFoundError(f"PBLoRA directory {str(path)!r} does not exist (or is not a directory)")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{str(path / f)!r} not found: {str(path)!r} is not a PBLoRA directory")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{str(path / CONFIG_FILE)!r} is not valid JSON: {e}") from None
    tensors = load_file(str(path / WEIGHTS_FILE))
    _check(tensors, config, f"PBLoRA {str(path)!r}")
    return tensors, config


def pblora_components(
    pblora: str | Path | tuple[dict[str, torch.Tensor], dict[str, Any]],
    name: str = "parm",
    *,
    n: int | None = None,
) -> list[LoraAdapter]:
    """The n + 1 plain LoRAs whose per-row mixture with coefficients (1, mu_1, ..., mu_n) is dW(mu):

        component 0 ("<name>.shared"):    A[:r1], B[:, :r1] W1             scaling s
        component k ("<name>.<obj_k>"):   A[r1:], B[:, r1:] W2[k].view(r2, r2)   scaling s

    ``pblora``: a directory or a :func:`load_pblora` result. ``n``: the number of objectives the caller mixes;
    AdapterError naming field 'n' when the PBLoRA has another.
    """
    tensors, config = load_pblora(pblora) if isinstance(pblora, (str, Path)) else pblora
    _check(tensors, config, f"PBLoRA {name!r}")
    r1, r2, k = int(config["r1"]), int(config["r2"]), int(config["n"])
    if n is not None and int(n) != k:
        raise AdapterError(
            f"PBLoRA {name!r}: field 'n' = {k} objectives {config['objectives']}, requested n = {n}"
        )
    s = float(config["alpha"]) / r2
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    per_obj: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(k)]
    for m in config["modules"]:
        A, B, W1, W2 = (tensors[f"{m}.{part}"].float() for part in _PARTS)
        shared[m] = (A[:r1].clone(), B[:, :r1] @ W1)  # A [r1, d_in], B [d_out, r1]
        for i in range(k):
            per_obj[i][m] = (A[r1:].clone(), B[:, r1:] @ W2[i].view(r2, r2))  # A [r2, d_in], B [d_out, r2]
    targets = list(config["target_modules"])

    def info(r: int) -> dict[str, Any]:  # a PEFT-like config with lora_alpha / r = s
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": s * r,
            "target_modules": targets,
            "source": "pblora",
        }

    out = [LoraAdapter(f"{name}.shared", shared, dict.fromkeys(shared, s), info(r1))]
    for i, obj in enumerate(config["objectives"]):
        out.append(LoraAdapter(f"{name}.{obj}", per_obj[i], dict.fromkeys(per_obj[i], s), info(r2)))
    return out
