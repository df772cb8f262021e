r"""RetinaNet with an HRNetV2p backbone: HRNet-W18/W32/W40 + the HRFPN neck (Sun et al. 2019).

  python -m jaxdet.convert --from=hrnet --variant=W32 --src=hrnetv2_w32_imagenet_pretrained.pth \
      --config=configs/retinanet_hrnet.py:variant=W32 --dst=runs/retinanet_hrnet_w32_init
  python -m jaxdet.main --config=configs/retinanet_hrnet.py:variant=W32 \
      --workdir=runs/retinanet_hrnet_w32 --config.init_from=runs/retinanet_hrnet_w32_init

HRNetV2p for detection (reference notes section 6.1): the four HRNet branches (W, 2W, 4W,
8W channels at strides 4-32) are upsampled, concatenated, reduced to 256 channels and average-
pooled into P3-P7 by HRFPN. The schedule is mmdet's RetinaNet / HRNetV2p one: SGD momentum
0.9, lr 0.01 at batch 16, weight decay 1e-4, 1x = 12 epochs (x0.1 at 8 and 11), 2x = 24
epochs (16 and 22), 500 warmup steps, gradient norm clipped at 35; the backbone starts from
ImageNet weights (`init_from`, above). The backbone's BatchNorm keeps PyTorch's momentum and
epsilon so that imported statistics are used as trained. The published HRNetV2p results are
for Faster R-CNN (W18/W32/W40 1x: 36.9/40.2/41.2 box AP in mmdet); there is no published
RetinaNet-HRNet number to reach.

Variants after the colon: `variant=W18|W32|W40`, `schedule=1x|2x`, `size=N`, `batch=N`,
`shapes` (the synthetic dataset on a CPU, narrow W8 network), `runlocal` (tiny smoke test).
"""

import ml_collections

from configs import common

from jaxdet.models.backbones import hrnet

# Epochs and the epochs at which the learning rate drops x0.1 (then x0.01).
SCHEDULES = {'1x': (12, (8, 11)), '2x': (24, (16, 22))}


def get_config(arg=None):
  a = common.parse_arg(arg, variant='W32', schedule='1x', size=1024, batch=16, shapes=False,
                       runlocal=False)
  if a.variant not in hrnet.VARIANTS:
    raise ValueError(f'variant must be one of {sorted(hrnet.VARIANTS)}, got {a.variant!r}.')
  if a.schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {sorted(SCHEDULES)}, got {a.schedule!r}.')
  c = common.base_config()
  c.model = common.retinanet_config()
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='hrnet', width=hrnet.VARIANTS[a.variant], activation='relu',
      norm_momentum=0.9, norm_epsilon=1e-5))
  c.model.neck = ml_collections.ConfigDict(dict(
      name='hrfpn', min_level=3, max_level=7, num_filters=256))
  c.model.anchor.anchor_size = 4.0
  c.data = common.data_config('coco', a.size)
  # A 1024 square canvas with the long side jittered over [0.625, 1.0] covers the 640-1067
  # long sides of mmdet's 1333x800 inputs on 4:3 COCO images.
  c.data.aug_scale_min, c.data.aug_scale_max = 0.625, 1.0

  epochs, drops = SCHEDULES[a.schedule]
  c.global_batch_size = a.batch
  c.eval_batch_size = 8
  c.num_train_steps = common.epochs_to_steps(epochs, a.batch)
  opt = c.optimizer
  opt.name = 'sgd'
  opt.momentum = 0.9
  opt.learning_rate = 0.01
  opt.reference_batch_size = 16     # lr scales linearly for other batch sizes
  opt.weight_decay = 1e-4
  opt.schedule = 'step'
  opt.decay_boundaries = tuple(d / epochs for d in drops)
  opt.decay_factors = (0.1, 0.01)
  opt.warmup_steps = 500
  opt.warmup_init_lr = 0.001 * 0.01
  opt.grad_clip_norm = 35.0
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100

  if a.shapes:
    shapes_recipe(c)
  if a.runlocal:
    common.runlocal(c)
    c.model.backbone.update(width=4, stem_width=8, stage1_width=8, num_modules=(1, 1, 1, 1),
                            num_blocks=1)
    c.model.neck.num_filters = 32
  return c


def shapes_recipe(config):
  """A narrow HRNet (W = 8, one module per stage, two blocks per branch) on 128 px shapes."""
  common.cpu_shapes_retinanet(config, batch=16, steps=600, learning_rate=0.04,
                              weight_decay=4e-5, warmup=50, grad_clip_norm=10.0,
                              checkpoint_every=200)
  config.model.backbone.update(width=8, stem_width=32, stage1_width=16,
                               num_modules=(1, 1, 2, 1), num_blocks=2)
  return config
