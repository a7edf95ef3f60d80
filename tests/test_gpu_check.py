"""bench/gpu_check.py --dry-run (so the GPU check does not rot): it runs in a Python that sees only torch, transformers,
peft, safetensors, numpy and what they require (no Ray, TRL, PyYAML, pyarrow, ...: what the lent GPU machines
have; PyYAML comes along, huggingface_hub needs it), and its JSON holds every method at every batch with speeds,
rows and the plan's memory estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ALLOWED = ("torch", "transformers", "peft", "safetensors", "numpy")


def _closure(roots) -> list:
    """The installed distributions ``roots`` need (their requirements, recursively, without extras)."""
    seen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return list(seen.values())


def _site_of(dists, target: Path) -> None:
    """Symlink the top-level files and directories of ``dists`` into ``target``: a site-packages holding only them."""
    for dist in dists:
        for f in dist.files or []:
            top = Path(f).parts[0]
            src = Path(dist.locate_file(top))
            if top != ".." and src.exists() and not (target / top).exists():
                (target / top).symlink_to(src)


def test_dry_run_needs_only_torch_transformers_peft_safetensors(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _site_of(_closure(ALLOWED), site)
    stdlib = [p for p in sys.path if p and "site-packages" not in p and Path(p).resolve() != REPO]
    out = tmp_path / "gpu_check.json"
    code = (
        "import runpy, sys; "
        f"sys.path[:] = {[*stdlib, str(site)]!r}; "
        f"sys.argv = ['bench/gpu_check.py', '--dry-run', '--out', {str(out)!r}]; "
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(
        (site / m).exists() for m in ("ray", "trl", "pyarrow", "datasets", "scipy", "sentence_transformers")
    )

    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["skipped"] == []
    batches = ["1", "2", "4"]
    assert sorted(report["plain"]) == batches
    assert all(v["tokens_per_s"] > 0 for v in report["plain"].values())
    assert set(report["methods"]) == {"base", "bs", "mage-e-m", "mage-i-m", "genarm", "parm"}
    # rows one request takes (a preference away from the simplex's corners): the guidance plans of mage_ray.guidance
    rows = {"base": 1, "bs": 1, "mage-e-m": 2, "mage-i-m": 2, "genarm": 3, "parm": 2}
    for method, per in report["methods"].items():
        assert sorted(per) == batches, method
        for b, v in per.items():
            assert v["errors"] == [] and v["tokens_per_s"] > 0 and v["ratio_to_plain"] > 0, (method, b)
            assert v["plan_gib"] > 0 and v["peak_gib"] is None  # no CUDA memory to measure on CPU
        assert per["4"]["rows_per_request"] == rows[method], method
        assert per["4"]["plan_gib"] > per["1"]["plan_gib"], method  # the KV cache grows with the batch
    mixing = report["mixing"]
    assert mixing["rows"] == 16 and mixing["prefill_s"]["ratio"] > 0 and mixing["decode_step_s"]["ratio"] > 0
