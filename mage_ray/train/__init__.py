"""Training: Stage 1 backbones (GRPO/RLOO on h = w^T r, Eq. 11), value models, baselines; plain + Ray.

- ``mage_ray.train.backbone``: ``train_backbone`` (plain process); ``mage_ray.train.stage1``: reward weights,
  backbone names and directories, the optional SFT stage (``train_sft``).
- ``mage_ray.train.ray_shell``: the one Ray Train shell (``run_and_publish``, ``run_pending``, ``step_worker``);
  ``mage_ray.train.ray_train``: ``train_backbones`` / ``train_morlhf`` on top of it.
- ``mage_ray.train.offline``: the one offline training loop of the value models (``values``) and the baselines
  (``ric``, ``modpo``, ``wrpo``); ``mage_ray.train.preference_data``: their data.

Submodules are imported on use (they pull in torch / transformers / ray).
"""
