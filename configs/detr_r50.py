r"""DETR with a ResNet-50 backbone (Carion et al., ECCV 2020), the paper's recipe.

  python -m jaxdet.main --config=configs/detr_r50.py --workdir=runs/detr_r50 \
      --config.init_from=PATH_TO_IMAGENET_RESNET50_PARAMS

Variants after the colon: `epochs=300|500` (the learning rate drops x0.1 at epoch 200 or
400, as the reference code), `dc5` (dilated last stage, stride 16), `matcher=scipy|jax`,
`batch=N`, `shapes` (a small DETR trained from scratch on the synthetic dataset, sized for a
CPU), `runlocal` (smoke test). The backbone starts from ImageNet weights (`init_from`), with
frozen BatchNorm, the stem and first stage frozen and the rest at a tenth of the
transformer's learning rate, as the reference code. Expected on COCO val2017 (reference
model zoo, 500 epochs): 42.0 AP, 43.3 AP with DC5.

Parameters (91 classes + no object, as the reference): 41,577,888 in the tree, of which
41,302,368 are trained (the frozen stem, first stage and BatchNorm affines excluded), the
reference's `n_parameters`.

Augmentation is the reference's: horizontal flip; the short side drawn from 480, 512, ...,
800 with the long side at most 1333, and with probability 0.5 first the random-size crop
(a view at short side 400, 500 or 600, a window of 384..600 px per side). jaxdet composes
the crop and the resize into one resample of the original pixels. The static canvas is
1344 x 1344 (1333 rounded up to 32), so no image loses content; the reference pads each
batch to its largest image instead.
"""

import ml_collections

from configs import common


def detr_model(num_classes=80):
  """The paper's DETR: R50 (frozen BN), d 256, 6 + 6 layers, 100 queries, costs 1 / 5 / 2."""
  m = ml_collections.ConfigDict()
  m.name = 'detr'
  m.num_classes = num_classes
  m.backbone = ml_collections.ConfigDict(dict(
      name='resnet', depth=50, width=64, activation='relu', frozen_bn=True,
      last_stage_dilation=1,
      # torchvision's FrozenBatchNorm2d epsilon, for ImageNet checkpoints.
      norm_epsilon=1e-5))
  m.feature_level = 5
  m.transformer = ml_collections.ConfigDict(dict(
      hidden_dim=256, num_queries=100, num_heads=8, ffn_dim=2048, dropout=0.1,
      num_encoder_layers=6, num_decoder_layers=6,
      pre_norm=False,                # the paper's post-norm layers; True: pre-norm
      query_type='learned'))  # 'learned' (the paper) | 'anchor' | 'two_stage' (see detr.py)
  m.matcher = 'scipy'                # 'scipy' (host callback) | 'jax' (on the accelerator)
  m.cost = ml_collections.ConfigDict(dict(class_weight=1.0, l1_weight=5.0, giou_weight=2.0))
  m.loss = ml_collections.ConfigDict(dict(
      ce_weight=1.0, l1_weight=5.0, giou_weight=2.0, eos_coef=0.1, aux_loss=True,
      # 'softmax' (the paper: CE over C + 1, "no object" weighted eos_coef) | 'focal'
      # (sigmoid focal loss and focal matching cost, as Deformable DETR).
      class_loss='softmax', focal_alpha=0.25, focal_gamma=2.0,
      # two_stage queries: targets matched to this many encoder tokens each (one-to-many).
      encoder_repeats=1))
  m.postprocess = ml_collections.ConfigDict(dict(max_detections=100))
  return m


def get_config(arg=None):
  a = common.parse_arg(arg, epochs=300, dc5=False, matcher='scipy', batch=64, shapes=False,
                       runlocal=False)
  if a.epochs not in (300, 500):
    raise ValueError(f'epochs={a.epochs}: the paper trains 300 or 500 epochs.')
  c = common.base_config()
  c.model = detr_model()
  c.model.matcher = a.matcher
  if a.dc5:
    c.model.backbone.last_stage_dilation = 2
  c.data = common.data_config('coco', 1333)
  c.data.size_divisor = 32
  c.data.resize = 'short_side'
  c.data.short_sides = tuple(range(480, 801, 32))
  c.data.eval_short_side = 800
  c.data.max_size = 1333
  c.data.random_size_crop.update(probability=0.5, resize_sides=(400, 500, 600),
                                 min_size=384, max_size=600)
  c.data.max_instances = 100                                # Q >= N for the matcher
  c.global_batch_size = a.batch
  c.eval_batch_size = 8
  c.num_train_steps = common.epochs_to_steps(a.epochs, a.batch)
  opt = c.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 1e-4
  opt.reference_batch_size = 0
  opt.weight_decay = 1e-4
  opt.grad_clip_norm = 0.1
  opt.schedule = 'step'
  opt.warmup_steps = 0
  opt.decay_boundaries = ((a.epochs - 100) / a.epochs,)     # epoch 200 of 300, 400 of 500
  opt.decay_factors = (0.1,)
  # Backbone at 1e-5; stem and first stage frozen as the reference (its layer2-4 train).
  opt.lr_multipliers = (('^backbone/', 0.1), ('^backbone/(stem|stage2_)', 0.0))
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100
  if a.shapes:
    shapes_recipe(c)
  if a.runlocal:
    runlocal(c)
  return c


