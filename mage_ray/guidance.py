"""Decoding methods as data: which rows a request needs and how row outputs combine into next-token scores.

Every method runs over ONE copy of the base weights. The engine loads K LoRA adapters into one
``MixedLoraModel``; a request becomes a few *rows* that carry the same tokens but their own coefficient
vector c [K] over those adapters. After the decoder body, a row yields

* ``logp`` = log_softmax(lm_head(h)) [V]                       (rows that need next-token log-probs), and/or
* ``value`` = sum_j e_j (W_j h + b_j) [V]                      (rows that carry value-head weights e [n]),

where h is the row's final normalised hidden state and W_j, b_j is objective j's explicit value head. A
:class:`Plan` then says, per request,

    log pi_base = log_softmax( sum_{(r, w) in base} w * logp_r )          [V]   (one row, w = 1: logp_r itself)
    V           = sum_{(r, kind, w) in guide} w * out_r                    [V]
    score       = log pi_base + gamma * V                                   (Eq. 25 of MAGE (arXiv 2510.03782), in log space)

Methods (mu = preference, lambda = B(beta)^-1 mu, soup(mu, a) = (1 + a) lambda, Eq. 13):

========== ============================================================== =================================
method     rows (coefficients)                                            combination
========== ============================================================== =================================
base       base c = 0                                                     log pi = logp_base
rs         c = mu on rs_backbones (beta = 1)                              log pi = logp
bs         c = soup(mu, alpha) on backbones (Bone Soup)                   log pi = logp
bs-wrpo    c = soup(mu, alpha) on wrpo_backbones (Bone Soup, WRPO Seek)   log pi = logp
mod        n experts, one-hot                                             log pi = log_softmax(sum_i w_i logp_i)
mage-e     policy (bs) + n value rows (value adapter i one-hot, head i)   V = sum_i mu_i V_i            (ensemble)
mage-e-m   policy (bs) + 1 value row (value adapters mixed by mu,         V = sum_i mu_i (W_i h + b_i)  (Eq. 24)
           merged head sum_i mu_i head_i)
mage-i     policy (bs) + ref (c = 0) + n experts one-hot                  V = sum_i w_i (logp_i - logp_ref) (Eq. 23)
mage-i-m   policy (bs) + ref + merged pi*: c = soup(mu, 0) on backbones   V = logp_pi* - logp_ref      (Eq. 23/24)
           ("bone", MAGE-I-M); c = mu with implicit_merge="naive"
           (MAGE-I-M', Sec 5.6.1)
morlhf     the MORLHF adapter trained at preference mu (one-hot)          log pi = logp
modpo      the MODPO adapter trained at preference mu (one-hot)           log pi = logp
ric        the RiC adapter, prompt rewritten by :func:`ric_prompt`        log pi = logp
genarm     base (c = 0) + n ARMs one-hot (GenARM, Xu et al. 2025)         V = sum_i mu_i logp_arm_i
genarm-m   base + 1 row: the ARMs mixed by mu (c = mu; ours, not GenARM's)  V = logp_row
parm       base + 1 row: PARM's PBLoRA at mu = its n + 1 components       V = logp_row
           mixed by c = (1, mu) (Lin et al. 2025; :mod:`mage_ray.pblora`)
========== ============================================================== =================================

ARM methods (family ``arm``) guide the frozen base policy, not a soup: GenARM's multi-objective decoding,
pi(y|x) proportional to pi_base(y|x) * prod_i pi_r,i(y|x)^(gamma mu_i), is the same score in log space with
V = sum_i mu_i log pi_r,i (per token; summed over a beam like an implicit value). The ARM is trained with reward
r = beta_r * log pi_r (``mage_ray.train.arm``), so KL-regularised decoding at strength beta gives
pi_base * exp(sum_i mu_i r_i / beta): gamma = beta_r / beta, not 1 / beta_r. beta is free at decoding time, so
gamma is swept per method (``arm.gammas``) and kept in the bundle's ``method_gammas``.

Experts (mod, mage-i): the bundle's rs_backbones (beta = 1, expert i trained on objective i alone) with
weights w = mu when it has them; otherwise the Bone Soup backbones with w = lambda = B^-1 mu, because backbone i
was trained on w_i^T r (Eq. 11) and sum_i lambda_i w_i = B lambda = mu, so the lambda-weighted ensemble targets
mu^T r. lambda may have negative entries (extrapolation), so w may be negative.

MOD (Shi et al. 2024) is the reverse-KL form: next token from sum_i w_i log pi_i, renormalised.

A method is ONE :func:`register_method` call: ``build(layout, mu, args) -> Plan`` plus its :class:`MethodSpec`
(the adapter groups it reads, the training stages that make them, its family). Config validation, bundle
loading (``mage_ray.decode.parts_from_bundle``), the pipeline's stage selection and the claims table read the
specs; no other module lists methods (docs/architecture.md, "Add a decoding method").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mage_ray.ric_format import ric_prompt_for_preference
from mage_ray.soup import merge_coefficients, soup_coefficients

__all__ = [
    "ADAPTER_GROUPS",
    "AdapterLayout",
    "FAMILIES",
    "TRAINING_STAGES",
    "groups_for",
    "method_spec",
    "stages_for",
    "MethodSpec",
    "Plan",
    "PlanArgs",
    "REGISTRY",
    "Row",
    "make_plan",
    "method_names",
    "register_method",
    "ric_prompt",
]

VALUE_KINDS = ("none", "explicit", "implicit")
"""How a method's guidance V enters a beam's sequence score (see mage_ray.decode): not at all, as the value of the
last emitted token (explicit value models estimate the final reward), or summed over tokens (implicit:
sum_t log pi*/pi_ref telescopes to V(x, y) - V(x), Eq. 21-23)."""


@dataclass(frozen=True)
class AdapterLayout:
    """Where each adapter group sits among the engine's K adapter columns."""

    k: int
    """Total adapters K (columns of the coefficient matrix)."""
    n: int
    """Number of objectives."""
    beta: float
    """B(beta) of the backbones (Eq. 12)."""
    backbones: tuple[int, ...]
    """Column of backbone i (B(beta) column order), length n."""
    rs_backbones: tuple[int, ...] = ()
    """Columns of the beta = 1 backbones, length n or 0."""
    wrpo_backbones: tuple[int, ...] = ()
    """Columns of the WRPO-trained backbones of the same B(beta), length n or 0."""
    values: tuple[int, ...] = ()
    """Columns of the explicit value models' adapters, length n or 0 (head j belongs to values[j])."""
    morlhf: tuple[tuple[tuple[float, ...], int], ...] = ()
    """(grid preference, column) of every MORLHF adapter."""
    modpo: tuple[tuple[tuple[float, ...], int], ...] = ()
    """(grid preference, column) of every MODPO adapter."""
    ric: int | None = None
    """Column of the RiC adapter, or None."""
    ric_info: Mapping[str, Any] | None = None
    """RiC manifest + bundle entry, handed to :func:`ric_prompt`."""
    arms: tuple[int, ...] = ()
    """Columns of the GenARM autoregressive reward models, objective order, length n or 0."""
    parm: tuple[int, ...] = ()
    """Columns of PARM's PBLoRA components (shared part, then objective order), length n + 1 or 0."""

    def coeffs(self, cols: Sequence[int] = (), weights: Sequence[float] | np.ndarray = ()) -> np.ndarray:
        """A coefficient vector c [K]: ``weights`` on ``cols``, zero elsewhere."""
        c = np.zeros(self.k, dtype=np.float64)  # [K]
        if len(cols):
            c[list(cols)] = np.asarray(weights, dtype=np.float64)
        return c

    def one_hot(self, col: int) -> np.ndarray:
        return self.coeffs([col], [1.0])


