"""Everything a job can know is wrong before Ray starts: checked in the driver, in seconds, one line each.

:func:`check` runs from :func:`mage_ray.runtime.checked_config` right after the config loads (which already
checks every field's range, the grid steps and the method names). A failed check raises :class:`PreflightError`
naming the field (or flag), which the job prints as one ``error: ...`` line before exiting with status 2. What
is checked depends on the command: its ``add_arguments`` sets ``checks`` (a tuple of the names below) as a
parser default; :func:`mage_ray.runtime.parse_job_args` defaults it to :data:`TRAINING`.

* ``storage``: the command writes to :func:`output_dir` (``--out``, else the run directory), which must not lie
  inside Ray's temporary copy of a submitted job's working directory (``ray job submit --working-dir .``
  unpacks it under ``.../runtime_resources/working_dir_files/`` and deletes it later): a relative
  ``storage.storage_path`` there puts the run's artifacts where they vanish.
* ``data``: a local ``task.data_path`` exists and holds data files (a hub dataset id is not looked up).
* ``bundle``: ``--bundle`` loads (every referenced file exists); ``bundle_objectives``: its objectives are
  ``task.objectives`` (evaluation scores with the config's objectives).
* ``grid``: ``--methods`` are known methods, every ``--preference`` (and the deprecated ``--preferences`` JSON
  list, :func:`grid_preferences`) is a point of the bundle's simplex, and the prompts (``--prompts``, else
  ``task.data_path``) exist.
* ``model``: ``model.name_or_path`` (the bundle's base model when ``bundle`` is checked too). A local directory
  must exist and hold ``config.json``; a hub id must be in the local Hugging Face cache, or else (unless
  HF_HUB_OFFLINE=1, which refuses at once) the hub must answer one metadata request within
  :data:`HUB_TIMEOUT_S` (no retries, nothing downloaded).
* ``ref_point``: objectives without a floor (reward-model logits) need ``eval.ref_point`` for hypervolume.
* ``objectives``: the model behind every reward-model objective (``hf:<id or path>`` and the paper's
  ``helpful``, ``harmless``, ...), as for ``model``. The objective names are checked for every command.
* ``vllm``: ``backbone.generation = vllm`` needs the vllm package in this Python (the ``gpu`` extra).
* ``memory``: with ``plan.gpu_memory_gib`` declared, every GPU stage the command runs (``args.plan_stages``, a
  command's choice; default: every pipeline stage) fits it by :mod:`mage_ray.stage_plan`'s plan, minus
  ``plan.reserve_gib``; the error names the field to lower and the largest value that fits. Stages on CPU and
  configs without a declared GPU memory are never refused.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from pathlib import Path

from mage_ray.bundle import Bundle, BundleError, load_bundle
from mage_ray.config import Config, ConfigError
from mage_ray.guidance import method_names
from mage_ray.soup import validate_preference
from mage_ray.storage import exists, is_file, is_uri, join, local_path, storage_abs
from mage_ray.tasks.hf_rewards import PAPER_REWARD_MODELS, RewardModelError, parse_hf_name
from mage_ray.tasks.objectives import ObjectiveError, check_objective_names
from mage_ray.tasks.prompts import TaskDataError, check_data_path

__all__ = [
    "HUB_TIMEOUT_S",
    "TRAINING",
    "PreflightError",
    "check",
    "check_memory",
    "check_model",
    "check_storage",
    "check_vllm",
    "output_dir",
    "temporary_working_dir",
]

TRAINING = ("objectives", "model", "data", "storage", "vllm", "memory")
"""The checks of the commands that train or sample (pipeline, sweep, train-*, rollouts)."""
HUB_TIMEOUT_S = 3.0
"""Seconds the one hub request of a model check may take (a hub id that is not in the local cache)."""
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a submitted job's driver: JSON with the job's runtime_env."""
RUNTIME_COPY = ("runtime_resources", "working_dir_files")
"""Path components of the directory under which Ray unpacks (and later deletes) a job's working_dir."""


class PreflightError(ConfigError):
    """A check before Ray starts failed; the message names the field or flag and what to do."""


