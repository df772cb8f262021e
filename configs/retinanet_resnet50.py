r"""RetinaNet with ResNet-50-FPN, trained from scratch under the SpineNet protocols.

  python -m jaxdet.main --config=configs/retinanet_resnet50.py --workdir=runs/r50fpn

The baseline of the SpineNet paper: P3-P7 from an FPN on C3-C5 (P6 from P5, P7 from P6),
anchor size 4 as the TPU RetinaNet default, 640x640. Protocol A's DropBlock (keep 0.9,
7x7, the DropBlock paper's values, which the SpineNet paper does not restate) drops the
outputs of the level-4 and level-5 blocks, where the DropBlock paper places it. Variants: `protocol=A|B|C` (default B,
350 epochs from scratch as the TPU model zoo's R50-FPN: 40.4 AP on val2017), `size=N`,
`batch=N`, `shapes`, `runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, shapes=False, runlocal=False, protocol='B', size=640, batch=256)
  c = common.base_config()
  c.model = common.retinanet_config()
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='resnet', depth=50, width=64, activation='relu', stochastic_depth_rate=0.0,
      dropblock_keep_prob=1.0, dropblock_size=7, dropblock_warmup_steps=0,
      norm_momentum=c.norm.get_ref('momentum'), norm_epsilon=c.norm.get_ref('epsilon')))
  c.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=3, max_level=7, num_filters=256, use_norm=True,
      activation='relu', norm_momentum=c.norm.get_ref('momentum'),
      norm_epsilon=c.norm.get_ref('epsilon')))
  c.model.anchor.anchor_size = 4.0
  c.data = common.data_config('coco', a.size)
  c.eval_batch_size = 8
  common.apply_protocol(c, a.protocol, a.batch)
  c.model.neck.activation = c.model.get_ref('activation')
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100
  if a.shapes:
    common.shapes_recipe(c)
  if a.runlocal:
    common.runlocal(c)
    c.model.backbone.width = 8
    c.model.neck.num_filters = 32
  return c