@dataclass
class Row:
    """One batch row of a request: its adapter coefficients and, for value rows, its head weights."""

    coeffs: np.ndarray
    """c [K] over the engine's adapters."""
    heads: np.ndarray | None = None
    """e [n]: this row's value output is sum_j e_j (W_j h + b_j); None = the row has no value output."""


@dataclass
class Plan:
    """A request's rows and how their outputs combine (see the module docstring)."""

    rows: list[Row]
    base: list[tuple[int, float]]
    """(row, w): log pi_base = log_softmax(sum w * logp_row)."""
    guide: list[tuple[int, str, float]] = field(default_factory=list)
    """(row, "logp" | "value", w): V = sum w * out_row (the engine multiplies by gamma)."""
    value_kind: str = "none"
    """One of VALUE_KINDS."""
    prompt: Any = None
    """Replacement prompt (RiC), or None to keep the request's."""

    def needs_logits(self, r: int) -> bool:
        return any(i == r for i, _ in self.base) or any(i == r and k == "logp" for i, k, _ in self.guide)

    def needs_value(self, r: int) -> bool:
        return any(i == r and k == "value" for i, k, _ in self.guide)


@dataclass(frozen=True)
class PlanArgs:
    """Request fields a method may use besides mu."""

    alpha: float = 0.0
    """Extrapolation of the Bone Soup policy row (Eq. 13)."""
    implicit_merge: str = "bone"
    """mage-i-m's pi* merge: "bone" (Bone Soup, MAGE-I-M) or "naive" (c = mu, MAGE-I-M')."""
    prompt: Any = None
    """The request's prompt (RiC rewrites it)."""


