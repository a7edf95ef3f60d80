"""Typed configuration: one dataclass per concern, YAML + ``key=value`` overrides.

Load with :func:`load_config`::

    cfg = load_config("configs/embedded.yaml", ["backbone.steps=40", "decode.gamma=1.0"])

Every dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError`
whose message names the field (``backbone.steps``), the bad value and what is allowed.
"""

from mage_ray.config.arm import ArmConfig
from mage_ray.config.checks import ConfigError
from mage_ray.config.load import add_config_args, config_from_dict, load_config, save_config
from mage_ray.config.sections import (
    BackboneConfig,
    Config,
    DecodeConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PlanConfig,
    ServeConfig,
    StorageConfig,
    SweepConfig,
    TaskConfig,
    ValueConfig,
)

__all__ = [
    "ArmConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DecodeConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "PlanConfig",
    "ServeConfig",
    "StorageConfig",
    "SweepConfig",
    "TaskConfig",
    "ValueConfig",
    "add_config_args",
    "config_from_dict",
    "load_config",
    "save_config",
]
