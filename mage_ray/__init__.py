"""mage_ray: controllable multi-objective generation (MAGE / Bone Soup) on Ray."""

__version__ = "0.1.0"