ADAPTER_GROUPS = ("rs_backbones", "wrpo_backbones", "values", "morlhf", "modpo", "ric", "arms", "parm")
"""Adapter groups a bundle may carry beside the Bone Soup backbones (one AdapterLayout field each)."""

TRAINING_STAGES = ("rs_backbones", "rollouts", "values", "morlhf", "ric", "modpo", "wrpo", "arms", "parm")
"""Pipeline stages a method may need beside the Bone Soup backbones (``mage_ray.pipeline`` runs them)."""

FAMILIES = ("base", "soup", "mage", "baseline", "arm")
"""base policy | Bone Soup / Rewarded Soups policies | MAGE (soup + guidance) | the papers' other baselines |
decoding-time guidance of the base by autoregressive reward models (GenARM, PARM)."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the system knows about one decoding method: the one description of it.

    Config validation (method names), bundle loading (which adapter groups to load) and the pipeline's stage
    selection (what to train) read these fields; nothing else lists methods.
    """

    name: str
    build: Callable[[AdapterLayout, np.ndarray | None, PlanArgs], Plan]
    """``build(layout, mu, args) -> Plan``: the request's rows and how their outputs combine."""
    needs_preference: bool = True
    """False only for methods that ignore mu (``base``)."""
    groups: tuple[str, ...] = ()
    """Adapter groups (ADAPTER_GROUPS) the plan reads besides the backbones; bundle loading loads them."""
    stages: tuple[str, ...] = ()
    """Training stages (TRAINING_STAGES) that produce those groups; the pipeline runs them."""
    family: str = "soup"
    """One of FAMILIES (the claims table compares the best ``mage`` method with ``bs``)."""
    backbones: bool = True
    """Reads the Bone Soup backbones of B(beta) (their training time counts towards the method's)."""


REGISTRY: dict[str, MethodSpec] = {}
"""Method name -> spec. Add entries with :func:`register_method`."""


def register_method(
    name: str,
    *,
    needs_preference: bool = True,
    groups: Sequence[str] = (),
    stages: Sequence[str] = (),
    family: str = "soup",
    backbones: bool = True,
):
    """Decorator: register ``build(layout, mu, args) -> Plan`` as decoding method ``name`` (see MethodSpec)."""
    bad = [g for g in groups if g not in ADAPTER_GROUPS] + [s for s in stages if s not in TRAINING_STAGES]
    if bad or family not in FAMILIES:
        raise ValueError(f"method {name!r}: unknown groups/stages {bad} or family {family!r}")

    def deco(build):
        REGISTRY[name] = MethodSpec(
            name, build, needs_preference, tuple(groups), tuple(stages), family, backbones
        )
        return build

    return deco


