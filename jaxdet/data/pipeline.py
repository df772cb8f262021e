"""tf.data input pipelines: canonical source examples -> augmented, padded numpy batches.

A source module (`jaxdet/data/shapes.py`, `jaxdet/data/coco.py`) yields canonical
examples; this module sanitises, augments (`transforms.py`), pads the instances to
N = data.max_instances and batches them into the data contract of DESIGN.md:

  image      float32 [B, H, W, 3]  ImageNet-normalised, zero-padded to a multiple of
                                   data.size_divisor
  image_id   int64   [B]           -1 for padding examples
  orig_size  int32   [B, 2]        (h, w) of the original image
  scale      float32 [B, 2]        (sy, sx)
  offset     float32 [B, 2]        (oy, ox)
  valid_size float32 [B, 2]        (h, w) of the image content on the canvas (input
                                   pixels); beyond it is padding
  boxes      float32 [B, N, 4]     (x1, y1, x2, y2) input pixels; zeros for padding
  classes    int32   [B, N]        contiguous ids 0..C-1; -1 for padding
  is_crowd   bool    [B, N]
  masks      uint8   [B, N, M, M]  only with data.with_masks; each instance's mask
                                   cropped to its own box, M = data.mask_size

Coordinates: `input_xy = original_xy * scale - offset`, where `offset` is the crop's
top-left corner in resized pixels (0 at eval); so `original_xy = (input_xy + offset) /
scale`. Boxes use continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1).

Training order and resumption. The training stream is an endless sequence of epochs;
epoch e is the process's shard read in source order through a shuffle buffer of
data.shuffle_buffer examples seeded by (seed, shard_index, e), so every epoch has its
own order without TensorFlow's stateful reshuffling. The example at stream position p
is augmented with a stateless seed derived from (seed, shard_index, p). An iterator
started at `start_step` therefore skips whole epochs arithmetically, then reads (but
does not augment) the first `start_step * batch_size mod n` examples of its epoch,
and yields exactly the batches a fresh iterator yields from step `start_step` on.
Trade-off: a buffer shuffle only mixes examples within about `shuffle_buffer`
positions of each other (not a full permutation), in exchange for O(buffer) memory
on datasets of any size; resuming costs reading up to one epoch of the shard.
The shuffle order uses TensorFlow's seeded shuffle, so it also depends on
TensorFlow's global seed (`tf.random.set_seed`), which jaxdet never sets, and may
change between TensorFlow versions.
"""

import importlib
import math

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

from jaxdet.data import transforms

# tf.data only: TensorFlow must not claim the accelerators that JAX uses.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

# data.name -> the module that reads it.
_SOURCES = {
    'shapes': 'jaxdet.data.shapes',
    'coco': 'jaxdet.data.coco',
    'coco_json': 'jaxdet.data.coco',
}

_FOREVER = 2**62

# More than max_instances objects is reported once per process, not per image.
_truncation_warned = False


def _source(data_cfg):
  if data_cfg.name not in _SOURCES:
    raise ValueError(f'Unknown dataset data.name={data_cfg.name!r}; '
                     f'valid names are {sorted(_SOURCES)}.')
  return importlib.import_module(_SOURCES[data_cfg.name])


def num_classes(data_cfg):
  """Number of contiguous classes C of the dataset."""
  return len(category_ids(data_cfg))


def category_ids(data_cfg):
  """Dataset category id of each contiguous class id 0..C-1 (list of C ints)."""
  return list(_source(data_cfg).category_ids(data_cfg))


def class_names(data_cfg):
  """Name of each contiguous class id 0..C-1 (list of C strings)."""
  return list(_source(data_cfg).class_names(data_cfg))


def ground_truth(data_cfg, split):
  """pycocotools `COCO` object holding the ground truth of `split`."""
  return _source(data_cfg).ground_truth(data_cfg, split)


