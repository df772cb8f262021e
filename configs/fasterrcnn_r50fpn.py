r"""Faster R-CNN with ResNet-50-FPN (Ren et al. 2015; Lin et al. 2017), detectron2's defaults.

  python -m jaxdet.main --config=configs/fasterrcnn_r50fpn.py --workdir=runs/frcnn_r50fpn

The Mask R-CNN config without the mask branch. Variants: `schedule=1x|3x`, `batch=N`,
`shapes`, `runlocal`. Expected (detectron2 model zoo, COCO val2017, ImageNet-initialised
backbone): 1x 37.9 box AP, 3x 40.2.
"""

from configs import common
from configs import rcnn_common


def get_config(arg=None):
  a = common.parse_arg(arg, shapes=False, runlocal=False, schedule='1x', batch=16)
  return rcnn_common.resnet50_fpn_config(a, with_masks=False)