def check(cfg: Config, args: Namespace | None = None) -> None:
    """Run the checks ``args.checks`` names (all listed in the module docstring); ``args=None`` (``config show``)
    checks the objective names only. Raises PreflightError (a ConfigError) on the first failure."""
    _wrap("task.objectives", check_objective_names, cfg.task.objectives)
    if args is None:
        return
    checks = set(args.checks)  # cheap, local checks first; a hub id's one request last
    bundle = _bundle(args.bundle, cfg, "bundle_objectives" in checks) if "bundle" in checks else None
    if "storage" in checks:
        out = getattr(args, "out", None)  # only some commands have --out
        check_storage(*(("--out", out) if out else ("storage.storage_path", cfg.storage.storage_path)))
    if "data" in checks:
        _wrap("task.data_path", check_data_path, cfg.task)
    if "grid" in checks:
        _grid_flags(args, cfg, bundle)
    if "ref_point" in checks:
        check_ref_point(cfg, bundle)
    if "model" in checks:
        if bundle is not None:
            base = bundle.model_config().name_or_path
            check_model(f"the bundle's base model {base!r} (--bundle {args.bundle!r})", base)
        else:
            check_model(f"model.name_or_path = {cfg.model.name_or_path!r}", cfg.model.name_or_path)
    if "objectives" in checks:
        for name in cfg.task.objectives:
            _reward_model(name)
    if "vllm" in checks:
        check_vllm(cfg)
    if "memory" in checks:
        check_memory(cfg, getattr(args, "plan_stages", None), getattr(args, "config", None))


def check_ref_point(cfg: Config, bundle: Bundle | None = None) -> None:
    """Hypervolume needs a reference point below every reward: an objective without a floor (a reward model's
    logit) needs ``eval.ref_point`` (or a bundle that records one), else every sweep trial and report would fail."""
    if cfg.eval.ref_point is not None or (bundle is not None and bundle.ref_point):
        return
    from mage_ray.tasks.objectives import get_objective

    unbounded = [n for n in cfg.task.objectives if get_objective(n, load=False).bounds is None]
    if unbounded:
        floor = ",".join(["-10"] * cfg.n_objectives)
        raise PreflightError(
            f"eval.ref_point: objectives {unbounded} are unbounded (reward-model logits), so the hypervolume of "
            f"sweeps and reports needs a reference point below every reward you expect: set eval.ref_point, one "
            f"value per objective (e.g. eval.ref_point=[{floor}])"
        )


def output_dir(args: Namespace, cfg: Config) -> str | None:
    """Where the command writes, as an absolute path or a URI: its ``--out`` when given, else the run directory
    ``<storage.storage_path>/<storage.run_name>``. None for a command without the ``storage`` check (it writes
    nothing: serve, doctor)."""
    if "storage" not in args.checks:
        return None
    out = getattr(args, "out", None)  # only some commands have --out
    if not out:
        return cfg.storage.run_dir  # storage_path is absolute already (load_config)
    return storage_abs(out)


def _wrap(field: str, fn, *a) -> None:
    """``fn(*a)``, with the library's own error (message already names what is wrong) as a PreflightError."""
    try:
        fn(*a)
    except (ObjectiveError, TaskDataError, RewardModelError, BundleError) as e:
        msg = str(e)
        raise PreflightError(msg if msg.startswith(field) else f"{field}: {msg}") from None


# ---------------------------------------------------------------------------------------------
# Models: local, embedded, tiny or on the hub


def check_model(what: str, name_or_path: str) -> None:
    """Raise PreflightError (its message starts with ``what``, e.g. ``model.name_or_path = 'x'``) unless
    ``name_or_path`` can be loaded here without waiting on a network.

    ``embedded:<name>`` and ``tiny-random[:seed]`` (see :mod:`mage_ray.models`, not imported here: it imports
    torch, seconds on a busy machine) are built from wheels that ``mage-ray doctor`` checks.
    """
    if name_or_path.startswith("embedded:") or name_or_path.partition(":")[0] == "tiny-random":
        return
    if is_uri(name_or_path):
        try:
            found = is_file(join(name_or_path, "config.json"))
        except OSError as e:  # no credentials, no such bucket, endpoint unreachable
            raise PreflightError(f"{what}: cannot read it: {e}") from None
        if not found:
            raise PreflightError(f"{what}: no config.json there, so it holds no model")
        return
    from mage_ray.devices import hub_source

    path = local_path(hub_source(name_or_path))  # MAGE_RAY_HUB_MAP may put a local copy behind a hub id
    if path.exists():
        if not path.is_dir():
            raise PreflightError(f"{what} is a file: expected a model directory (with config.json)")
        if not (path / "config.json").is_file():
            raise PreflightError(f"{what}: the directory has no config.json, so it holds no model")
        return
    if name_or_path.startswith((".", "/", "~")):
        raise PreflightError(f"{what}: no such directory")
    _hub_model(what, name_or_path)


