"""Exact per-row LoRA mixing; the materialised merge and export are in :mod:`mage_ray.lora_export`.

A linear layer is linear in its weights. For LoRA deltas dW_i = s_i B_i A_i on a shared frozen W0
(Eq. 6 of MAGE (arXiv 2510.03782) on the LoRA deltas, with the Bone Soup coefficients c = scale * B(beta)^-1 mu of Eq. 13):

    (W0 + sum_i c_i s_i B_i A_i) x  =  W0 x + sum_i c_i s_i B_i (A_i x)

so a batch in which every row b has its own coefficient vector c_b runs in one forward over one copy of W0:

    y = W0 x + ((x A_cat^T) * coef_row[b]) B_cat^T
    A_cat [R, d_in] = [A_1; ...; A_K],  B_cat [d_out, R] = [B_1 ... B_K],  R = sum_i r_i
    coef_row [b, R] = c_{b,i} * s_i repeated over adapter i's r_i columns

This is PEFT's ``combination_type="cat"`` applied per row. Columns of an adapter whose coefficient is zero on
every row of the batch add exactly ``0 * B_i`` to y, so they are left out: each forward multiplies only by the
A / B columns of the adapters some row of the batch uses (gathered once per set of used adapters,
:meth:`MixedLoraModel.set_coefficients`), and a module no used adapter targets runs as plain ``W0 x``. A bundle
of many adapters (one per MORLHF / MODPO preference) then costs a batch what the adapters it mixes cost. PEFT's ``"linear"`` (and the original Rewarded
Soups code, which averages A and B separately) is *not* this: (sum_i w_i B_i)(sum_j w_j A_j) has cross terms
B_i A_j. Adapters may differ in rank and in the modules they target: a module an adapter does not target
gets no columns from it.

Only plain LoRA on ``nn.Linear`` is supported (no DoRA, LoRA bias, modules_to_save, Conv1D fan_in_fan_out or
other PEFT variants); such adapters are refused with an :class:`AdapterError` naming the config field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mage_ray.storage import local_copy

__all__ = [
    "AdapterError",
    "LoraAdapter",
    "MixedLinear",
    "MixedLoraModel",
    "adapter_from_peft",
    "load_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# "base_model.model.<module>.lora_A.weight" (PEFT strips the adapter name; tolerate ".lora_A.<name>.weight").
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# PEFT config fields that change the forward away from W0 x + s B A x; any truthy value is refused.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "fan_in_fan_out",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)


class AdapterError(ValueError):
    """An adapter cannot be loaded, saved or applied; the message names the field or module at fault."""


# ----- the adapter container -----


@dataclass
class LoraAdapter:
    """One plain LoRA adapter: dW_m = scaling[m] * B_m @ A_m for every targeted module m."""

    name: str
    """Adapter name (used in messages and as the column label of the coefficient matrix)."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Base module name ("model.layers.0.self_attn.q_proj") -> (A [r, d_in], B [d_out, r])."""
    scaling: dict[str, float]
    """Module name -> s = lora_alpha / r (lora_alpha / sqrt(r) with rslora)."""
    config: dict = field(default_factory=dict)
    """The adapter_config.json content (informational; :func:`mage_ray.lora_export.save_adapter` rewrites r / alpha / targets)."""

    def __post_init__(self) -> None:
        if not self.modules:
            raise AdapterError(f"adapter {self.name!r}: modules is empty (no LoRA weights)")
        if set(self.modules) != set(self.scaling):
            missing = sorted(set(self.modules) ^ set(self.scaling))
            raise AdapterError(
                f"adapter {self.name!r}: modules and scaling name different modules: {missing}"
            )
        for m, (A, B) in self.modules.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"adapter {self.name!r}, module {m!r}: need A [r, d_in] and B [d_out, r], "
                    f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
                )
            if not math.isfinite(self.scaling[m]):
                raise AdapterError(f"adapter {self.name!r}, module {m!r}: scaling must be finite")

    def rank(self, module: str) -> int:
        return self.modules[module][0].shape[0]

    def delta(self, module: str) -> torch.Tensor:
        """dW = s B A, shape [d_out, d_in], float32."""
        A, B = self.modules[module]
        return self.scaling[module] * (B.float() @ A.float())


