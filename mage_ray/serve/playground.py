"""The preference playground: a page to try preferences in the browser, and the bundle's Pareto front as JSON.

* ``GET /`` and ``GET /playground``: the page (``static/index.html`` + ``app.css`` + ``app.js``, plain files
  shipped in the package: no build step, nothing from a CDN, works offline). It holds no data, so it needs no
  token; its API calls send the token the user types (kept in the tab's sessionStorage) as ``Authorization:
  Bearer``. It reads ``/v1/objectives`` (sliders, methods, defaults), streams ``/v1/generate`` (``stream`` and
  ``score``) and draws ``/v1/front``. A strict Content-Security-Policy keeps it to files of this server.
* ``GET /v1/front`` (behind the token, routed in :mod:`mage_ray.serve.app`): :func:`front_json`.

The front comes from the bundle's evaluation report, the ``metrics.json`` that
:func:`mage_ray.report.write_report` writes, looked for at :data:`REPORT_PLACES` relative to the bundle
directory. A bundle without one (or with a report on other objectives) gets ``{"available": false, "reason"}``
and the page says "no front for this bundle".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response

from mage_ray.grid import point_summary
from mage_ray.serve.schema import ApiError
from mage_ray.storage import is_file, is_uri, join, read_text

__all__ = ["REPORT_PLACES", "front_json", "router"]

REPORT_PLACES = ("report/metrics.json", "../report/metrics.json", "../eval/metrics.json")
"""Where a bundle's evaluation report may be, relative to the bundle directory, first match wins: copied into the
bundle; ``jobs/pipeline.py``'s ``<run_dir>/report`` beside ``<run_dir>/bundle``; ``jobs/evaluate.py``'s default
``--out`` ``<run_dir>/eval``."""

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
"""The page's files (in ``mage_ray/serve/static/``) and their media types; nothing else is served."""

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Response headers of the page's files: only this server's scripts and styles, never framed (the token field)."""

router = APIRouter()


def _file(name: str) -> Response:
    data = (resources.files("mage_ray.serve") / "static" / name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers=HEADERS)


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def page() -> Response:
    """The playground page. Its asset links and API calls are relative: under a Serve route prefix, open
    ``<prefix>/playground``."""
    return _file("index.html")


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise ApiError(404, f"no playground file {name!r}", "name", "not_found")
    return _file(name)


def _num(v: Any) -> float | None:
    """A JSON-safe number: None for a missing, NaN or infinite value (the report's JSON may hold NaN)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _unavailable(objectives: Sequence[str], reason: str) -> dict[str, Any]:
    return {"available": False, "objectives": list(objectives), "reason": reason}


def _beside(bundle_dir: str, rel: str) -> str:
    """``<bundle_dir>/<rel>``; on a URI (no ``..`` there) with the leading ``../`` resolved."""
    while is_uri(bundle_dir) and rel.startswith("../"):
        bundle_dir, rel = bundle_dir.rstrip("/").rsplit("/", 1)[0], rel[3:]
    return join(bundle_dir, rel)


def front_json(bundle_dir: str | Path, objectives: Sequence[str]) -> dict[str, Any]:
    """The Pareto front of the bundle at ``bundle_dir`` (serving ``objectives``) from its evaluation report.

    Returns ``{"available": true, "source": <place in REPORT_PLACES>, "objectives", "preferences" (P, n): the
    report's preference grid, "ref_point", "methods": {method: {"rewards" (P, n) mean reward per preference,
    None where every response failed; "front" (P,) bool: on the method's non-dominated front
    (:func:`mage_ray.grid.point_summary`, the one front every report and grid uses); "hv"; "degenerate" (P,) or
    None}}}``, or ``{"available": false, "objectives", "reason"}`` when there is no report, it cannot be read, or
    it scores other objectives than the bundle serves.
    """
    place = next((p for p in REPORT_PLACES if is_file(_beside(str(bundle_dir), p))), None)
    if place is None:
        return _unavailable(
            objectives, f"no evaluation report beside the bundle (looked for {', '.join(REPORT_PLACES)})"
        )
    try:
        report = json.loads(read_text(_beside(str(bundle_dir), place)))
        names = list(report["objectives"])
        grid = np.asarray(report["grid"], dtype=np.float64)  # (P, n)
        methods = {}
        for m, entry in report["methods"].items():
            R = np.asarray(
                [[math.nan if v is None else v for v in row] for row in entry["rewards"]], dtype=np.float64
            )  # (P, n)
            if R.shape != grid.shape:
                raise ValueError(f"methods.{m}.rewards has shape {R.shape}, the grid {grid.shape}")
            methods[m] = {
                "rewards": [[_num(v) for v in row] for row in R.tolist()],
                "front": [bool(f) for f in point_summary(R[:, None, :])["front"]],
                "hv": _num(entry.get("metrics", {}).get("hv")),
                "degenerate": None
                if entry.get("degenerate") is None
                else [_num(d) for d in entry["degenerate"]],
            }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return _unavailable(objectives, f"{place}: not a readable evaluation report ({e})")
    if names != list(objectives):
        return _unavailable(
            objectives, f"{place} scores objectives {names}, but the bundle serves {list(objectives)}"
        )
    return {
        "available": True,
        "source": place,
        "objectives": names,
        "preferences": grid.tolist(),
        "ref_point": [_num(v) for v in report.get("ref_point") or []] or None,
        "methods": methods,
    }
