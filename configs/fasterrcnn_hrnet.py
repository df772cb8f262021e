r"""Faster R-CNN with HRNetV2p-W18/W32/W40 (Sun et al. 2019, "High-Resolution Representations
for Labeling Pixels and Regions", section 5 / Table 6).

  python -m jaxdet.convert --from=hrnet --variant=W32 --src=hrnetv2_w32_imagenet_pretrained.pth \
      --config=configs/fasterrcnn_hrnet.py:variant=W32 --dst=runs/frcnn_hrnet_w32_init
  python -m jaxdet.main --config=configs/fasterrcnn_hrnet.py:variant=W32 \
      --workdir=runs/frcnn_hrnet_w32 --config.init_from=runs/frcnn_hrnet_w32_init

HRNet's four branches -> HRFPN (upsample, concatenate, 1x1 to 256, average-pool to P2-P6,
3x3 conv per level; reference notes section 6.1) -> detectron2's RPN and two-FC box head
(configs/rcnn_common.py). The schedule is the detectron2 one that mmdet's HRNet configs match
(SGD 0.02 at batch 16, 1x = 90k steps ~ 12 epochs with x0.1 at 60k and 80k). Expected COCO
val box AP with an ImageNet-initialised backbone (mmdet configs/hrnet README, 1x): W18 36.9,
W32 40.2, W40 41.2; the official HRNet-Object-Detection repo reports 45.0M parameters for W32.

Variants after the colon: `variant=W18|W32|W40`, `schedule=1x|3x`, `batch=N`, `shapes`
(synthetic data, narrow W8 network, CPU), `runlocal` (tiny smoke test).
"""

import ml_collections

from configs import common
from configs import rcnn_common
from jaxdet.models.backbones import hrnet


def hrnet_backbone(variant):
  """HRNetV2p's backbone and neck sub-configs (BatchNorm at PyTorch's settings, as the
  ImageNet checkpoints were trained)."""
  backbone = ml_collections.ConfigDict(dict(
      name='hrnet', width=hrnet.VARIANTS[variant], activation='relu', norm_momentum=0.9,
      norm_epsilon=1e-5))
  neck = ml_collections.ConfigDict(dict(name='hrfpn', min_level=2, max_level=6,
                                        num_filters=256))
  return backbone, neck


def get_config(arg=None):
  a = common.parse_arg(arg, variant='W32', shapes=False, runlocal=False, schedule='1x',
                       batch=16)
  if a.variant not in hrnet.VARIANTS:
    raise ValueError(f'variant must be one of {sorted(hrnet.VARIANTS)}, got {a.variant!r}.')
  c = common.base_config()
  c.model = rcnn_common.rcnn_model(with_masks=False)
  c.model.backbone, c.model.neck = hrnet_backbone(a.variant)
  c.data = common.data_config('coco')
  rcnn_common.detectron2_recipe(c, a.schedule)
  c.global_batch_size = a.batch
  if a.shapes:
    rcnn_common.shapes_recipe(c)
    c.model.backbone.update(width=8, stem_width=32, stage1_width=16,
                            num_modules=(1, 1, 2, 1), num_blocks=2)
  if a.runlocal:
    rcnn_common.runlocal(c)
    # rcnn_common.runlocal narrows ResNet / SpineNet; HRNet gets its own tiny widths.
    c.model.backbone = ml_collections.ConfigDict(dict(
        name='hrnet', width=4, stem_width=8, stage1_width=8, num_modules=(1, 1, 1, 1),
        num_blocks=1, norm_momentum=0.9, norm_epsilon=1e-5))
    c.model.neck.num_filters = 16
  return c
