r"""Mask R-CNN with an MPViT backbone and FPN (Lee et al. 2022, section 4.2, Table 3).

  python -m jaxdet.convert --from=mpvit --src=mpvit_small.pth \
      --config=configs/maskrcnn_mpvit.py:variant=S --dst=runs/mrcnn_mpvit_s_init
  python -m jaxdet.main --config=configs/maskrcnn_mpvit.py:variant=S,schedule=3x \
      --workdir=runs/mrcnn_mpvit_s_3x --config.init_from=runs/mrcnn_mpvit_s_init

MPViT levels 2-5 (128/216/288/288 channels for MPViT-S) -> detectron2's FPN (P2-P5, P6 by
max-pool, no norm) -> RPN, two-FC box head and 4-conv mask head (configs/rcnn_common.py).
The MPViT detectron2 recipe (`../shared/reference/detr_swin_mpvit.md` section 3; the official
`Base-RCNN-FPN.yaml`): AdamW at lr 1e-4 and weight decay 0.05 (conv/dense kernels only),
global batch 16, gradient clipping at global norm 1.0, 1000 warmup steps from 0.01 x lr,
1x = 90k steps with x0.1 at 60k and 80k, 3x = 270k with steps at 210k and 250k; drop-path
0.1 for T and XS, 0.2 for S, 0.4 for B. The reference's 1x trains at an 800 px short side
and its 3x at 480-800 with DETR-style crops; jaxdet's 1024 canvas is jittered over
[0.6, 1.0] for 3x (no crop augmentation).

Expected (MPViT README, COCO val2017, ImageNet-1K initialisation, box / mask AP): 1x
T 42.2 / 39.0, XS 44.2 / 40.4, S 46.4 / 42.4, B 48.2 / 43.5; MS+3x T 44.8 / 41.0,
XS 46.6 / 42.3, S 48.4 / 43.9, B 49.5 / 44.5. Parameters: T 28M, XS 30M, S 43M, B 95M.

Variants after the colon: `variant=T|XS|S|B`, `schedule=1x|3x`, `batch=N` (the learning
rate scales linearly from 16), `shapes` (synthetic data at 128 px with MPViT-T, CPU),
`runlocal` (tiny smoke test).
"""

import ml_collections

from configs import common
from configs import rcnn_common
from configs import retinanet_mpvit


def get_config(arg=None):
  a = common.parse_arg(arg, variant='S', schedule='1x', batch=16, shapes=False,
                       runlocal=False)
  c = common.base_config()
  c.model = rcnn_common.rcnn_model(with_masks=True)
  c.model.backbone = retinanet_mpvit.mpvit_backbone(a.variant)
  c.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=2, max_level=6, num_filters=256, use_norm=False,
      extra_levels='maxpool'))
  c.data = common.data_config('coco')
  c.data.with_masks = True
  # Image size, size divisor, eval batch and logging from detectron2's recipe; the
  # optimizer and schedule are then MPViT's.
  rcnn_common.detectron2_recipe(c, '1x')
  retinanet_mpvit.mpvit_recipe(c, a.schedule, a.batch)
  if a.shapes:
    rcnn_common.shapes_recipe(c)
    c.model.backbone = retinanet_mpvit.mpvit_backbone('T', drop_path_rate=0.0)
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
  if a.runlocal:
    rcnn_common.runlocal(c)
    # rcnn_common.runlocal narrows ResNet / SpineNet; MPViT gets its own tiny widths.
    c.model.backbone = retinanet_mpvit.mpvit_backbone(a.variant)
    retinanet_mpvit.tiny_backbone(c)
  return c
