"""Tiny configs for tests: real code paths, toy widths, 128 px, a few steps."""

import ml_collections

from configs import common


def tiny_config(data_dir: str, backbone: str = 'resnet') -> ml_collections.ConfigDict:
  """RetinaNet on a 64-image shapes build at 128 px with a ResNet-18 of width 8."""
  c = common.base_config()
  c.model = common.retinanet_config()
  if backbone == 'resnet':
    c.model.backbone = ml_collections.ConfigDict(dict(name='resnet', depth=18, width=8))
    c.model.neck = ml_collections.ConfigDict(dict(name='fpn', num_filters=16))
  else:
    c.model.backbone = ml_collections.ConfigDict(dict(
        name='spinenet', model_id='49S', filter_size_scale=0.125, endpoints_num_filters=16))
    c.model.neck = ml_collections.ConfigDict(dict(name='none'))
  c.data = common.data_config('shapes', 128)
  c.data.data_dir = data_dir
  common.shapes_data(c, 128)
  common.runlocal(c, steps=6)
  c.model.head.num_filters = 16
  c.model.head.num_convs = 1
  c.model.postprocess.pre_nms_top_k = 200
  c.optimizer.learning_rate = 0.02
  c.optimizer.warmup_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  return c