def method_names() -> list[str]:
    return sorted(REGISTRY)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; a ValueError naming the known methods otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"method = {name!r} is unknown: expected one of {method_names()}")
    return REGISTRY[name]


def groups_for(methods: Iterable[str]) -> set[str]:
    """Adapter groups the given methods read (what bundle loading must load)."""
    return {g for m in methods for g in method_spec(m).groups}


def stages_for(methods: Iterable[str]) -> set[str]:
    """Training stages the given methods need (what the pipeline must run)."""
    return {st for m in methods for st in method_spec(m).stages}


def ric_prompt(prompt: Any, mu: np.ndarray, manifest: Mapping[str, Any] | None) -> Any:
    """RiC (Rewards-in-Context): prepend the preference's target scores to the prompt.

    ``manifest`` is the RiC adapter's manifest.json updated with the bundle's ``ric`` entry; it holds the
    normalised score ranges and the mapping. The targets come from RiC's preference-to-reward mapping and are
    appended to the user text exactly as in training (one function, ``mage_ray.ric_format.ric_user_prompt``).
    """
    return ric_prompt_for_preference(prompt, mu, manifest)


# ----- the methods -----


def _need(cols: Sequence[int], method: str, what: str) -> None:
    if not cols:
        raise ValueError(f"method {method!r} needs {what}, which this bundle/engine does not have")


def _policy(L: AdapterLayout, mu: np.ndarray, a: PlanArgs) -> Row:
    """Bone Soup base: c = (1 + alpha) B(beta)^-1 mu on the backbones (Eq. 13)."""
    return Row(L.coeffs(L.backbones, soup_coefficients(mu, L.beta, a.alpha)))