def _reward_model(name: str) -> None:
    """The classifier behind a reward-model objective (``hf:...`` or a paper alias) is loadable here."""
    if name.startswith("hf:"):
        check_model(f"task.objectives: {name!r}", parse_hf_name(name).model)  # the name is checked already
    elif name in PAPER_REWARD_MODELS:
        model = PAPER_REWARD_MODELS[name].model
        check_model(f"task.objectives: {name!r} (reward model {model!r})", model)
    # an embedded objective: its wheels are checked by `mage-ray doctor`


def _hub_model(what: str, repo_id: str) -> None:
    """A hub id: in the local cache, or else the hub answers (one request, no retries, nothing downloaded)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise PreflightError(f"{what}: no such local directory, and not a hub id (owner/name)") from None
    if isinstance(cached, str):
        return
    where = f"{what}: no local directory of that name, not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise PreflightError(
            f"{where}, and HF_HUB_OFFLINE=1 forbids downloading it: download it first (`hf download {repo_id}` "
            "where there is network, into this HF cache) or give a local directory"
        )
    problem = _hub_problem(repo_id)
    if problem is not None:
        raise PreflightError(f"{where}, and {problem}")


def _hub_problem(repo_id: str) -> str | None:
    """Why the hub cannot serve ``repo_id`` (None: it can, or it answered with an error a retry may fix)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "it is gated on the hub: accept its terms there and log in (`hf auth login`), or download it first"
    except RepositoryNotFoundError:
        return "the hub has no such model (or it is private: log in with `hf auth login`)"
    except HfHubHTTPError:
        return None  # the hub answered (rate limit, server error): the load itself may succeed
    except Exception as e:  # noqa: BLE001 - DNS failure, refused connection, timeout, proxy error: no hub here
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return (
            f"the hub {constants.ENDPOINT} is unreachable (no network? {type(e).__name__}: {detail}): download the "
            "model where there is network and copy that HF cache here (then set HF_HUB_OFFLINE=1), or give a local "
            "directory"
        )
    return None


# ---------------------------------------------------------------------------------------------
# GPU memory and vLLM


def check_vllm(cfg: Config) -> None:
    """``backbone.generation = vllm`` needs vLLM importable here (TRL would fail only inside a Ray worker)."""
    import importlib.util

    if cfg.backbone.generation == "vllm" and importlib.util.find_spec("vllm") is None:
        raise PreflightError(
            "backbone.generation = 'vllm' needs the vllm package, which this Python does not have: "
            "pip install 'mage-ray[gpu]' (or set backbone.generation=hf)"
        )


def check_memory(cfg: Config, stages=None, config_path: str | None = None) -> None:
    """Refuse a config whose memory plan does not fit ``plan.gpu_memory_gib`` (module docstring)."""
    if not cfg.plan.gpu_memory_gib:
        return
    from mage_ray.memory_plan import gib
    from mage_ray.stage_plan import first_misfit, largest_fitting, plan_config

    plan = plan_config(cfg, also=stages or ())
    wanted = set(stages) if stages else {r.stage.split(" ")[0] for r in plan.rows} - {"serve"}
    row = first_misfit(plan, wanted)
    if row is None:
        return
    big = max(row.resident + row.transient, key=lambda t: t.bytes)
    best = largest_fitting(cfg, row)
    hint = f" (<= {best} fits)" if best else ""
    cmd = f"mage-ray plan --config {config_path}" if config_path else "mage-ray plan --config <file>"
    raise PreflightError(
        f"plan.gpu_memory_gib = {cfg.plan.gpu_memory_gib:g}: stage '{row.stage}' ({row.worker}) needs "
        f"{gib(row.per_gpu):.3g} GiB per GPU ({big.name} {gib(big.bytes):.3g} GiB"
        f"{': ' + big.note if big.note else ''}), more than {cfg.plan.gpu_memory_gib:g} - {cfg.plan.reserve_gib:g} "
        f"GiB reserve: lower {row.knob}{hint}; `{cmd}` shows every stage"
    )


