"""Serving: a Ray Serve replica pool over the decode engine.

* :mod:`mage_ray.serve.schema` HTTP request bodies, validation (errors name the field), response builders.
* :mod:`mage_ray.serve.core`   :class:`Generator`, the plain class a replica wraps: one engine, micro-batching,
  streaming with cancellation, preference grids. Drivable without Ray.
* :mod:`mage_ray.serve.engine` the engine deployment: a thin Serve shell over one Generator.
* :mod:`mage_ray.serve.app`    the FastAPI ingress deployment that calls the engine through a DeploymentHandle;
  ``build_app`` is the application builder (import path ``mage_ray.serve.app:build_app``). Both imported on
  demand (they import Ray Serve).
"""

from mage_ray.serve.core import Generator, Ticket, decode_defaults
from mage_ray.serve.schema import ApiError, Limits

__all__ = ["ApiError", "Generator", "Limits", "Ticket", "decode_defaults"]
