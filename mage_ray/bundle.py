"""The servable bundle: one relocatable directory that fully describes a MAGE system.

A bundle is what the sweep produces and what evaluation and serving load (never training state)::

    <bundle>/bundle.json                  this module's :class:`Bundle`, paths relative to <bundle>
    <bundle>/backbones/<i>_<name>/        backbone i (adapter/ + manifest.json), in B(beta) column order
    <bundle>/rs_backbones/...             optional beta = 1 backbones (Rewarded Soups experts)
    <bundle>/values/<i>_<name>/           optional explicit value models (adapter/ + value_head.safetensors)
    <bundle>/morlhf/..., modpo/..., ric/..., wrpo_backbones/...   optional baselines
    <bundle>/arms/<i>_<name>/             optional GenARM reward models (adapter/ + manifest.json), objective order
    <bundle>/parm/0_parm/                 optional PARM reward model (pblora/ + manifest.json)

``bundle.json`` fields (the bundle format): version (1), base_model, model (ModelConfig
fields), objectives, beta, alpha, gamma, default_method, backbones, rs_backbones, values,
morlhf / modpo ([{preference, adapter}]), ric ({adapter, ...} or null), wrpo_backbones, arms, parm (dir or
null), method_gammas ({method: gamma}), ref_point, created_by. :func:`load_bundle` validates all of it and checks every referenced file exists.

A bundle may live at a local path, a ``file://`` URI or an object-store URI (``s3://``, ``gs://``;
:mod:`mage_ray.storage`). :func:`build_bundle` to a URI builds it in a local scratch directory and uploads it with
bundle.json last; :func:`load_bundle` of a URI loads the node's local copy (:func:`mage_ray.storage.local_copy`,
downloaded once) and keeps the URI in :attr:`Bundle.source`, so processes on other nodes are handed the URI.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_ray.config import ConfigError, ModelConfig
from mage_ray.guidance import method_names
from mage_ray.manifest import ManifestError, read_json, read_manifest, write_json_atomic
from mage_ray.storage import atomic_dir, copy_dir, is_dir, is_file, is_uri, join, local_copy, local_path

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_VERSION",
    "Bundle",
    "BundleError",
    "adapter_path",
    "build_bundle",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FILE = "bundle.json"
BUNDLE_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VALUE_HEAD_FILE = "value_head.safetensors"
PBLORA_FILES = ("pblora_config.json", "pblora.safetensors")
"""What a PARM dir's ``pblora/`` holds (:mod:`mage_ray.pblora`)."""


class BundleError(ValueError):
    """A bundle directory or bundle.json is missing, malformed or refers to files that are not there."""


