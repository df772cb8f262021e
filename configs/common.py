"""Pieces shared by every config file.

A config file defines `get_config(arg=None)` and returns an `ml_collections.ConfigDict`.
`arg` is the string after the colon on the command line
(`configs/spinenet49.py:shapes,runlocal,protocol=B`); `parse_arg` turns it into typed values.
"""

import ml_collections

from jaxdet.models.backbones import spinenet

# COCO train2017 size: the unit that turns the papers' epochs into steps.
COCO_TRAIN_IMAGES = 118_287


def parse_arg(arg, **defaults):
  """Parses 'a,b=2,c=x' into a ConfigDict with the types of `defaults`.

  A bare word sets a boolean default to True. Unknown names are an error, so a typo in a
  variant stops the run instead of being ignored.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for token in arg.split(','):
    token = token.strip()
    if not token:
      continue
    name, _, value = token.partition('=')
    if name not in defaults:
      raise ValueError(
          f'Unknown config variant {name!r}; this config accepts {sorted(defaults)}.')
    if not _:
      if not isinstance(defaults[name], bool):
        raise ValueError(f'Variant {name!r} needs a value: {name}=...')
      out[name] = True
    elif isinstance(defaults[name], bool):
      out[name] = value.lower() in ('1', 'true', 'yes')
    elif defaults[name] is None:
      out[name] = value
    else:
      out[name] = type(defaults[name])(value)
  return out


def data_config(dataset='coco', image_size=640):
  """The input pipeline's fields (jaxdet/data/pipeline.py reads these)."""
  d = ml_collections.ConfigDict()
  d.name = dataset                  # 'coco' (tfds coco/2017) | 'shapes' | 'coco_json'
  d.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.image_size = image_size         # square training/eval canvas, multiple of 2**max_level
  d.size_divisor = 128              # pad to a multiple of 2**max_level
  d.aug_scale_min = 0.8
  d.aug_scale_max = 1.2
  d.aug_flip = True
  # 'long_side' (above) or 'short_side': DETR's multi-scale resize, the short side drawn
  # from short_sides (eval: eval_short_side), the long side at most max_size, with
  # DETR's random-size crop at random_size_crop.probability (jaxdet/data/transforms.py).
  d.resize = 'long_side'
  d.short_sides = (800,)
  d.eval_short_side = 800
  d.max_size = 1333
  d.random_size_crop = ml_collections.ConfigDict(dict(
      probability=0.0, resize_sides=(400, 500, 600), min_size=384, max_size=600))
  d.max_instances = 100             # N in DESIGN.md
  d.with_masks = False
  d.mask_size = 112                 # M in DESIGN.md
  d.shuffle_buffer = 1000
  d.num_eval_images = -1            # -1: the whole eval split
  d.skip_crowd_in_train = True
  # The synthetic dataset (jaxdet/data/shapes.py).
  d.shapes = ml_collections.ConfigDict(dict(
      num_train=2000, num_validation=500, image_size=256, seed=0,
      # 'standard' (up to 10 objects from ~9 px, textures, clutter) or 'simple' (up to 4
      # objects from ~16 px on smooth backgrounds): jaxdet/data/shapes.py STYLES.
      style='standard'))
  # A COCO-format folder: annotation json + image directory per split.
  d.coco_json = ml_collections.ConfigDict(dict(
      train_annotations='', train_images='',
      validation_annotations='', validation_images=''))
  return d


