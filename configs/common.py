"""Pieces shared by every config file.

A config file defines `get_config(arg=None)` and returns an `ml_collections.ConfigDict`.
`arg` is the string after the colon on the command line
(`configs/spinenet49.py:shapes,runlocal,protocol=B`); `parse_arg` turns it into typed values.
"""

import ml_collections

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
  d.max_instances = 100             # N in DESIGN.md
  d.with_masks = False
  d.mask_size = 112                 # M in DESIGN.md
  d.shuffle_buffer = 1000
  d.num_eval_images = -1            # -1: the whole eval split
  d.skip_crowd_in_train = True
  # The synthetic dataset (jaxdet/data/shapes.py).
  d.shapes = ml_collections.ConfigDict(dict(
      num_train=2000, num_validation=500, image_size=256, seed=0))
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
  m.min_level = 3
  m.max_level = 7
  m.head = ml_collections.ConfigDict(dict(
      num_convs=4, num_filters=256, use_separable_conv=False,
      level_specific_norm=True, prior_prob=0.01))
  m.anchor = ml_collections.ConfigDict(dict(
      num_scales=3, aspect_ratios=(1.0, 2.0, 0.5), anchor_size=3.0))
  m.matcher = ml_collections.ConfigDict(dict(
      positive_threshold=0.5, negative_threshold=0.5, allow_low_quality=True))
  m.loss = ml_collections.ConfigDict(dict(
      focal_alpha=0.25, focal_gamma=1.5, huber_delta=0.1, box_weight=50.0,
      normalizer_momentum=0.0))   # >0: moving average of the positive count
  m.postprocess = ml_collections.ConfigDict(dict(
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
  c.global_batch_size = 64
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0            # 0: evaluate only at the end of training
  c.init_from = ''                  # a params-only checkpoint to start from
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
  return c