def runlocal(config, steps=20):
  """Tiny everything (the fields of common.runlocal that DETR has): a CPU smoke test."""
  if config.data.name != 'shapes':
    common.shapes_data(config, 128)
  common.runlocal_data_and_schedule(config, steps)
  config.data.max_instances = 10
  if config.data.resize == 'short_side':
    # The paper's geometry scaled to the 128-px canvas.
    config.data.update(short_sides=(96, 112, 128), eval_short_side=128, max_size=128)
    config.data.random_size_crop.update(resize_sides=(96, 112, 128), min_size=64,
                                        max_size=112)
  config.model.backbone.update(depth=18, width=8, frozen_bn=False, norm_epsilon=1e-3)
  config.model.transformer.update(hidden_dim=32, num_heads=2, ffn_dim=64, num_queries=10,
                                  num_encoder_layers=1, num_decoder_layers=1)
  config.model.postprocess.max_detections = 10
  config.optimizer.lr_multipliers = ()
  config.optimizer.learning_rate = 1e-3
  return config


def shapes_recipe(config):
  """A small DETR trained from scratch on the shapes dataset within 30 minutes on 2 cores.

  DETR needs many epochs, so on a CPU the lever is images per second. What is changed from
  the paper and why:
  - the `simple` shapes style (up to 4 objects from ~16 px), as the CPU demo;
  - from scratch nothing is frozen (random BatchNorm statistics would be meaningless) and
    the backbone trains at the full learning rate;
  - ResNet-18 at a quarter width with a dilated last stage (stride 16: 8 x 8 tokens at
    128 px, where stride 32 leaves 4 x 4 for objects of 16-90 px);
  - d 128, 4 heads, FFN 512, 3 + 3 layers, 20 queries for at most 10 objects;
  - no dropout (a 30-minute schedule does not overfit);
  - AdamW 2e-4, short warmup, cosine decay; gradient clipping 0.1 as the paper;
  - what made DETR learn classes at all in this budget (shapes AP at 1500 steps: 0.004 with
    two-stage queries alone, 0.053 with everything below; BENCHMARKS.md): pre-norm layers (the post-norm encoder trained from scratch kept
    the class signal from reaching the backbone: without any encoder AP was 0.029), two-stage
    queries with the sigmoid focal loss, and the backbone at 10x the transformer's rate
    (2e-3, the rate the shapes RetinaNet trains its backbone at).
  """
  common.shapes_data(config, 128)
  config.data.shapes.style = 'simple'
  config.data.size_divisor = 32
  config.data.max_instances = 10
  # Scale jitter with crops rather than the paper's random-size crop, whose partial objects
  # slow the early convergence this 30-minute budget depends on.
  config.data.resize = 'long_side'
  config.data.aug_scale_min, config.data.aug_scale_max = 0.8, 1.25
  config.model.backbone.update(depth=18, width=16, frozen_bn=False, last_stage_dilation=2,
                               norm_epsilon=1e-3)
  config.model.transformer.update(hidden_dim=128, num_heads=4, ffn_dim=512, dropout=0.0,
                                  num_queries=20, num_encoder_layers=3,
                                  num_decoder_layers=3, pre_norm=True,
                                  query_type='two_stage')
  config.model.loss.update(class_loss='focal', ce_weight=2.0)     # Deformable DETR's weights
  config.model.cost.class_weight = 2.0
  config.model.postprocess.max_detections = 20
  config.global_batch_size = 8
  config.eval_batch_size = 50
  config.data.num_eval_images = -1
  config.num_train_steps = 7500
  opt = config.optimizer
  opt.learning_rate = 2e-4
  opt.schedule = 'cosine'
  opt.warmup_steps = 100
  opt.warmup_init_lr = 0.0
  opt.grad_clip_norm = 0.1
  opt.lr_multipliers = (('^backbone/', 10.0),)
  config.eval_every_steps = 2500
  config.checkpoint_every_steps = 2500
  config.log_every_steps = 100
  return config