def retinanet_config():
  """RetinaNet head, anchors, loss and post-processing (SpineNet paper's settings)."""
  m = ml_collections.ConfigDict()
  m.name = 'retinanet'
  m.num_classes = 80
  m.activation = 'relu'             # head; configs tie the backbone's to it
  m.min_level = 3
  m.max_level = 7
  m.head = ml_collections.ConfigDict(dict(
      num_convs=4, num_filters=256, level_specific_norm=True, prior_prob=0.01))
  m.anchor = ml_collections.ConfigDict(dict(
      num_scales=3, aspect_ratios=(1.0, 2.0, 0.5), anchor_size=3.0))
  m.matcher = ml_collections.ConfigDict(dict(
      positive_threshold=0.5, negative_threshold=0.5, allow_low_quality=True))
  m.loss = ml_collections.ConfigDict(dict(
      focal_alpha=0.25, focal_gamma=1.5, huber_delta=0.1, box_weight=50.0))
  m.postprocess = ml_collections.ConfigDict(dict(
      # Candidates kept per level before NMS (over anchors x classes), then overall.
      pre_nms_top_k=5000, score_threshold=0.05, nms_iou=0.5, max_detections=100,
      class_agnostic=False))
  return m


def norm_config():
  return ml_collections.ConfigDict(dict(momentum=0.99, epsilon=1e-3))