def check_available(data_cfg, split):
  """Stops a run before any work when `split` of the dataset cannot be read.

  Raises ValueError for an unknown data.name or an empty split; the source module's own
  error (with its advice) for a missing dataset. Returns the number of examples.
  """
  count = int(_source(data_cfg).num_examples(data_cfg, split, shard_index=0, shard_count=1))
  if count == 0:
    raise ValueError(f'Split {split!r} of dataset {data_cfg.name!r} has no examples; '
                     f'check data.data_dir and the split name.')
  return count


def _cardinality(dataset):
  n = int(dataset.cardinality())
  if n == tf.data.INFINITE_CARDINALITY:
    raise ValueError('The source dataset must be finite (one pass over the split).')
  if n == tf.data.UNKNOWN_CARDINALITY:
    n = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
  return n


def _shard(data_cfg, split, shard_index, shard_count, source_dataset):
  """This process's canonical examples and their count.

  `source_dataset`, when given, is the whole split in canonical form and is sharded
  here round-robin; otherwise the source module shards the split itself.
  """
  if source_dataset is not None:
    shard = source_dataset.shard(shard_count, shard_index)
    return shard, _cardinality(shard)
  source = _source(data_cfg)
  kwargs = dict(shard_index=shard_index, shard_count=shard_count)
  return (source.dataset(data_cfg, split, **kwargs),
          int(source.num_examples(data_cfg, split, **kwargs)))


