r"""Mask R-CNN with ResNet-50-FPN (He et al. 2017), detectron2's defaults.

  python -m jaxdet.main --config=configs/maskrcnn_r50fpn.py --workdir=runs/mrcnn_r50fpn

Variants after the colon: `schedule=1x|3x` (90k / 270k steps at batch 16, lr 0.02, decays at
60k, 80k / 210k, 250k), `batch=N` (the learning rate scales linearly), `shapes` (the synthetic
dataset at 128 px, narrow widths: bbox AP 0.525, mask AP 0.543 in 22 minutes on 2 CPU cores), `runlocal` (tiny smoke
test). Expected (detectron2 model zoo, COCO val2017, ImageNet-initialised backbone):
1x 38.6 box AP / 35.2 mask AP, 3x 41.0 / 37.2. jaxdet trains the backbone from scratch unless
`init_from` names a converted checkpoint.
"""

from configs import common
from configs import rcnn_common


def get_config(arg=None):
  a = common.parse_arg(arg, shapes=False, runlocal=False, schedule='1x', batch=16)
  return rcnn_common.resnet50_fpn_config(a, with_masks=True)