@dataclass
class Bundle:
    """Contents of ``bundle.json``. Adapter paths are relative to :attr:`root` (the bundle directory)."""

    base_model: str
    """The base policy (``model.name_or_path``) every adapter was trained on."""
    objectives: list[str]
    """Objective names, in preference-vector order (n >= 2)."""
    beta: float
    """Dominant weight of B(beta) (Eq. 12) the backbones were trained with; 1.0 = Rewarded Soups."""
    backbones: list[str]
    """n backbone dirs (adapter/ + manifest.json), column i of B(beta) = backbone i."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields (dtype, max_context, chat_template, ...); name_or_path defaults to base_model."""
    alpha: float = 0.0
    """Extrapolation (Eq. 13) chosen by the sweep."""
    gamma: float = 1.0
    """Guidance strength (Eq. 25) chosen by the sweep."""
    default_method: str = "mage-e-m"
    """Method a request gets when it names none."""
    rs_backbones: list[str] = field(default_factory=list)
    """n beta = 1 backbone dirs (one objective each), or [] (used by rs, and as MOD / MAGE-I experts)."""
    values: list[str] = field(default_factory=list)
    """n explicit value-model dirs in objective order, or [] (mage-e, mage-e-m need them)."""
    morlhf: list[dict[str, Any]] = field(default_factory=list)
    """[{preference: [n floats], adapter: dir}] one MORLHF policy per grid preference."""
    modpo: list[dict[str, Any]] = field(default_factory=list)
    """Same shape as morlhf, for MODPO policies."""
    ric: dict[str, Any] | None = None
    """{adapter: dir, ...extra fields for the RiC prompt} or None."""
    wrpo_backbones: list[str] = field(default_factory=list)
    """Backbone dirs trained with WRPO (informational / alternative backbones), or []."""
    arms: list[str] = field(default_factory=list)
    """n GenARM reward-model dirs in objective order (their manifests name the objective), or []."""
    parm: str | None = None
    """The PARM reward-model dir (``pblora/`` + manifest.json naming the objectives), or None."""
    method_gammas: dict[str, float] = field(default_factory=dict)
    """Per-method guidance strength chosen by the sweep (ARM methods: beta_r / beta); others use ``gamma``."""
    ref_point: list[float] | None = None
    """Hypervolume reference point (one per objective) used by evaluation, or None."""
    created_by: str = "mage_ray"
    """Free text: the job or user that wrote the bundle."""
    version: int = BUNDLE_VERSION
    """bundle.json format version."""
    root: Path | None = field(default=None, compare=False)
    """Local directory the bundle was loaded from / saved to: for a URI bundle its local copy (not written to
    bundle.json)."""
    source: str | None = field(default=None, compare=False)
    """The URI the bundle was loaded from (None for a local bundle; not written to bundle.json)."""

    @property
    def n_objectives(self) -> int:
        return len(self.objectives)

    @property
    def location(self) -> str:
        """Where the bundle lives, to name in messages and to hand to other processes: its URI, else its root."""
        return self.source or str(self.root)

    def model_config(self) -> ModelConfig:
        """The ModelConfig of the base policy (``model`` fields, name_or_path = base_model by default)."""
        fields_ = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - fields_)
        if unknown:
            raise BundleError(f"bundle field 'model' has unknown keys {unknown}; allowed: {sorted(fields_)}")
        kw = {"name_or_path": self.base_model, **self.model}
        try:
            return ModelConfig(**kw)
        except ConfigError as e:
            raise BundleError(f"bundle field 'model': {e}") from e

    def path(self, rel: str) -> Path:
        """Absolute path of a bundle-relative entry."""
        if self.root is None:
            raise BundleError("bundle has no root directory (load it with load_bundle or save it first)")
        return Path(self.root) / rel

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root")
        d.pop("source")
        order = [
            "version",
            "base_model",
            "model",
            "objectives",
            "beta",
            "alpha",
            "gamma",
            "default_method",
            "backbones",
            "rs_backbones",
            "values",
            "morlhf",
            "modpo",
            "ric",
            "wrpo_backbones",
            "arms",
            "parm",
            "method_gammas",
            "ref_point",
            "created_by",
        ]
        return {k: d[k] for k in order}

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], root: str | os.PathLike | None = None, source: str | None = None
    ) -> Bundle:
        known = {f.name for f in dataclasses.fields(cls)} - {"root", "source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"bundle.json has unknown fields {unknown}; allowed: {sorted(known)}")
        missing = [k for k in ("base_model", "objectives", "beta", "backbones") if k not in data]
        if missing:
            raise BundleError(f"bundle.json is missing required field(s) {missing}")
        kw = {k: data[k] for k in known if k in data}
        for k in ("rs_backbones", "values", "morlhf", "modpo", "wrpo_backbones", "arms"):
            if kw.get(k, []) is None:  # null and [] both mean "none"
                kw[k] = []
        if kw.get("method_gammas", {}) is None:
            kw["method_gammas"] = {}
        return cls(**kw, root=Path(root) if root is not None else None, source=source)


def adapter_path(directory: str | os.PathLike) -> Path:
    """The PEFT directory of an artifact dir: ``<dir>/adapter`` (shared format), or ``<dir>`` itself."""
    d = Path(directory)
    return d / "adapter" if (d / "adapter").is_dir() or not (d / ADAPTER_FILES[0]).is_file() else d


def _fail(name: str, value: Any, allowed: str) -> None:
    raise BundleError(f"bundle field '{name}' = {value!r} is invalid: expected {allowed}")


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(name, v, "a finite number")
    return float(v)


def _check_rel(name: str, rel: Any) -> str:
    if not isinstance(rel, str) or not rel.strip():
        _fail(name, rel, "a non-empty relative path")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        _fail(
            name,
            rel,
            "a path relative to the bundle directory (no absolute paths, no '..'), so the "
            "bundle stays relocatable",
        )
    return rel


def _check_adapter_dir(name: str, root: Path, rel: str, value_model: bool = False) -> None:
    d = root / _check_rel(name, rel)
    if not d.is_dir():
        raise BundleError(f"bundle field '{name}': adapter directory {str(d)!r} does not exist")
    ad = adapter_path(d)
    for f in ADAPTER_FILES:
        if not (ad / f).is_file():
            raise BundleError(f"bundle field '{name}': adapter {str(ad)!r} is missing {f}")
    if value_model and not (d / VALUE_HEAD_FILE).is_file():
        raise BundleError(f"bundle field '{name}': value model {str(d)!r} is missing {VALUE_HEAD_FILE}")


def validate_bundle(b: Bundle, check_files: bool = True) -> Bundle:
    """Check every field (and, with a root, every referenced file); raise BundleError naming the field."""
    if b.version != BUNDLE_VERSION:
        _fail("version", b.version, f"{BUNDLE_VERSION} (this mage_ray reads bundle format {BUNDLE_VERSION})")
    if not isinstance(b.base_model, str) or not b.base_model.strip():
        _fail("base_model", b.base_model, "a model name or path")
    if not isinstance(b.model, dict):
        _fail("model", b.model, "a mapping of ModelConfig fields")
    b.model_config()
    objs = b.objectives
    if not isinstance(objs, list) or len(objs) < 2 or not all(isinstance(o, str) and o for o in objs):
        _fail("objectives", objs, "a list of at least 2 objective names")
    if len(set(objs)) != len(objs):
        _fail("objectives", objs, "distinct names")
    n = len(objs)
    beta = _number("beta", b.beta)
    if not (1.0 / n < beta <= 1.0):
        _fail("beta", beta, f"a number in (1/n, 1] = ({1.0 / n:.4g}, 1] for n = {n} objectives")
    if _number("alpha", b.alpha) <= -1:
        _fail("alpha", b.alpha, "a number > -1 (Eq. 13)")
    if _number("gamma", b.gamma) < 0:
        _fail("gamma", b.gamma, "a number >= 0 (Eq. 25)")
    if b.default_method not in method_names():
        _fail("default_method", b.default_method, f"one of {method_names()}")
    for key, allowed in (("backbones", (n,)), ("rs_backbones", (0, n)), ("values", (0, n)), ("arms", (0, n))):
        v = getattr(b, key)
        if not isinstance(v, list) or len(v) not in allowed:
            _fail(key, v, f"a list of {' or '.join(map(str, allowed))} directories (one per objective)")
    if not isinstance(b.wrpo_backbones, list):
        _fail("wrpo_backbones", b.wrpo_backbones, "a list of directories")
    for key in ("morlhf", "modpo"):
        entries = getattr(b, key)
        if not isinstance(entries, list):
            _fail(key, entries, "a list of {preference, adapter} entries")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or set(e) != {"preference", "adapter"}:
                _fail(f"{key}[{i}]", e, "an object with exactly the keys 'preference' and 'adapter'")
            pref = e["preference"]
            if not isinstance(pref, list) or len(pref) != n:
                _fail(f"{key}[{i}].preference", pref, f"a list of {n} weights")
            for j, x in enumerate(pref):
                _number(f"{key}[{i}].preference[{j}]", x)
    if b.ric is not None and (not isinstance(b.ric, dict) or "adapter" not in b.ric):
        _fail("ric", b.ric, "null or an object with an 'adapter' directory")
    if b.parm is not None:
        _check_rel("parm", b.parm)
    if not isinstance(b.method_gammas, dict):
        _fail("method_gammas", b.method_gammas, "a mapping of method name -> gamma")
    for m, g in b.method_gammas.items():
        if m not in method_names():
            _fail("method_gammas", m, f"method names among {method_names()}")
        if _number(f"method_gammas.{m}", g) < 0:
            _fail(f"method_gammas.{m}", g, "a number >= 0")
    if b.ref_point is not None:
        if not isinstance(b.ref_point, list) or len(b.ref_point) != n:
            _fail("ref_point", b.ref_point, f"null or a list of {n} numbers")
        for j, x in enumerate(b.ref_point):
            _number(f"ref_point[{j}]", x)
    if not check_files:
        return b
    if b.root is None:
        raise BundleError("cannot check bundle files: the bundle has no root directory")
    root = Path(b.root)
    for key in ("backbones", "rs_backbones", "wrpo_backbones"):
        for i, rel in enumerate(getattr(b, key)):
            _check_adapter_dir(f"{key}[{i}]", root, rel)
    for i, rel in enumerate(b.values):
        _check_adapter_dir(f"values[{i}]", root, rel, value_model=True)
    for key in ("morlhf", "modpo"):
        for i, e in enumerate(getattr(b, key)):
            _check_adapter_dir(f"{key}[{i}].adapter", root, e["adapter"])
    if b.ric is not None:
        _check_adapter_dir("ric.adapter", root, b.ric["adapter"])
    for i, rel in enumerate(b.arms):
        _check_adapter_dir(f"arms[{i}]", root, rel)
        _check_trained_for(f"arms[{i}]", root / rel, [objs[i]], "objective")
    if b.parm is not None:
        d = root / b.parm
        for f in PBLORA_FILES:
            if not (d / "pblora" / f).is_file():
                raise BundleError(f"bundle field 'parm': PARM reward model {str(d)!r} is missing pblora/{f}")
        _check_trained_for("parm", d, objs, "objectives")
    return b


def _check_trained_for(name: str, d: Path, objectives: list[str], key: str) -> None:
    """A reward model's manifest must name the bundle's objective(s) (``objective`` or ``objectives``) in order."""
    try:
        m = read_manifest(d) or {}
    except ManifestError as e:
        raise BundleError(f"bundle field '{name}': {e}") from e
    got = [m.get("objective")] if key == "objective" else m.get("objectives")
    if got != objectives:
        raise BundleError(
            f"bundle field '{name}': {str(d)!r} was trained for {key} {got}, but the bundle's objectives say "
            f"{objectives if key == 'objectives' else objectives[0]!r}: rebuild the bundle with reward models "
            "trained for these objectives"
        )


def _load_uri(uri: str, cache_dir: str | os.PathLike | None) -> Bundle:
    """Validate ``<uri>/bundle.json`` against the node's local copy of the bundle (downloaded once)."""
    uri = uri.rstrip("/")
    if uri.endswith("/" + BUNDLE_FILE):
        uri = uri[: -len(BUNDLE_FILE) - 1]
    try:
        if not is_file(join(uri, BUNDLE_FILE)):
            raise BundleError(f"{uri!r} is not a bundle: it has no {BUNDLE_FILE}")
        root = local_copy(uri, cache_dir)
    except OSError as e:  # no such bucket, no credentials, endpoint unreachable
        raise BundleError(f"cannot read bundle {uri!r}: {e}") from e
    try:
        data = read_json(root / BUNDLE_FILE)
        return validate_bundle(Bundle.from_json(data, root=root, source=uri))
    except (ManifestError, BundleError) as e:
        raise BundleError(f"bundle {uri!r} (local copy {str(root)!r}): {e}") from e


def load_bundle(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Bundle:
    """Read and validate ``<path>/bundle.json`` (``path`` may also be the bundle.json file itself).

    ``path`` is a local directory, ``file://`` or an object-store URI; a URI bundle is loaded from its local copy
    (:func:`mage_ray.storage.local_copy` into ``cache_dir``, default the node's temp dir).
    """
    if is_uri(path):
        return _load_uri(str(path), cache_dir)
    p = local_path(path)
    if p.is_file() and p.name == BUNDLE_FILE:
        p = p.parent
    if not p.is_dir():
        raise BundleError(f"bundle directory {str(p)!r} does not exist")
    if not (p / BUNDLE_FILE).is_file():
        raise BundleError(f"{str(p)!r} is not a bundle: it has no {BUNDLE_FILE}")
    try:
        data = read_json(p / BUNDLE_FILE)
    except ManifestError as e:
        raise BundleError(str(e)) from e
    return validate_bundle(Bundle.from_json(data, root=p.resolve()))


def save_bundle(bundle: Bundle, path: str | os.PathLike | None = None) -> str | Path:
    """Validate and atomically write ``<path>/bundle.json`` (default: where the bundle was loaded from, its
    :attr:`Bundle.location`); return the directory.

    The adapter directories must already be inside ``path`` (see :func:`build_bundle` to copy them in); for a URI
    they are checked in its local copy.
    """
    dest = str(path) if path is not None else (bundle.source or bundle.root)
    if dest is None:
        raise BundleError("save_bundle needs a path (the bundle has no root)")
    root = local_copy(dest).resolve()
    validate_bundle(dataclasses.replace(bundle, root=root))
    write_json_atomic(join(dest, BUNDLE_FILE), bundle.to_json())
    return str(dest) if is_uri(dest) else root


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _copy_in(src: str | os.PathLike, tmp: Path, rel: str, name: str) -> str:
    """Copy artifact directory ``src`` (local or URI) to ``<tmp>/<rel>``."""
    if not is_dir(src):
        raise BundleError(f"build_bundle: {name} directory {str(src)!r} does not exist")
    copy_dir(src, tmp / rel)
    return rel


def build_bundle(
    out_dir: str | os.PathLike,
    *,
    model: ModelConfig | Mapping[str, Any] | str,
    objectives: Sequence[str],
    beta: float,
    backbones: Sequence[str | os.PathLike],
    alpha: float = 0.0,
    gamma: float = 1.0,
    default_method: str = "mage-e-m",
    rs_backbones: Sequence[str | os.PathLike] = (),
    values: Sequence[str | os.PathLike] = (),
    morlhf: Sequence[tuple[Sequence[float], str | os.PathLike] | Mapping[str, Any]] = (),
    modpo: Sequence[tuple[Sequence[float], str | os.PathLike] | Mapping[str, Any]] = (),
    ric: str | os.PathLike | Mapping[str, Any] | None = None,
    wrpo_backbones: Sequence[str | os.PathLike] = (),
    arms: Sequence[str | os.PathLike] = (),
    parm: str | os.PathLike | None = None,
    method_gammas: Mapping[str, float] | None = None,
    ref_point: Sequence[float] | None = None,
    created_by: str = "mage_ray",
) -> Bundle:
    """Copy the given artifact directories (local or URIs) into a new bundle at ``out_dir`` and write bundle.json.

    Built in a temporary sibling and swapped into place, so ``out_dir`` is either the complete new bundle or
    untouched; an ``out_dir`` URI is built in a scratch directory and uploaded with bundle.json last
    (:func:`mage_ray.storage.atomic_dir`). ``model`` is a ModelConfig, a dict of its fields or a ``name_or_path`` string. morlhf / modpo
    entries are ``(preference, dir)`` pairs or ``{preference, adapter}`` dicts; ``ric`` is a dir or a dict
    with an ``adapter`` dir plus extra fields kept in bundle.json. Returns the loaded (validated) bundle.
    """
    if isinstance(model, str):
        model = ModelConfig(name_or_path=model)
    mdict = dataclasses.asdict(model) if isinstance(model, ModelConfig) else dict(model)
    base_model = mdict.get("name_or_path")
    if not base_model:
        raise BundleError("build_bundle: model needs a name_or_path")
    objectives = list(objectives)
    out = str(out_dir) if is_uri(out_dir) else local_path(out_dir)

    def grid(entries, key: str) -> list[tuple[list[float], Any]]:
        res = []
        for i, e in enumerate(entries):
            pref, src = (e["preference"], e["adapter"]) if isinstance(e, Mapping) else e
            res.append(([float(x) for x in pref], src))
            if len(res[-1][0]) != len(objectives):
                _fail(f"{key}[{i}].preference", pref, f"a list of {len(objectives)} weights")
        return res

    morlhf_e, modpo_e = grid(morlhf, "morlhf"), grid(modpo, "modpo")
    with atomic_dir(out) as tmp:

        def group(key: str, srcs) -> list[str]:
            return [
                _copy_in(s, tmp, f"{key}/{i}_{_slug(Path(s).name)}", f"{key}[{i}]")
                for i, s in enumerate(srcs)
            ]

        def grid_copy(key: str, entries) -> list[dict[str, Any]]:
            return [
                {
                    "preference": pref,
                    "adapter": _copy_in(s, tmp, f"{key}/{i}_{_slug(Path(s).name)}", f"{key}[{i}]"),
                }
                for i, (pref, s) in enumerate(entries)
            ]

        ric_entry = None
        if ric is not None:
            ric_entry = dict(ric) if isinstance(ric, Mapping) else {"adapter": ric}
            ric_entry["adapter"] = _copy_in(ric_entry["adapter"], tmp, "ric/0_ric", "ric")
        bundle = Bundle(
            base_model=base_model,
            model=mdict,
            objectives=objectives,
            beta=float(beta),
            alpha=float(alpha),
            gamma=float(gamma),
            default_method=default_method,
            backbones=group("backbones", backbones),
            rs_backbones=group("rs_backbones", rs_backbones),
            values=group("values", values),
            morlhf=grid_copy("morlhf", morlhf_e),
            modpo=grid_copy("modpo", modpo_e),
            ric=ric_entry,
            wrpo_backbones=group("wrpo_backbones", wrpo_backbones),
            arms=group("arms", arms),
            parm=None if parm is None else _copy_in(parm, tmp, "parm/0_parm", "parm"),
            method_gammas={str(k): float(v) for k, v in (method_gammas or {}).items()},
            ref_point=None if ref_point is None else [float(x) for x in ref_point],
            created_by=created_by,
            root=tmp,
        )
        validate_bundle(bundle)
        write_json_atomic(tmp / BUNDLE_FILE, bundle.to_json())
    return load_bundle(out)