def pad_instances(example, max_instances):
  """Truncates / pads the instance tensors of one example to a static N.

  Args:
    example: dict from `transforms.train_preprocess` / `eval_preprocess`: 'boxes'
      [k, 4], 'classes' [k], 'is_crowd' [k], optional 'masks' [k, M, M].
    max_instances: N.

  Returns:
    The dict with 'boxes' [N, 4] (zeros for padding), 'classes' [N] (-1 for padding),
    'is_crowd' [N] (False), 'masks' [N, M, M] (zeros), plus 'num_instances' int32 [],
    the count k before truncation (checked on the host, then dropped).
  """
  out = dict(example)
  out['num_instances'] = tf.shape(example['boxes'])[0]
  pad_values = {'boxes': 0.0, 'classes': -1, 'is_crowd': False, 'masks': 0}
  for key, value in pad_values.items():
    if key not in out:
      continue
    x = out[key][:max_instances]
    paddings = [[0, max_instances - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
    x = tf.pad(x, paddings, constant_values=tf.constant(value, x.dtype))
    x.set_shape([max_instances] + x.shape.as_list()[1:])
    out[key] = x
  return out


def _options():
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from the parallel map; one thread per op avoids oversubscribing
  # the host cores that also feed the accelerators.
  options.threading.max_intra_op_parallelism = 1
  return options


def _host_batches(dataset, max_instances):
  """Numpy batches of `dataset`, with the one-time truncation warning."""
  global _truncation_warned
  for batch in dataset.as_numpy_iterator():
    counts = batch.pop('num_instances')
    if not _truncation_warned and counts.size and counts.max() > max_instances:
      i = int(np.argmax(counts))
      logging.warning(
          'Image %d has %d objects, more than data.max_instances=%d; keeping the first '
          '%d. Further truncations in this run are not reported.',
          batch['image_id'][i], counts[i], max_instances, max_instances)
      _truncation_warned = True
    yield batch


def train_dataset(data_cfg, *, batch_size, seed, start_step=0, shard_index=0,
                  shard_count=1, source_dataset=None):
  """The endless training `tf.data.Dataset` of batches (see `train_iterator`).

  Its elements are the data contract plus 'num_instances' int32 [B] (instances before
  truncation to N).
  """
  examples, n = _shard(data_cfg, data_cfg.train_split, shard_index, shard_count,
                       source_dataset)
  if n == 0:
    raise ValueError(f'Split {data_cfg.train_split!r} of {data_cfg.name!r} has no '
                     f'examples for shard {shard_index} of {shard_count}.')
  start = int(start_step) * int(batch_size)
  first_epoch, skip = divmod(start, n)

  fold_in = tf.random.experimental.stateless_fold_in
  root = tf.constant([seed, shard_index], tf.int64)
  shuffle_key, augment_key = fold_in(root, 0), fold_in(root, 1)
  buffer_size = max(int(data_cfg.shuffle_buffer), 1)

  # The transforms use no Python control flow on tensors: skip autograph's conversion,
  # which costs more than the tracing itself.
  @tf.autograph.experimental.do_not_convert
  def one_epoch(epoch):
    op_seed = tf.random.stateless_uniform(
        [], fold_in(shuffle_key, epoch), minval=0, maxval=2**31 - 1, dtype=tf.int64)
    return examples.shuffle(buffer_size, seed=op_seed)

  @tf.autograph.experimental.do_not_convert
  def prepare(position, example):
    example = transforms.train_preprocess(example, fold_in(augment_key, position), data_cfg)
    return pad_instances(example, data_cfg.max_instances)

  stream = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(one_epoch).skip(skip)
  positions = tf.data.Dataset.range(start, _FOREVER)
  dataset = tf.data.Dataset.zip((positions, stream))
  dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return dataset.with_options(_options())


def train_iterator(data_cfg, *, batch_size, seed, start_step=0, shard_index=0,
                   shard_count=1, source_dataset=None):
  """Endless iterator of augmented training batches for this process.

  Args:
    data_cfg: the data config (configs/common.py `data_config`).
    batch_size: examples per batch on this process (the per-process batch).
    seed: int, the run's seed; order and augmentation are a function of
      (seed, shard_index) and the position in the stream.
    start_step: first batch to yield; equal to batch `start_step` of an iterator
      started at 0.
    shard_index, shard_count: this process's shard of the split.
    source_dataset: optional canonical `tf.data.Dataset` of the whole split, instead of
      the source module of data_cfg.name (sharded here with `Dataset.shard`).

  Yields:
    dicts of numpy arrays, the data contract (module docstring) with B = batch_size.
    Crowd instances are removed when data.skip_crowd_in_train.
  """
  dataset = train_dataset(
      data_cfg, batch_size=batch_size, seed=seed, start_step=start_step,
      shard_index=shard_index, shard_count=shard_count, source_dataset=source_dataset)
  yield from _host_batches(dataset, data_cfg.max_instances)


def _eval_shard_sizes(data_cfg, shard_count, source_dataset):
  """Examples each shard evaluates, after the data.num_eval_images limit."""
  split = data_cfg.eval_split
  if source_dataset is not None:
    total = _cardinality(source_dataset)
    sizes = [len(range(k, total, shard_count)) for k in range(shard_count)]
  else:
    source = _source(data_cfg)
    sizes = [int(source.num_examples(data_cfg, split, shard_index=k, shard_count=shard_count))
             for k in range(shard_count)]
  limit = int(data_cfg.num_eval_images)
  if limit > 0:
    # The limit is global: shard k takes its share of it.
    sizes = [min(size, limit // shard_count + (k < limit % shard_count))
             for k, size in enumerate(sizes)]
  return sizes


def num_eval_batches(data_cfg, *, batch_size, shard_count=1, source_dataset=None):
  """Batches every process's `eval_iterator` yields (the same on all processes)."""
  sizes = _eval_shard_sizes(data_cfg, shard_count, source_dataset)
  return math.ceil(max(sizes) / batch_size)


def _padding_examples(data_cfg, count):
  """`count` padding examples in contract form (image_id -1, no instances)."""
  canvas = transforms.padded_size(data_cfg.image_size, data_cfg.size_divisor)
  n = data_cfg.max_instances
  out = {
      'image': np.zeros([count, canvas, canvas, 3], np.float32),
      'image_id': np.full([count], -1, np.int64),
      'orig_size': np.full([count, 2], canvas, np.int32),
      'scale': np.ones([count, 2], np.float32),
      'offset': np.zeros([count, 2], np.float32),
      'valid_size': np.full([count, 2], canvas, np.float32),
      'boxes': np.zeros([count, n, 4], np.float32),
      'classes': np.full([count, n], -1, np.int32),
      'is_crowd': np.zeros([count, n], bool),
  }
  if data_cfg.with_masks:
    out['masks'] = np.zeros([count, n, data_cfg.mask_size, data_cfg.mask_size], np.uint8)
  return out


def eval_iterator(data_cfg, *, batch_size, shard_index=0, shard_count=1,
                  source_dataset=None):
  """One in-order pass over this process's shard of data.eval_split.

  Every process yields `num_eval_batches(...)` batches: the last real batch is padded,
  and a process with fewer examples adds all-padding batches, so that multi-process
  evaluation runs the same number of steps everywhere. Padding examples have
  image_id -1 and no instances. data.num_eval_images > 0 limits the examples over all
  processes together.

  Args:
    data_cfg: the data config.
    batch_size: examples per batch on this process.
    shard_index, shard_count: this process's shard.
    source_dataset: optional canonical dataset of the whole split (see `train_iterator`).

  Yields:
    dicts of numpy arrays, the data contract with B = batch_size; eval geometry (long
    side resized to data.image_size, offset 0, no flip), crowd instances kept.
  """
  sizes = _eval_shard_sizes(data_cfg, shard_count, source_dataset)
  num_batches = math.ceil(max(sizes) / batch_size)
  examples, _ = _shard(data_cfg, data_cfg.eval_split, shard_index, shard_count,
                       source_dataset)

  @tf.autograph.experimental.do_not_convert
  def prepare(example):
    return pad_instances(transforms.eval_preprocess(example, data_cfg),
                         data_cfg.max_instances)

  dataset = examples.take(sizes[shard_index])
  dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())
  yielded = 0
  for batch in _host_batches(dataset, data_cfg.max_instances):
    missing = batch_size - len(batch['image_id'])
    if missing:
      padding = _padding_examples(data_cfg, missing)
      batch = {k: np.concatenate([v, padding[k]]) for k, v in batch.items()}
    yielded += 1
    yield batch
  for _ in range(num_batches - yielded):
    yield _padding_examples(data_cfg, batch_size)


def preprocess_image(image, data_cfg):
  """Eval geometry for one image to predict on, as a batch of one.

  Args:
    image: [H, W, 3] uint8 RGB (e.g. from `load_image`).
    data_cfg: the data config.

  Returns:
    dict of numpy arrays shaped like an `eval_iterator` batch with B = 1, image_id 0
    and empty ground truth (classes -1, zero boxes/masks).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'Expected a [H, W, 3] uint8 RGB image, got {image.dtype} '
                     f'{image.shape}; load_image() converts files to that.')
  h, w = image.shape[:2]
  example = {'image': image, 'image_id': np.int64(0),
             'boxes': np.zeros([0, 4], np.float32),
             'classes': np.zeros([0], np.int32),
             'is_crowd': np.zeros([0], bool)}
  if data_cfg.with_masks:
    example['masks'] = np.zeros([0, h, w], np.uint8)
  out = pad_instances(transforms.eval_preprocess(example, data_cfg), data_cfg.max_instances)
  out.pop('num_instances')
  return {k: v.numpy()[None] for k, v in out.items()}


def _to_rgb(img):
  """PIL image of any mode -> 8-bit RGB."""
  if img.mode.startswith('I;16'):
    # 16-bit grayscale: keep the high byte rather than letting PIL saturate at 255.
    gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')
  if img.mode == 'P':
    # Palette transparency is only resolved through RGBA.
    img = img.convert('RGBA')
  return img.convert('RGB')


def load_image(path):
  """Decodes an image file to upright 8-bit RGB.

  EXIF orientation is applied; grayscale, RGBA, palette, CMYK and 16-bit images are
  converted to RGB (alpha is dropped).

  Args:
    path: file path (str or os.PathLike).

  Returns:
    [H, W, 3] uint8 numpy array, or None (after a warning naming the file) when the
    file cannot be read or decoded.
  """
  try:
    with Image.open(path) as img:
      img.load()
      upright = ImageOps.exif_transpose(img)
      return np.asarray(_to_rgb(upright), np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    logging.warning('Skipping %s: not a readable image (%s: %s).',
                    path, type(e).__name__, e)
    return None