def _jsonable(config: dict) -> dict:
    """A PEFT config dict with sets as sorted lists and enums as their values (what PEFT writes)."""
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _check_config(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") not in ("LORA", None):
        raise AdapterError(f"{where}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if bad:
        raise AdapterError(
            f"{where}: config field(s) {bad} are set; only plain LoRA (W0 + s B A on nn.Linear) can be mixed "
            "exactly. Set them to False/None when training."
        )


def _scaling_from_config(config: dict, module: str, r: int, where: str) -> float:
    """s = alpha / r (alpha / sqrt(r) with use_rslora), with PEFT's rank_pattern / alpha_pattern lookup."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_cfg = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", r))
    if int(r_cfg) != r:
        raise AdapterError(f"{where}, module {module!r}: config says rank {r_cfg}, tensors have rank {r}")
    if "lora_alpha" not in config:
        raise AdapterError(f"{where}: config has no 'lora_alpha'")
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Only safetensors is read: a pickled ``adapter_model.bin`` can run code on load and is refused. ``path`` may be
    a URI (:func:`mage_ray.storage.local_copy`: downloaded once).
    """
    from safetensors.torch import load_file

    path = local_copy(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist (or is not a directory)")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(config_file)!r} not found: {str(path)!r} is not a PEFT adapter directory"
        )
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{str(path)!r} holds only adapter_model.bin (pickle); load_adapter reads safetensors only. "
                "Re-save it with PeftModel.save_pretrained(..., safe_serialization=True)."
            )
        raise FileNotFoundError(f"{str(weights_file)!r} not found")
    config = json.loads(config_file.read_text())
    name = name or path.name
    _check_config(config, f"adapter {name!r} ({path})")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterError(
                f"adapter {name!r} ({path}): tensor {key!r} is not a LoRA A/B weight of a linear layer "
                "(embedding LoRA, DoRA magnitudes, modules_to_save and biases are not supported)"
            )
        (A if match["which"] == "A" else B)[match["module"]] = tensor
    if set(A) != set(B):
        raise AdapterError(
            f"adapter {name!r} ({path}): modules with only A or only B: {sorted(set(A) ^ set(B))}"
        )
    modules = {m: (A[m], B[m]) for m in sorted(A)}
    scaling = {m: _scaling_from_config(config, m, A[m].shape[0], f"adapter {name!r}") for m in modules}
    return LoraAdapter(name=name, modules=modules, scaling=scaling, config=config)


def adapter_from_peft(peft_model, adapter_name: str = "default", name: str | None = None) -> LoraAdapter:
    """Copy adapter ``adapter_name`` out of an in-memory ``PeftModel`` (the training side)."""
    from peft.tuners.lora import LoraLayer

    if adapter_name not in peft_model.peft_config:
        raise AdapterError(
            f"adapter_name {adapter_name!r} not in the PeftModel; has {sorted(peft_model.peft_config)}"
        )
    name = name or adapter_name
    config = _jsonable(peft_model.peft_config[adapter_name].to_dict())
    _check_config(config, f"adapter {name!r}")
    modules, scaling = {}, {}
    for module_name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if adapter_name in getattr(module, "merged_adapters", []):
            raise AdapterError(
                f"adapter {name!r} is merged into {module_name!r}; unmerge it before exporting"
            )
        if type(module.get_base_layer()) is not nn.Linear:
            raise AdapterError(
                f"adapter {name!r}: {module_name!r} wraps {type(module.get_base_layer()).__name__}, "
                "only nn.Linear is supported"
            )
        A = module.lora_A[adapter_name].weight.detach().clone()  # [r, d_in]
        B = module.lora_B[adapter_name].weight.detach().clone()  # [d_out, r]
        modules[module_name] = (A, B)
        scaling[module_name] = float(module.scaling[adapter_name])
    return LoraAdapter(name=name, modules=modules, scaling=scaling, config=config)


# ----- per-row mixing -----


class _MixState:
    """Coefficient state shared by all MixedLinear modules of one model.

    A *layout* is the tuple ((adapter index, rank, scaling), ...) of the adapters that target a module (plus the
    module's device and dtype); modules with the same layout share one coef_row [b, R], built once per
    :meth:`MixedLoraModel.set_coefficients`.
    """

    def __init__(self) -> None:
        # per layout: (column -> adapter index [R], column -> s_i [R], one layer using it: device and dtype)
        self.layouts: list[tuple[torch.Tensor, torch.Tensor, MixedLinear]] = []
        # per layout: coef_row [b, R_used] over the used columns, or None where no row uses an adapter of the
        # layout; rows None = base model
        self.rows: list[torch.Tensor | None] | None = None
        # per layout: the used columns (None = all R), as a key (tuple of column numbers) and an index tensor
        self.used: list[tuple[tuple[int, ...], torch.Tensor] | None] = []


class MixedLinear(nn.Linear):
    """``nn.Linear`` plus K LoRA adapters mixed with per-row coefficients.

    It shares the base layer's ``weight`` / ``bias`` parameters (state_dict keys do not change) and keeps the
    concatenated adapters as non-persistent buffers, so ``.to(device/dtype)`` moves them along.
    """

    def __init__(
        self, base: nn.Linear, A_cat: torch.Tensor, B_cat: torch.Tensor, layout: int, state: _MixState
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # W0 [d_out, d_in], shared
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_A_cat", A_cat.to(**like).contiguous(), persistent=False)  # [R, d_in]
        self.register_buffer(
            "lora_B_cat_t", B_cat.t().to(**like).contiguous(), persistent=False
        )  # [R, d_out]
        self.layout = layout
        self._state = state
        # (used-column key, the lora_A_cat it was gathered from, A_used [R_used, d_in], B_used^T [R_used, d_out])
        self._gathered: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _used_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B^T) restricted to the columns of the adapters the batch uses (all of them: the buffers as they are).

        Gathered once per set of used columns and kept until the set changes (or ``.to()`` replaced the buffers).
        """
        used = self._state.used[self.layout]
        if used is None:
            return self.lora_A_cat, self.lora_B_cat_t
        key, cols = used
        g = self._gathered
        if g is None or g[0] is not key or g[1] is not self.lora_A_cat:
            if g is not None and g[0] == key and g[1] is self.lora_A_cat:  # same columns as before: keep them
                g = self._gathered = (key, *g[1:])
            else:
                cols = cols.to(self.lora_A_cat.device)
                A = self.lora_A_cat.index_select(0, cols)  # [R_used, d_in]
                Bt = self.lora_B_cat_t.index_select(0, cols)  # [R_used, d_out]
                g = self._gathered = (key, self.lora_A_cat, A, Bt)
        return g[2], g[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # W0 x + b: [b, t, d_out]
        rows = self._state.rows
        if rows is None:
            return y
        coef = rows[self.layout]  # [b, R_used] = c_{b,i} s_i per used column
        if coef is None:  # no row uses an adapter that targets this module
            return y
        if coef.shape[0] != x.shape[0] and coef.shape[0] != 1:
            raise ValueError(
                f"coefficients have {coef.shape[0]} rows but the forward batch has {x.shape[0]}; "
                "call set_coefficients with one row per batch row"
            )
        A, Bt = self._used_weights()
        h = F.linear(x, A)  # x A_used^T: [b, t, R_used]
        h = h * coef.view(coef.shape[0], *([1] * (x.dim() - 2)), coef.shape[1])  # scale adapter i by c_bi s_i
        if not y.is_contiguous():
            return y + h @ Bt
        # y += h B_used^T, written into y ([b*t, R_used] @ [R_used, d_out]).
        y.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), Bt)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank_sum={self.lora_A_cat.shape[0]}, layout={self.layout}"


def _target_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    seen: dict[str, None] = {}
    for adapter in adapters:
        seen.update(dict.fromkeys(adapter.modules))
    return list(seen)


def _users(adapters: Sequence[LoraAdapter], model: nn.Module | None, module: str):
    """The (index, adapter) pairs that target ``module`` and, given a model, its checked nn.Linear."""
    users = [(i, a) for i, a in enumerate(adapters) if module in a.modules]
    layer = None
    if model is not None:
        for _, a in users:
            layer = _linear_for(model, module, a)
    return users, layer


def _check_adapters(adapters: Sequence[LoraAdapter]) -> list[LoraAdapter]:
    adapters = list(adapters)
    if not adapters or not all(isinstance(a, LoraAdapter) for a in adapters):
        raise AdapterError("adapters must be a non-empty list of LoraAdapter")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique, got {names}")
    return adapters


def _linear_for(model: nn.Module, module: str, adapter: LoraAdapter) -> nn.Linear:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(
            f"adapter {adapter.name!r} targets {module!r}, which the model does not have"
        ) from None
    if not isinstance(layer, nn.Linear):
        raise AdapterError(
            f"adapter {adapter.name!r} targets {module!r}, a {type(layer).__name__}, not nn.Linear"
        )
    A, B = adapter.modules[module]
    if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
        raise AdapterError(
            f"adapter {adapter.name!r}, module {module!r}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
            f"a Linear({layer.in_features} -> {layer.out_features})"
        )
    return layer


def _check_coeffs(coeffs: Sequence[float] | torch.Tensor, k: int) -> torch.Tensor:
    c = torch.as_tensor(coeffs, dtype=torch.float64).detach().cpu()
    if c.shape != (k,):
        raise ValueError(f"coeffs must have shape ({k},), one per adapter, got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError(f"coeffs must be finite, got {c.tolist()}")
    return c


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _unwrap_(model: nn.Module) -> nn.Module:
    """Swap every MixedLinear back to a plain nn.Linear holding the same parameters (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MixedLinear):
            plain = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            plain.weight, plain.bias = module.weight, module.bias
            _replace(model, name, plain)
    return model


class MixedLoraModel:
    """Wraps a base HF causal LM with K adapters; every batch row gets its own coefficient vector.

    The model is modified in place: each targeted ``nn.Linear`` becomes a :class:`MixedLinear` that shares the
    base weights. Call ``self.model`` as usual (also with ``past_key_values`` / ``use_cache=True``); the
    coefficients set by :meth:`set_coefficients` apply to every forward until changed. Coefficients are model
    state: drive one batch at a time per wrapper.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]):
        adapters = _check_adapters(adapters)
        if any(isinstance(m, MixedLinear) for m in model.modules()):
            raise AdapterError(
                "model already holds MixedLinear layers; wrap a fresh model (or unwrap() first)"
            )
        self.model = model
        self.adapters = adapters
        self.adapter_names = [a.name for a in adapters]
        self._state = _MixState()
        layout_ids: dict[tuple, int] = {}
        for module in _target_modules(adapters):
            users, layer = _users(adapters, model, module)
            segments = tuple((i, a.rank(module), a.scaling[module]) for i, a in users)
            key = (segments, layer.weight.device, layer.weight.dtype)
            A_cat = torch.cat([a.modules[module][0] for _, a in users], dim=0)  # [R, d_in]
            B_cat = torch.cat([a.modules[module][1] for _, a in users], dim=1)  # [d_out, R]
            mixed = MixedLinear(layer, A_cat, B_cat, layout_ids.setdefault(key, len(layout_ids)), self._state)
            if mixed.layout == len(self._state.layouts):  # a new layout: its column maps, kept on the CPU
                idx = torch.cat([torch.full((r,), i) for i, r, _ in segments])  # [R] adapter index
                scale = torch.cat([torch.full((r,), s, dtype=torch.float64) for _, r, s in segments])  # [R]
                self._state.layouts.append((idx, scale, mixed))
            _replace(model, module, mixed)
        self._coeffs: torch.Tensor | None = None

    @property
    def current_coefficients(self) -> torch.Tensor | None:
        """The [b, K] coefficients in force (None = base model)."""
        return self._coeffs

    def set_coefficients(self, coeffs: torch.Tensor | Sequence[Sequence[float]] | None) -> None:
        """Per-row coefficients c [b, K] for the next forwards (any finite reals); None = base model.

        A single row (b = 1) is broadcast over the batch. The forwards multiply only by the columns of the adapters
        with a non-zero coefficient on some row (module docstring).
        """
        if coeffs is None:
            self._state.rows, self._state.used, self._coeffs = None, [], None
            return
        k = len(self.adapters)
        c = torch.as_tensor(coeffs).detach()
        if c.dim() != 2 or c.shape[1] != k or c.shape[0] < 1:
            raise ValueError(
                f"coeffs must have shape [batch, {k}] (one column per adapter {self.adapter_names}), "
                f"got {tuple(c.shape)}"
            )
        if c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"coeffs must be real numbers, got dtype {c.dtype}")
        if not torch.isfinite(c).all():
            bad = torch.nonzero(~torch.isfinite(c))[:, 0].unique().tolist()
            raise ValueError(f"coeffs must be finite, got NaN/inf in rows {bad}")
        c64 = c.to(device="cpu", dtype=torch.float64)
        in_use = (c64 != 0).any(0)  # [K]: adapters some row uses
        rows: list[torch.Tensor | None] = []
        used: list[tuple[tuple[int, ...], torch.Tensor] | None] = []
        for idx, scale, layer in self._state.layouts:  # built in float64 on the CPU, then sent to the layer
            keep = in_use[idx]  # [R]: columns of used adapters
            if bool(keep.all()):
                row, u = c64[:, idx] * scale, None  # coef_row [b, R] = c_{b,i} s_i
            elif not bool(keep.any()):
                rows.append(None)
                used.append(None)
                continue
            else:
                cols = keep.nonzero().squeeze(1)  # [R_used]
                row = c64[:, idx[cols]] * scale[cols]  # coef_row [b, R_used]
                u = (tuple(cols.tolist()), cols.to(layer.lora_A_cat.device))
            rows.append(row.to(device=layer.lora_A_cat.device, dtype=layer.lora_A_cat.dtype).contiguous())
            used.append(u)
        self._state.rows, self._state.used, self._coeffs = rows, used, c

    @contextmanager
    def coefficients(self, coeffs) -> Iterator[MixedLoraModel]:
        """``with mixed.coefficients(c): mixed.model(...)``; resets to the base model (None) on exit."""
        self.set_coefficients(coeffs)
        try:
            yield self
        finally:
            self.set_coefficients(None)

    def unwrap(self) -> nn.Module:
        """Restore plain nn.Linear layers in place and return the base model (this wrapper is then dead)."""
        self.set_coefficients(None)
        return _unwrap_(self.model)
