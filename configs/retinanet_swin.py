r"""RetinaNet with a Swin Transformer backbone and FPN (Liu et al. 2021, section 4.2).

  python -m jaxdet.convert --from=swin --src=swin_tiny_patch4_window7_224.pth --dst=runs/swin_t_in1k
  python -m jaxdet.main --config=configs/retinanet_swin.py:variant=T \
      --workdir=runs/retinanet_swin_t --config.init_from=runs/swin_t_in1k

The Swin detection recipe (`../shared/reference/detr_swin_mpvit.md` section 2.1): AdamW at
lr 1e-4 and weight decay 0.05, with no decay on norms and relative position bias tables
(jaxdet decays conv/dense kernels only), global batch 16, 1x = 12 epochs with x0.1 at
epochs 8 and 11, 3x = 36 epochs with steps at 27 and 33, linear warmup. FPN on C3-C5 (96/192/
384/768-channel Swin-T levels 3-5 here), P6/P7 from P5, anchor size 4 as jaxdet's ResNet-50
RetinaNet. The reference trains on multi-scale 800x1333 inputs; jaxdet's square canvas of
1024 with the long side jittered over [0.625, 1.0] of it covers the same 640-1067 long sides
of 4:3 COCO images. The Swin papers report no RetinaNet result; Mask R-CNN Swin-T 1x gives
43.7 box AP (reference section 2.1).

Variants after the colon: `variant=T|S|B|L`, `schedule=1x|3x`, `size=N`, `batch=N`,
`remat` (gradient checkpointing of the Swin blocks), `shapes` (the synthetic dataset with a
narrow Swin-T that trains on a CPU; BENCHMARKS.md has its measured AP and time),
`runlocal` (tiny smoke test).
"""

import ml_collections

from configs import common

# Drop-path of the detection recipes (reference section 2.1: T 0.2 at 3x, 0.1 for Mask
# R-CNN T-1x; S 0.2; B 0.3). Swin-L has no listed detection rate; it keeps its 22K
# pre-training rate.
DETECTION_DROP_PATH = {'T': 0.2, 'S': 0.2, 'B': 0.3, 'L': 0.2}

# Epochs and the epochs at which the learning rate drops x0.1 (then x0.01).
SCHEDULES = {'1x': (12, (8, 11)), '3x': (36, (27, 33))}


def get_config(arg=None):
  a = common.parse_arg(arg, variant='T', schedule='1x', size=1024, batch=16, remat=False,
                       shapes=False, runlocal=False)
  if a.schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {sorted(SCHEDULES)}, got {a.schedule!r}.')
  c = common.base_config()
  c.model = common.retinanet_config()
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='swin', variant=a.variant, drop_path_rate=DETECTION_DROP_PATH[a.variant],
      window_size=7, remat=a.remat))
  c.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=3, max_level=7, num_filters=256, use_norm=True,
      activation='relu', norm_momentum=c.norm.get_ref('momentum'),
      norm_epsilon=c.norm.get_ref('epsilon')))
  c.model.anchor.anchor_size = 4.0
  c.data = common.data_config('coco', a.size)
  c.data.aug_scale_min, c.data.aug_scale_max = 0.625, 1.0

  epochs, drops = SCHEDULES[a.schedule]
  c.global_batch_size = a.batch
  c.eval_batch_size = 8
  c.num_train_steps = common.epochs_to_steps(epochs, a.batch)
  opt = c.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 1e-4
  opt.reference_batch_size = 16     # lr scales linearly for other batch sizes
  opt.weight_decay = 0.05
  opt.schedule = 'step'
  opt.decay_boundaries = tuple(d / epochs for d in drops)
  opt.decay_factors = (0.1, 0.01)
  # The reference warms up linearly over 500 iterations from 0.001 x lr.
  opt.warmup_steps = 500
  opt.warmup_init_lr = 1e-7
  opt.grad_clip_norm = 0.0          # the Swin detection configs do not clip
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100

  if a.shapes:
    shapes_recipe(c)
  if a.runlocal:
    common.runlocal(c)
    c.model.backbone.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    c.model.neck.num_filters = 32
  return c


def shapes_recipe(config):
  """A narrow Swin-T (C = 32, head width 32, Swin-T's depths) on 128 px shapes for a CPU.

  Window 4 instead of 7: the 32/16/8/4-token maps of a 128 px input then divide into whole
  windows, where 7 would make the last stage's 4x4 map two-thirds padding.
  """
  # Sized for about 15 minutes on a shared 2-core CPU, compilation and evaluation included.
  common.cpu_shapes_retinanet(config, batch=8, steps=250, learning_rate=1e-3,
                              weight_decay=0.05, warmup=25, grad_clip_norm=1.0)
  config.model.backbone.update(embed_dim=32, num_heads=(1, 2, 4, 8), drop_path_rate=0.1,
                               window_size=4)
  return config
