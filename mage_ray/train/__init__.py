"""Training: Stage 1 backbones (GRPO/RLOO on h = w^T r, Eq. 11), value models; plain functions + Ray wrappers.

- ``mage_ray.train.backbone``: ``train_backbone`` (plain process), ``train_sft``.
- ``mage_ray.train.ray_train``: Ray Train / Tune plumbing (``run_torch_trainer``, ``run_concurrent``) and
  ``train_backbones`` / ``train_morlhf`` on top of it.

Submodules are imported on use (they pull in torch / transformers / ray).
"""
