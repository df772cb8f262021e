r"""RetinaNet with an MPViT backbone and FPN (Lee et al. 2022, section 4.2, Table 3).

  python -m jaxdet.convert --from=mpvit --variant=S --src=mpvit_small.pth --dst=runs/mpvit_s_in1k
  python -m jaxdet.main --config=configs/retinanet_mpvit.py:variant=S \
      --workdir=runs/retinanet_mpvit_s --config.init_from=runs/mpvit_s_in1k

MPViT levels 3-5 (216/288/288 channels for MPViT-S) -> FPN P3-P7 (P6/P7 from P5) -> the
RetinaNet head. The MPViT detectron2 recipe (`../shared/reference/detr_swin_mpvit.md`
section 3; the official `Base-RetinaNet.yaml`): AdamW at lr 1e-4 and weight decay 0.05
(jaxdet decays conv/dense kernels only, so never norms or biases), global batch 16, gradient
clipping at global norm 1.0, 1000 warmup steps from 0.01 x lr, 1x = 90k steps with x0.1 at
60k and 80k, 3x = 270k steps with steps at 210k and 250k; anchors 32-512 px (4 x stride, 3
scales), IoU thresholds 0.4 / 0.5; drop-path 0.1 for T and XS, 0.2 for S, 0.4 for B. The
reference trains 1x at a fixed 800 px short side and 3x at 480-800 with DETR-style crops;
jaxdet's square canvas of 1024 gives 768 px short sides on 4:3 COCO images, jittered over
[0.6, 1.0] of the canvas for 3x (no crop augmentation). The RetinaNet head and loss are
jaxdet's (per-level BatchNorm, focal gamma 1.5, Huber box loss; detectron2 uses no head norm,
gamma 2.0 and L1).

Expected (MPViT README, COCO val2017, ImageNet-1K initialisation, box AP): RetinaNet 1x
T 41.8, XS 43.8, S 45.7, B 47.0; MS+3x T 44.4, XS 46.1, S 47.6, B 48.3. Parameters: T 17M,
XS 20M, S 32M, B 85M (jaxdet's count at 80 classes: tests/models/test_mpvit.py).

Variants after the colon: `variant=T|XS|S|B`, `schedule=1x|3x`, `size=N`, `batch=N` (the
learning rate scales linearly from 16), `shapes` (the synthetic dataset at 128 px with
full-width MPViT-T, 300 steps at batch 8), `runlocal` (tiny smoke test).
"""

import ml_collections

from configs import common
from jaxdet.models.backbones import mpvit

# Drop-path of the official detection configs (reference section 3).
DETECTION_DROP_PATH = {'T': 0.1, 'XS': 0.1, 'S': 0.2, 'B': 0.4}

# detectron2 schedules at batch 16: (steps, lr decay steps); 1x = 12 and 3x = 36 epochs.
SCHEDULES = {'1x': (90_000, (60_000, 80_000)), '3x': (270_000, (210_000, 250_000))}

# Scale jitter of the canvas: fixed size for 1x, 480-800 of 800 px short sides for 3x.
SCALE_JITTER = {'1x': (1.0, 1.0), '3x': (0.6, 1.0)}


def mpvit_backbone(variant, drop_path_rate=None):
  """config.model.backbone for MPViT-`variant` with PyTorch's BatchNorm settings.

  The official checkpoints were trained with momentum 0.1 (0.9 in Flax's convention) and
  eps 1e-5, so the backbone keeps them rather than the experiment's `config.norm`.
  """
  if variant not in mpvit.MPVIT_VARIANTS:
    raise ValueError(f'variant must be one of {sorted(mpvit.MPVIT_VARIANTS)}, '
                     f'got {variant!r}.')
  rate = DETECTION_DROP_PATH[variant] if drop_path_rate is None else drop_path_rate
  return ml_collections.ConfigDict(dict(
      name='mpvit', variant=variant, stochastic_depth_rate=rate, norm_momentum=0.9,
      norm_epsilon=1e-5))


def mpvit_recipe(config, schedule, batch):
  """AdamW 1e-4 at batch 16 (scaled linearly), weight decay 0.05, clip 1.0, step decays."""
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}.')
  steps, decays = SCHEDULES[schedule]
  config.schedule = schedule
  config.global_batch_size = batch
  # The same number of epochs at any batch size.
  config.num_train_steps = int(round(steps * 16 / batch))
  opt = config.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 1e-4
  opt.reference_batch_size = 16
  opt.weight_decay = 0.05
  opt.schedule = 'step'
  opt.decay_boundaries = tuple(d / steps for d in decays)   # fractions of the run
  opt.decay_factors = (0.1, 0.01)
  opt.warmup_steps = int(round(1000 * 16 / batch))
  opt.warmup_init_lr = 1e-4 * 0.01
  opt.grad_clip_norm = 1.0          # detectron2 CLIP_TYPE full_model, value 1.0
  config.data.aug_scale_min, config.data.aug_scale_max = SCALE_JITTER[schedule]
  config.checkpoint_every_steps = 5000
  config.log_every_steps = 100
  return config


def tiny_backbone(config):
  """A few-thousand-parameter MPViT with every structural part (runlocal smoke tests)."""
  config.model.backbone.update(
      num_path=(2, 2, 2, 2), num_layers=(1, 1, 1, 1), embed_dims=(16, 16, 16, 24),
      mlp_ratios=(2, 2, 2, 2), num_heads=(8, 8, 8, 8))
  return config


def get_config(arg=None):
  a = common.parse_arg(arg, variant='S', schedule='1x', size=1024, batch=16, shapes=False,
                       runlocal=False)
  c = common.base_config()
  c.model = common.retinanet_config()
  c.model.backbone = mpvit_backbone(a.variant)
  c.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=3, max_level=7, num_filters=256, use_norm=True,
      activation='relu', norm_momentum=c.norm.get_ref('momentum'),
      norm_epsilon=c.norm.get_ref('epsilon')))
  c.model.anchor.anchor_size = 4.0
  c.model.matcher.negative_threshold = 0.4
  c.data = common.data_config('coco', a.size)
  c.eval_batch_size = 8
  mpvit_recipe(c, a.schedule, a.batch)
  if a.shapes:
    shapes_recipe(c)
  if a.runlocal:
    common.runlocal(c)
    tiny_backbone(c)
    c.model.neck.num_filters = 32
  return c


def shapes_recipe(config):
  """MPViT-T at full width on 128 px shapes: a short AdamW + cosine schedule for a CPU."""
  common.cpu_shapes_retinanet(config, batch=8, steps=300, learning_rate=1e-3,
                              weight_decay=0.05, warmup=30, grad_clip_norm=1.0)
  config.model.backbone = mpvit_backbone('T', drop_path_rate=0.0)
  return config
