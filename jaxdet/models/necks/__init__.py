"""Necks: `config.model.neck.name` names a module here; each exposes `build`."""

import importlib


def build(model_cfg, dtype, name='neck'):
  """`jaxdet.models.necks.<model_cfg.neck.name>` built from its sub-config, or None when the
  config has no neck (or 'none' / 'identity'): the backbone's levels feed the head."""
  if 'neck' not in model_cfg or model_cfg.neck.name in ('', 'none', 'identity'):
    return None
  module = importlib.import_module(f'{__name__}.{model_cfg.neck.name}')
  return module.build(model_cfg.neck, dtype, name=name)
