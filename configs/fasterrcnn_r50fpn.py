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
  c = common.base_config()
  c.model = rcnn_common.rcnn_model(with_masks=False)
  rcnn_common.resnet_fpn(c, depth=50)
  c.data = common.data_config('coco')
  rcnn_common.detectron2_recipe(c, a.schedule)
  c.global_batch_size = a.batch
  if a.shapes:
    rcnn_common.shapes_recipe(c)
  if a.runlocal:
    rcnn_common.runlocal(c)
  return c
