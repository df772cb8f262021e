r"""Mask R-CNN with a Swin Transformer backbone and FPN (Liu et al. 2021, section 4.2, Table 2).

  python -m jaxdet.convert --from=swin --src=swin_tiny_patch4_window7_224.pth \
      --config=configs/maskrcnn_swin.py:variant=T --dst=runs/mrcnn_swin_t_init
  python -m jaxdet.main --config=configs/maskrcnn_swin.py:variant=T,schedule=3x \
      --workdir=runs/mrcnn_swin_t_3x --config.init_from=runs/mrcnn_swin_t_init

Swin levels 2-5 (96/192/384/768 channels for Swin-T) -> detectron2's FPN (P2-P5, P6 by
max-pool) -> RPN, two-FC box head and 4-conv mask head (configs/rcnn_common.py). The Swin
detection recipe (`../shared/reference/detr_swin_mpvit.md` section 2.1): AdamW at lr 1e-4 and
weight decay 0.05, with no decay on norms and relative position bias tables (jaxdet decays
conv/dense kernels only), global batch 16, 1x = 12 epochs with x0.1 at epochs 8 and 11, 3x =
36 epochs with steps at 27 and 33, 500 warmup steps from 0.001 x lr; drop-path 0.1 for T-1x,
0.2 for T-3x and S, 0.3 for B. The reference's multi-scale training (short side 480-800,
long side at most 1333) becomes jaxdet's 1024 canvas with the long side jittered over
[0.625, 1.0] of it. Expected (Swin-Transformer-Object-Detection README, COCO val2017,
ImageNet-1K initialisation): Swin-T 1x 43.7 box / 39.8 mask AP, Swin-T 3x 46.0 / 41.6,
Swin-S 3x 48.5 / 43.3; 48M parameters for Swin-T, 69M for Swin-S.

Variants after the colon: `variant=T|S|B`, `schedule=1x|3x`, `batch=N` (the learning rate
scales linearly from 16), `remat` (gradient checkpointing of the Swin blocks, which the
reference needs on 16 GB GPUs), `shapes` (synthetic data, a narrow Swin-T, CPU), `runlocal`
(tiny smoke test).
"""

import ml_collections

from configs import common
from configs import rcnn_common

# Epochs and the epochs of the x0.1 learning-rate drops.
SCHEDULES = {'1x': (12, (8, 11)), '3x': (36, (27, 33))}

# Drop-path rates of the official Mask R-CNN / Cascade configs (reference section 2.1).
DROP_PATH = {('T', '1x'): 0.1, ('T', '3x'): 0.2, ('S', '1x'): 0.2, ('S', '3x'): 0.2,
             ('B', '1x'): 0.3, ('B', '3x'): 0.3}


def swin_fpn(config, variant, drop_path_rate, remat=False):
  """Swin levels 2-5 into detectron2's FPN (P2-P6, P6 by max-pool, no norm)."""
  config.model.backbone = ml_collections.ConfigDict(dict(
      name='swin', variant=variant, drop_path_rate=drop_path_rate, window_size=7,
      remat=remat))
  config.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=2, max_level=6, num_filters=256, use_norm=False,
      extra_levels='maxpool'))
  return config


def swin_recipe(config, schedule, batch):
  """AdamW 1e-4 (at batch 16), weight decay 0.05 on kernels only, epoch-based steps."""
  epochs, drops = SCHEDULES[schedule]
  config.schedule = schedule
  config.global_batch_size = batch
  config.num_train_steps = common.epochs_to_steps(epochs, batch)
  opt = config.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 1e-4
  opt.reference_batch_size = 16
  opt.weight_decay = 0.05
  opt.schedule = 'step'
  opt.decay_boundaries = tuple(d / epochs for d in drops)   # fractions of the run
  opt.decay_factors = (0.1, 0.01)
  opt.warmup_steps = 500
  opt.warmup_init_lr = 1e-4 * 0.001
  opt.grad_clip_norm = 0.0           # the Swin detection configs do not clip
  config.data.aug_scale_min, config.data.aug_scale_max = 0.625, 1.0
  return config


def get_config(arg=None):
  a = common.parse_arg(arg, variant='T', schedule='1x', batch=16, remat=False, shapes=False,
                       runlocal=False)
  if (a.variant, a.schedule) not in DROP_PATH:
    raise ValueError(f'variant must be T|S|B and schedule 1x|3x; got variant={a.variant!r}, '
                     f'schedule={a.schedule!r}.')
  c = common.base_config()
  c.model = rcnn_common.rcnn_model(with_masks=True)
  swin_fpn(c, a.variant, DROP_PATH[(a.variant, a.schedule)], a.remat)
  c.data = common.data_config('coco')
  c.data.with_masks = True
  # Image size, size divisor, eval batch, logging from detectron2's recipe; the optimizer
  # and schedule are then Swin's.
  rcnn_common.detectron2_recipe(c, '1x')
  swin_recipe(c, a.schedule, a.batch)
  if a.shapes:
    rcnn_common.shapes_recipe(c)
    # A narrow Swin-T: C = 32 with Swin-T's depths and 32-channel heads; window 4 so that
    # the 32/16/8/4-token maps of a 128 px input divide into whole windows.
    c.model.backbone.update(embed_dim=32, num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.1)
    c.optimizer.weight_decay = 0.05
  if a.runlocal:
    rcnn_common.runlocal(c)
    # rcnn_common.runlocal narrows ResNet / SpineNet; Swin gets its own tiny widths.
    c.model.backbone = ml_collections.ConfigDict(dict(
        name='swin', embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        window_size=4, drop_path_rate=0.1))
  return c
