"""Serving: a Ray Serve replica pool over the decode engine.

* :mod:`mage_ray.serve.schema` HTTP request bodies, validation (errors name the field), response builders.
* :mod:`mage_ray.serve.core`   :class:`Generator`, the plain class a replica wraps: one engine, micro-batching,
  streaming with cancellation, preference grids. Drivable without Ray.
* :mod:`mage_ray.serve.app`    the Serve deployment + FastAPI ingress; ``build_app`` is the application builder
  (import path ``mage_ray.serve.app:build_app``). Imported on demand (it imports Ray Serve).
"""

from mage_ray.serve.core import Generator, Ticket, decode_defaults
from mage_ray.serve.schema import ApiError, Limits

__all__ = ["ApiError", "Generator", "Limits", "Ticket", "decode_defaults"]
