r"""Mask R-CNN with SpineNet (Du et al., CVPR 2020, Table 6), the TPU reference recipe.

  python -m jaxdet.main --config=configs/maskrcnn_spinenet49.py --workdir=runs/mrcnn_sn49
  python -m jaxdet.main --config=configs/maskrcnn_spinenet49.py:model=96 --workdir=runs/mrcnn_sn96

Variants after the colon: `model=49S|49|96|143|190`, `batch=N` (global batch; the learning
rate scales linearly from 0.28 at 256), `shapes` (the synthetic dataset at 128 px, narrow
widths), `runlocal` (tiny smoke test). Heads as the TPU configs: RPN, 4 conv + 1 FC box head
and mask head, all with BatchNorm (49S: 128 filters, 512-d FC; 190: 7 convs x 384).
Expected (paper Table 6, COCO val2017, from scratch): 49S 39.3 box / 34.8 mask AP
(13.9M params), 49 42.9 / 38.1 (40.8M), 96 47.2 / 41.5 (55.2M); TPU model zoo 143
48.7 / 42.6 (79.2M), 190 52.0 / 45.9 (168.2M).
"""

from configs import common
from configs import rcnn_common


def get_config(arg=None):
  a = common.parse_arg(arg, shapes=False, runlocal=False, model='49', batch=256)
  if a.model not in rcnn_common.SPINENET_MASK_RCNN:
    raise ValueError(f'model={a.model!r}; use one of {sorted(rcnn_common.SPINENET_MASK_RCNN)}.')
  c = rcnn_common.spinenet_mask_rcnn(a.model, a.batch)
  if a.shapes:
    rcnn_common.shapes_recipe(c)
  if a.runlocal:
    rcnn_common.runlocal(c)
  return c