# ---------------------------------------------------------------------------------------------
# Storage that outlives the job


def temporary_working_dir() -> str | None:
    """This process's working directory when it is Ray's temporary copy of a submitted job's working_dir.

    Detected by the path (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``) or, for a job driver,
    by the runtime_env in RAY_JOB_CONFIG_JSON_ENV_VAR naming a working_dir Ray unpacked (not ``local://``).
    """
    cwd = os.getcwd()
    if _in_runtime_copy(cwd):
        return cwd
    try:
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return None
    working_dir = ((job.get("runtime_env") if isinstance(job, dict) else None) or {}).get("working_dir")
    if isinstance(working_dir, str) and working_dir and not working_dir.startswith("local://"):
        return cwd
    return None


def _in_runtime_copy(path: str) -> bool:
    parts = Path(path).parts
    n = len(RUNTIME_COPY)
    return any(parts[i : i + n] == RUNTIME_COPY for i in range(len(parts) - n + 1))


def check_storage(field: str, path: str) -> None:
    """Refuse a local ``path`` inside Ray's temporary copy of the job's working directory (deleted by Ray)."""
    if is_uri(path):
        return
    full = storage_abs(path)
    tmp = temporary_working_dir()
    inside = tmp is not None and (full == tmp or full.startswith(tmp.rstrip("/") + "/"))
    if inside or _in_runtime_copy(full):
        raise PreflightError(
            f"{field} = {full!r} lies in Ray's temporary copy of the job's working directory, which Ray deletes: "
            "pass an absolute path or URI that outlives the job, e.g. storage.storage_path=/shared/mage_runs "
            "(a directory every node sees) or storage.storage_path=s3://bucket/mage_runs"
        )


# ---------------------------------------------------------------------------------------------
# Bundles and the grid job's flags


def _bundle(path: str, cfg: Config, same_objectives: bool) -> Bundle:
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        raise PreflightError(f"--bundle {path!r}: {e}") from None
    if same_objectives and list(bundle.objectives) != list(cfg.task.objectives):
        raise PreflightError(
            f"task.objectives = {cfg.task.objectives} differ from the bundle's {bundle.objectives} "
            f"(--bundle {path!r}): evaluate with the config the bundle was built from"
        )
    return bundle


def grid_preferences(args: Namespace) -> list[tuple[str, list[float]]]:
    """The grid job's explicit points as (name for messages, point): each ``--preference 0.2,0.8`` (repeatable,
    the spelling ``export`` uses), then the points of the deprecated ``--preferences '[[0.2, 0.8], [1, 0]]'``.
    PreflightError when one is not numbers (not yet checked against the simplex)."""
    from mage_ray.soup import PreferenceError, parse_preference

    out = []
    for i, text in enumerate(getattr(args, "preference", None) or []):
        try:
            out.append((f"--preference[{i}]", parse_preference(text, f"--preference[{i}]")))
        except PreferenceError as e:
            raise PreflightError(str(e)) from None
    if getattr(args, "preferences", None):
        try:
            points = json.loads(args.preferences)
        except ValueError as e:
            raise PreflightError(
                f"--preferences is not JSON ({e}): expected e.g. '[[0.2, 0.8], [1, 0]]'"
            ) from None
        if not isinstance(points, list) or not points:
            raise PreflightError(
                f"--preferences = {args.preferences!r}: expected a non-empty JSON list of points"
            )
        out += [(f"--preferences[{i}]", p) for i, p in enumerate(points)]
    return out


def _grid_flags(args: Namespace, cfg: Config, bundle: Bundle) -> None:
    if args.prompts:
        if not exists(args.prompts):
            raise PreflightError(f"--prompts {args.prompts!r}: no such file or directory")
    else:
        _wrap("task.data_path", check_data_path, cfg.task)
    if args.methods:
        known = method_names()
        for m in args.methods.split(","):
            if m not in known:
                raise PreflightError(f"--methods: unknown method {m!r}; known: {known}")
    for name, p in grid_preferences(args):
        try:
            validate_preference(p, bundle.n_objectives, name=name)
        except (ValueError, TypeError) as e:
            raise PreflightError(str(e)) from None
