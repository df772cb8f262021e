"""Backbones: `config.model.backbone.name` names a module here; each exposes `build`."""

import importlib


def build(model_cfg, dtype, name='backbone'):
  """Imports `jaxdet.models.backbones.<model_cfg.backbone.name>` and builds it.

  Every backbone maps images [B, H, W, 3] to a level dict {l: [B, H / 2^l, W / 2^l, C_l]}.
  """
  module = importlib.import_module(f'{__name__}.{model_cfg.backbone.name}')
  return module.build(model_cfg.backbone, dtype, name=name)