def _experts(L: AdapterLayout, mu: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Expert columns and ensemble weights: rs_backbones with w = mu, else backbones with w = B^-1 mu."""
    if L.rs_backbones:
        return L.rs_backbones, np.asarray(mu, dtype=np.float64)
    return L.backbones, merge_coefficients(mu, beta=L.beta)


@register_method("base", needs_preference=False, family="base", backbones=False)
def _base(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    return Plan([Row(L.coeffs())], base=[(0, 1.0)])


@register_method("rs", groups=["rs_backbones"], stages=["rs_backbones"], backbones=False)
def _rs(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.rs_backbones, "rs", "rs_backbones (beta = 1 backbones)")
    return Plan([Row(L.coeffs(L.rs_backbones, mu))], base=[(0, 1.0)])


@register_method("bs")
def _bs(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    return Plan([_policy(L, mu, a)], base=[(0, 1.0)])


@register_method("bs-wrpo", groups=["wrpo_backbones"], stages=["rollouts", "wrpo"], backbones=False)
def _bs_wrpo(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.wrpo_backbones, "bs-wrpo", "wrpo_backbones (backbone.trainer = wrpo)")
    return Plan([Row(L.coeffs(L.wrpo_backbones, soup_coefficients(mu, L.beta, a.alpha)))], base=[(0, 1.0)])


@register_method("mod", groups=["rs_backbones"], stages=["rs_backbones"], family="baseline", backbones=False)
def _mod(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    cols, w = _experts(L, mu)
    return Plan([Row(L.one_hot(c)) for c in cols], base=[(i, float(w[i])) for i in range(len(cols))])


@register_method("mage-e", groups=["values"], stages=["rollouts", "values"], family="mage")
def _mage_e(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.values, "mage-e", "explicit value models (bundle 'values')")
    rows = [_policy(L, mu, a)] + [Row(L.one_hot(c), heads=np.eye(L.n)[i]) for i, c in enumerate(L.values)]
    guide = [(1 + i, "value", float(mu[i])) for i in range(L.n)]  # V = sum_i mu_i V_i
    return Plan(rows, base=[(0, 1.0)], guide=guide, value_kind="explicit")


@register_method("mage-e-m", groups=["values"], stages=["rollouts", "values"], family="mage")
def _mage_e_m(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.values, "mage-e-m", "explicit value models (bundle 'values')")
    merged = Row(L.coeffs(L.values, mu), heads=np.asarray(mu, dtype=np.float64))  # Eq. 24 on LoRA + head
    return Plan(
        [_policy(L, mu, a), merged], base=[(0, 1.0)], guide=[(1, "value", 1.0)], value_kind="explicit"
    )


@register_method("mage-i", groups=["rs_backbones"], stages=["rs_backbones"], family="mage")
def _mage_i(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    cols, w = _experts(L, mu)
    rows = [_policy(L, mu, a), Row(L.coeffs())] + [Row(L.one_hot(c)) for c in cols]
    # V = sum_i w_i (log pi_i - log pi_ref) = sum_i w_i log pi_i - (sum_i w_i) log pi_ref   (Eq. 23 per token)
    guide = [(2 + i, "logp", float(w[i])) for i in range(len(cols))] + [(1, "logp", -float(np.sum(w)))]
    return Plan(rows, base=[(0, 1.0)], guide=guide, value_kind="implicit")


@register_method("mage-i-m", family="mage")
def _mage_i_m(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    if a.implicit_merge == "bone":
        star = L.coeffs(L.backbones, soup_coefficients(mu, L.beta, 0.0))  # MAGE-I-M: Bone Soup, alpha = 0
    elif a.implicit_merge == "naive":
        star = L.coeffs(L.backbones, mu)  # MAGE-I-M' (Sec 5.6.1): naive merge c = mu
    else:
        raise ValueError(f"implicit_merge = {a.implicit_merge!r} is invalid: expected 'bone' or 'naive'")
    rows = [_policy(L, mu, a), Row(L.coeffs()), Row(star)]
    # V = log pi*_merge - log pi_ref   (Eq. 23 with the merged pi* of Eq. 24)
    return Plan(rows, base=[(0, 1.0)], guide=[(2, "logp", 1.0), (1, "logp", -1.0)], value_kind="implicit")


def _grid_adapter(entries, mu: np.ndarray, method: str) -> int:
    _need(entries, method, f"{method} adapters (bundle '{method}')")
    for pref, col in entries:
        if np.max(np.abs(np.asarray(pref) - mu)) <= 1e-6:
            return col
    raise ValueError(
        f"preference = {np.round(mu, 6).tolist()} has no {method} adapter (one per training preference); "
        f"available: {[list(p) for p, _ in entries]}"
    )


@register_method("morlhf", groups=["morlhf"], stages=["morlhf"], family="baseline", backbones=False)
def _morlhf(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    return Plan([Row(L.one_hot(_grid_adapter(L.morlhf, mu, "morlhf")))], base=[(0, 1.0)])


@register_method("modpo", groups=["modpo"], stages=["rollouts", "modpo"], family="baseline", backbones=False)
def _modpo(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    return Plan([Row(L.one_hot(_grid_adapter(L.modpo, mu, "modpo")))], base=[(0, 1.0)])


@register_method("ric", groups=["ric"], stages=["rollouts", "ric"], family="baseline", backbones=False)
def _ric(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    if L.ric is None:
        raise ValueError(
            "method 'ric' needs a RiC adapter (bundle 'ric'), which this bundle/engine does not have"
        )
    return Plan([Row(L.one_hot(L.ric))], base=[(0, 1.0)], prompt=ric_prompt(a.prompt, mu, L.ric_info))


@register_method("genarm", groups=["arms"], stages=["rollouts", "arms"], family="arm", backbones=False)
def _genarm(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.arms, "genarm", "GenARM reward models (bundle 'arms')")
    rows = [Row(L.coeffs())] + [Row(L.one_hot(c)) for c in L.arms]
    # V = sum_i mu_i log pi_r,i(y_t | x, y<t)   (GenARM, log space; gamma = beta_r / beta multiplies it)
    guide = [(1 + i, "logp", float(mu[i])) for i in range(len(L.arms))]
    return Plan(rows, base=[(0, 1.0)], guide=guide, value_kind="implicit")


@register_method("genarm-m", groups=["arms"], stages=["rollouts", "arms"], family="arm", backbones=False)
def _genarm_m(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.arms, "genarm-m", "GenARM reward models (bundle 'arms')")
    merged = Row(
        L.coeffs(L.arms, mu)
    )  # the ARMs' LoRAs mixed by mu (the MAGE merge of Eq. 24 applied to ARMs)
    return Plan([Row(L.coeffs()), merged], base=[(0, 1.0)], guide=[(1, "logp", 1.0)], value_kind="implicit")


@register_method("parm", groups=["parm"], stages=["rollouts", "parm"], family="arm", backbones=False)
def _parm(L: AdapterLayout, mu, a: PlanArgs) -> Plan:
    _need(L.parm, "parm", "a PARM reward model (bundle 'parm')")
    if len(L.parm) != L.n + 1:
        raise ValueError(f"method 'parm' needs {L.n + 1} PBLoRA components (shared + one per objective)")
    # PBLoRA at mu: dW = s (B1 W1 A1 + sum_k mu_k B2 W2_k A2), i.e. components (shared, k) with c = (1, mu)
    row = Row(L.coeffs(L.parm, np.concatenate([[1.0], np.asarray(mu, dtype=np.float64)])))
    return Plan([Row(L.coeffs()), row], base=[(0, 1.0)], guide=[(1, "logp", 1.0)], value_kind="implicit")


# ----- plan construction -----


def simplify(plan: Plan) -> Plan:
    """Drop zero-weight terms, merge identical rows (same c and head weights), drop rows nothing reads.

    E.g. mage-i-m with alpha = 0 has pi* == policy (2 rows instead of 3); mage-e at mu = (1, 0) needs only the
    first value row. Outputs are unchanged: identical rows give identical outputs.
    """
    base = [(r, w) for r, w in plan.base if w != 0.0]
    guide = [(r, k, w) for r, k, w in plan.guide if w != 0.0]
    used = sorted({r for r, _ in base} | {r for r, _, _ in guide})
    new_index: dict[int, int] = {}
    rows: list[Row] = []
    keys: list[tuple] = []
    for r in used:
        row = plan.rows[r]
        key = (
            row.coeffs.tobytes(),
            None if row.heads is None else np.asarray(row.heads, np.float64).tobytes(),
        )
        if key in keys:
            new_index[r] = keys.index(key)
        else:
            new_index[r] = len(rows)
            keys.append(key)
            rows.append(row)

    def merge(terms):
        acc: dict[tuple, float] = {}
        for t in terms:
            key = (new_index[t[0]], *t[1:-1])
            acc[key] = acc.get(key, 0.0) + t[-1]
        return [(*k, w) for k, w in acc.items() if w != 0.0]

    return Plan(rows, merge(base), merge(guide), plan.value_kind, plan.prompt)


def make_plan(
    method: str, layout: AdapterLayout, mu: np.ndarray | None, args: PlanArgs, gamma: float
) -> Plan:
    """Build and simplify the plan of one request. gamma = 0 drops the guidance rows (score = log pi_base)."""
    spec = method_spec(method)
    if spec.needs_preference and mu is None:
        raise ValueError(f"preference is required for method {method!r} (a list of {layout.n} weights)")
    plan = spec.build(layout, mu, args)
    if plan.value_kind not in VALUE_KINDS:
        raise ValueError(f"method {method!r}: value_kind {plan.value_kind!r} not in {VALUE_KINDS}")
    if gamma == 0.0:
        plan.guide = []
    for r, k, _ in plan.guide:
        if k == "value" and plan.rows[r].heads is None:
            raise ValueError(f"method {method!r}: guide reads the value of row {r}, which has no heads")
    plan = simplify(plan)
    if not plan.base:
        raise ValueError(f"method {method!r} produced no base policy rows for this preference")
    return plan