def base_config():
  """Fields every experiment has; a config file fills model/data/schedule."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'               # activations: 'float32' | 'bfloat16'
  c.norm = norm_config()            # BatchNorm everywhere (sync over the global batch)
  c.global_batch_size = 64
  c.eval_batch_size = 8
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0            # 0: evaluate only at the end of training
  c.init_from = ''                  # a params-only checkpoint to start from
  c.init_from_partial = False       # True: it may hold only some subtrees (a backbone)
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=False,
      learning_rate=0.08,           # for the global batch above
      reference_batch_size=0,       # >0: lr is scaled by global_batch_size / this
      schedule='step',              # 'step' | 'cosine'
      warmup_steps=500, warmup_init_lr=0.0067,
      decay_boundaries=(0.9, 0.96),  # fractions of num_train_steps (step schedule)
      decay_factors=(0.1, 0.01),
      weight_decay=4e-5,            # L2 on conv/dense kernels only, as ½‖w‖² in the loss
      grad_clip_norm=10.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all remaining devices
  # (regex on the '/'-joined parameter path, PartitionSpec axes): shards big models over
  # 'model' (parameters and optimizer state alike); no match means replicated.
  c.partition_rules = ()
  return c


# Fully sharded data parallelism (jaxdet.parallel.FSDP_RULES): every conv/dense kernel's
# output dimension, and its optimizer state, split over the 'data' axis.
FSDP_RULES = (('kernel$', ('...', 'data')),)


def tie_activation(config, name):
  """Backbone and head share one activation (SpineNet protocol C swaps both to swish)."""
  config.model.activation = name
  config.model.backbone.activation = name


def shapes_data(config, image_size=256):
  """Points a config at the synthetic shapes dataset (built on first use)."""
  config.data.name = 'shapes'
  config.data.image_size = image_size
  config.data.shapes.image_size = image_size
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.model.num_classes = 6
  return config


def runlocal_data_and_schedule(config, steps=20):
  """What every detector's `runlocal` shares: 4-image batches, `steps` steps, a 64 + 16-image
  shapes build at 128 px, no periodic evaluation."""
  config.global_batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = steps
  config.log_every_steps = 5
  config.checkpoint_every_steps = steps
  config.eval_every_steps = 0
  config.data.image_size = 128
  config.data.shapes.image_size = 128
  config.data.shapes.num_train = 64
  config.data.shapes.num_validation = 16
  config.data.num_eval_images = 16
  config.data.shuffle_buffer = 64
  return config


def runlocal(config, steps=20):
  """Tiny everything: the smoke test of any config, about two minutes on a CPU."""
  runlocal_data_and_schedule(config, steps)
  config.optimizer.warmup_steps = 5
  config.model.head.num_filters = 32
  config.model.head.num_convs = 2
  config.model.postprocess.pre_nms_top_k = 500
  return config


def epochs_to_steps(epochs, global_batch_size, num_images=COCO_TRAIN_IMAGES):
  return int(round(epochs * num_images / global_batch_size))


# SpineNet RetinaNet per model (paper Table 2; ../shared reference section 2.1, 3.1):
# input size, anchor size, head convs x filters, and the TPU configs' drop-connect rate.
SPINENET_RETINANET = {
    '49S': dict(image_size=640, anchor_size=3.0, head_convs=4, head_filters=128),
    '49': dict(image_size=640, anchor_size=3.0, head_convs=4, head_filters=256),
    '96': dict(image_size=1024, anchor_size=3.0, head_convs=4, head_filters=256),
    '143': dict(image_size=1280, anchor_size=4.0, head_convs=4, head_filters=256),
    '190': dict(image_size=1280, anchor_size=4.0, head_convs=7, head_filters=512),
}

# Training protocols of the SpineNet paper (section 5.1): epochs, scale jitter, regularisers.
PROTOCOLS = {
    'A': dict(epochs=250, jitter=(0.8, 1.2), activation='relu', stochastic_depth=0.0,
              dropblock=True),
    'B': dict(epochs=350, jitter=(0.5, 2.0), activation='relu', stochastic_depth=0.0,
              dropblock=False),
    'C': dict(epochs=500, jitter=(0.5, 2.0), activation='swish', stochastic_depth=0.2,
              dropblock=False),
}

# DropBlock of protocol A: the paper gives no settings (and the TPU SpineNet hard-codes it
# off), so these are the DropBlock paper's ResNet-50 values (keep 0.9, 7x7 blocks).
DROPBLOCK_KEEP_PROB = 0.9
DROPBLOCK_SIZE = 7


def apply_protocol(config, protocol, batch_size=256):
  """SGD 0.28 at batch 256 (scaled linearly for other batches), warmup, x0.1 / x0.01 for the
  last 30 / 10 epochs, weight decay 4e-5 on kernels, sync BN 0.99 / 1e-3."""
  p = PROTOCOLS[protocol]
  config.protocol = protocol
  config.global_batch_size = batch_size
  config.num_train_steps = epochs_to_steps(p['epochs'], batch_size)
  opt = config.optimizer
  opt.name = 'sgd'
  opt.momentum = 0.9
  opt.learning_rate = 0.28
  opt.reference_batch_size = 256
  opt.schedule = 'step'
  opt.warmup_steps = epochs_to_steps(5, batch_size)
  opt.decay_boundaries = ((p['epochs'] - 30) / p['epochs'], (p['epochs'] - 10) / p['epochs'])
  opt.decay_factors = (0.1, 0.01)
  opt.weight_decay = 4e-5
  config.data.aug_scale_min, config.data.aug_scale_max = p['jitter']
  tie_activation(config, p['activation'])
  config.model.backbone.stochastic_depth_rate = p['stochastic_depth']
  # Only backbones that implement DropBlock (SpineNet) carry its fields.
  if 'dropblock_keep_prob' in config.model.backbone:
    config.model.backbone.dropblock_keep_prob = DROPBLOCK_KEEP_PROB if p['dropblock'] else 1.0
    config.model.backbone.dropblock_size = DROPBLOCK_SIZE
    # The DropBlock paper's schedule: keep_prob falls linearly from 1 over the whole run.
    config.model.backbone.dropblock_warmup_steps = config.get_ref('num_train_steps')
  return config


def spinenet_retinanet(model_id, arg):
  """RetinaNet-SpineNet-<model_id> under protocol A/B/C; variants shapes, runlocal, size=."""
  a = parse_arg(arg, shapes=False, runlocal=False, demo=False, protocol='C', size=0, batch=256)
  spec = SPINENET_RETINANET[model_id]
  c = base_config()
  c.model = retinanet_config()
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='spinenet', model_id=model_id, min_level=3, max_level=7, activation='relu',
      stochastic_depth_rate=0.0, norm_momentum=c.norm.get_ref('momentum'),
      norm_epsilon=c.norm.get_ref('epsilon'),
      # '' = SpineNet-49's specification; a name in spinenet_search.NAMED_SPECS or a JSON file.
      spec='', dropblock_keep_prob=1.0, dropblock_size=7, dropblock_warmup_steps=0,
      # The paper's scaling rule for this model (spinenet.SCALING_MAP), spelled out.
      **spinenet.SCALING_MAP[model_id]))
  c.model.neck = ml_collections.ConfigDict(dict(name='none'))
  c.model.anchor.anchor_size = spec['anchor_size']
  c.model.head.num_convs = spec['head_convs']
  c.model.head.num_filters = spec['head_filters']
  c.data = data_config('coco', a.size or spec['image_size'])
  c.eval_batch_size = 8
  apply_protocol(c, a.protocol, a.batch)
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100
  if a.shapes or a.demo:
    shapes_recipe(c)
  if a.demo:
    demo_recipe(c)
  if a.runlocal:
    runlocal(c)
    c.model.backbone.filter_size_scale = 0.25
    c.model.backbone.endpoints_num_filters = 32
    c.model.backbone.block_repeats = 1
  return c


def shapes_recipe(config):
  """The same model on the synthetic shapes dataset: a short schedule that fits a CPU."""
  shapes_data(config, 256)
  config.global_batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 1500
  config.optimizer.learning_rate = 0.08
  config.optimizer.reference_batch_size = 0
  config.optimizer.warmup_steps = 100
  config.optimizer.decay_boundaries = (0.8, 0.93)
  config.data.aug_scale_min, config.data.aug_scale_max = 0.8, 1.25
  config.model.postprocess.pre_nms_top_k = 1000
  # A schedule this short is not helped by stochastic depth.
  config.model.backbone.stochastic_depth_rate = 0.0
  config.checkpoint_every_steps = 500
  config.log_every_steps = 50
  return config


def demo_recipe(config):
  """The CPU demo: SpineNet's block graph at a quarter of 49S's width, 128 px, AdamW.

  Sized so that generating the data, training and evaluating fit in about 15 minutes on
  2 CPU cores (BENCHMARKS.md has the measured time and AP). The full-width 49S at 256 px
  trains at about 1 image/s on such a machine, too slow for a demo.
  """
  shapes_data(config, 128)
  # The classic synthetic-shapes task (up to 4 objects from ~16 px, smooth backgrounds): the
  # standard style's clutter and 9-px objects need far more training than 15 CPU minutes.
  config.data.shapes.style = 'simple'
  config.model.backbone.filter_size_scale = 0.25
  config.model.backbone.endpoints_num_filters = 64
  config.model.head.num_filters = 64
  # Batch 8 rather than 16: on 2 CPU cores it trains as many images per second (the smaller
  # step stays in cache) and gives twice the updates.
  config.global_batch_size = 8
  config.eval_batch_size = 50
  config.num_train_steps = 1700
  opt = config.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 2e-3
  opt.weight_decay = 1e-4
  opt.schedule = 'cosine'
  opt.warmup_steps = 100
  opt.warmup_init_lr = 0.0
  config.checkpoint_every_steps = 1000
  return config


def cpu_shapes_retinanet(config, *, batch, steps, learning_rate, weight_decay, warmup,
                         grad_clip_norm, checkpoint_every=None):
  """The part that RetinaNet's CPU shapes recipes share across backbones: 128 px shapes of
  the `simple` style (as the demo), a 64-wide neck and 2-conv head, anchor size 3, light
  scale jitter, cosine schedule."""
  shapes_data(config, 128)
  config.data.shapes.style = 'simple'
  config.model.neck.num_filters = 64
  config.model.head.num_filters = 64
  config.model.head.num_convs = 2
  config.model.anchor.anchor_size = 3.0
  config.model.postprocess.pre_nms_top_k = 1000
  config.data.aug_scale_min, config.data.aug_scale_max = 0.8, 1.25
  config.global_batch_size = batch
  config.eval_batch_size = 50
  config.num_train_steps = steps
  opt = config.optimizer
  opt.learning_rate = learning_rate
  opt.reference_batch_size = 0
  opt.weight_decay = weight_decay
  opt.schedule = 'cosine'
  opt.warmup_steps = warmup
  opt.warmup_init_lr = 0.0
  opt.grad_clip_norm = grad_clip_norm
  config.checkpoint_every_steps = checkpoint_every or steps
  config.log_every_steps = 25
  return config
