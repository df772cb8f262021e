"""Per-example geometry and photometry for detection inputs, as TensorFlow ops.

Everything here runs inside `tf.data.Dataset.map` (graph mode) on one example at a
time, with instance counts that vary per image; `pipeline.py` pads to the static
shapes of the data contract afterwards.

Boxes are float32 corners `(x1, y1, x2, y2)` in continuous pixel coordinates of the
image they belong to: pixel (i, j) covers `[j, j + 1) x [i, i + 1)`.

The geometry is TF Model Garden's `resize_and_crop_image`: the image is resized with
its aspect ratio kept so that its long side is `image_size * r` (r = 1 at eval,
r ~ U(aug_scale_min, aug_scale_max) in training), a window of at most
`image_size x image_size` is cropped at a random integer offset where the resized
image is larger, and the result is zero-padded at the bottom and right to a square
canvas whose side is `image_size` rounded up to a multiple of `size_divisor`.
`data.resize = 'short_side'` selects DETR's geometry instead (short side drawn from a
list, long side capped, optional random-size crop: `resize_short_side_and_crop`); it
ends on the same canvas with the same `scale` / `offset` meaning. With
`scale = (sy, sx)` the per-axis resize factors and `offset = (oy, ox)` the crop's
top-left corner in resized pixels,

    input_xy = original_xy * scale - offset,   original_xy = (input_xy + offset) / scale.

Horizontal flips happen before the resize, in the original frame, so `scale` and
`offset` describe the flipped image (flips are training-only; eval never flips).

All randomness is stateless, drawn from a per-example seed (`[2]` int tensor), so an
example's augmentation depends only on that seed and the example itself; this is
what lets the training pipeline resume mid-epoch exactly.
"""

import tensorflow as tf

# tf.data only: TensorFlow must not claim the accelerators that JAX uses. Raises only
# when the runtime is already initialised with other settings; then they stay.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

# ImageNet statistics of [0, 1] RGB, the normalisation every pretrained backbone expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Boxes narrower or lower than this (pixels) after clipping carry no object.
MIN_BOX_SIZE = 1e-3

_INSTANCE_KEYS = ('boxes', 'classes', 'is_crowd', 'masks')


def padded_size(image_size, size_divisor):
  """Side of the square input canvas: image_size rounded up to a multiple of size_divisor."""
  return -(-int(image_size) // int(size_divisor)) * int(size_divisor)


def normalize_image(image):
  """ImageNet mean/std normalisation.

  Args:
    image: [H, W, 3] uint8 RGB.

  Returns:
    [H, W, 3] float32, (image / 255 - mean) / std.
  """
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def clip_boxes(boxes, height, width):
  """Clips boxes to `[0, width] x [0, height]`.

  Args:
    boxes: [n, 4] float32 (x1, y1, x2, y2).
    height, width: scalar (float or tensor) limits in the boxes' pixels.

  Returns:
    [n, 4] float32 clipped boxes.
  """
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
  return tf.stack([tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(y1, 0.0, height),
                   tf.clip_by_value(x2, 0.0, width), tf.clip_by_value(y2, 0.0, height)],
                  axis=-1)


def nonempty(boxes, min_size=MIN_BOX_SIZE):
  """[n] bool: width and height both above `min_size`. boxes: [n, 4] (x1, y1, x2, y2)."""
  return ((boxes[:, 2] - boxes[:, 0] > min_size) &
          (boxes[:, 3] - boxes[:, 1] > min_size))


def sanitize_boxes(boxes, height, width):
  """Makes untrusted source boxes usable: drops non-finite ones, clips, drops empty ones.

  A box with NaN/inf, zero or negative width/height, or no overlap with the image is
  dropped; one that sticks out of the image is clipped to it.

  Args:
    boxes: [n, 4] float32 (x1, y1, x2, y2) in pixels of an image of `height x width`.
    height, width: scalar image size.

  Returns:
    (boxes, keep): [n, 4] float32 clipped boxes (non-finite ones zeroed) and a [n]
    bool mask of the boxes to keep.
  """
  boxes = tf.cast(boxes, tf.float32)
  finite = tf.reduce_all(tf.math.is_finite(boxes), axis=-1)
  boxes = tf.where(finite[:, None], boxes, tf.zeros_like(boxes))
  boxes = clip_boxes(boxes, height, width)
  return boxes, finite & nonempty(boxes)


def select_instances(example, keep):
  """Keeps the instances where `keep` is True.

  Args:
    example: dict with any of 'boxes' [n, 4], 'classes' [n], 'is_crowd' [n],
      'masks' [n, ...]; other keys pass through.
    keep: [n] bool.

  Returns:
    A new dict with the instance keys reduced to the kept instances.
  """
  out = dict(example)
  for key in _INSTANCE_KEYS:
    if key in out:
      out[key] = tf.boolean_mask(out[key], keep)
  return out


def horizontal_flip(image, boxes, masks=None):
  """Mirrors an image left-right with its boxes and full-image masks.

  Args:
    image: [H, W, C].
    boxes: [n, 4] float32 (x1, y1, x2, y2) in this image's pixels.
    masks: optional [n, H, W].

  Returns:
    (image, boxes, masks) flipped; masks is None when not given. A box
    [x1, x2) maps to [W - x2, W - x1).
  """
  width = tf.cast(tf.shape(image)[1], tf.float32)
  image = tf.reverse(image, axis=[1])
  x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
  boxes = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
  if masks is not None:
    masks = tf.reverse(masks, axis=[2])
  return image, boxes, masks


def resize_and_crop_image(image, image_size, size_divisor, *, scale_min=1.0,
                          scale_max=1.0, seed=None):
  """Aspect-preserving resize, random crop and zero padding (Model Garden semantics).

  The image is resized so that its long side is `image_size * r` with
  r ~ U(scale_min, scale_max) (r = 1 without a seed). Where the resized image is larger
  than `image_size`, an `image_size` window is cropped at an integer offset drawn
  uniformly over the valid range (offset 0 without a seed). The result is zero-padded at
  the bottom/right to `padded_size(image_size, size_divisor)`.

  Args:
    image: [H, W, C] float32 (already normalised, so the padding is the mean colour).
    image_size: int, side of the crop window.
    size_divisor: int, the canvas side is a multiple of it.
    scale_min, scale_max: range of the random scale factor r.
    seed: optional [2] int stateless seed; None means no randomness (eval geometry).

  Returns:
    image: [P, P, C] float32, P = padded_size(image_size, size_divisor).
    scale: [2] float32 (sy, sx), resized size / original size per axis.
    offset: [2] float32 (oy, ox), crop corner in resized pixels.
    valid: [2] float32 (h, w) of the image content on the canvas (input pixels).
  """
  canvas = padded_size(image_size, size_divisor)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  if seed is None:
    r = tf.constant(1.0)
  else:
    scale_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    r = tf.random.stateless_uniform([], scale_seed, minval=scale_min, maxval=scale_max)
  factor = r * float(image_size) / tf.maximum(tf.reduce_max(hw), 1.0)
  scaled = tf.maximum(tf.round(hw * factor), 1.0)
  # Per-axis factors of the integer-size resize: exact for boxes, since the
  # half-pixel-centre bilinear resize maps continuous coordinates linearly.
  scale = scaled / tf.maximum(hw, 1.0)
  image = tf.image.resize(image, tf.cast(scaled, tf.int32), method='bilinear')
  image, offset, valid = _window_on_canvas(image, image_size, canvas,
                                           None if seed is None else offset_seed)
  return image, scale, offset, valid


def _window_on_canvas(image, image_size, canvas, seed):
  """Cuts an `image_size` window out of a resized image (at a uniform integer offset with
  a seed, at 0 without; only where the image is larger) and zero-pads it to canvas x canvas.

  Returns the image [canvas, canvas, C], the window's corner (oy, ox) and the content size
  (h, w) on the canvas, both float32 [2].
  """
  size = tf.shape(image)[:2]
  max_offset = tf.maximum(size - image_size, 0)
  if seed is None:
    offset = tf.zeros([2], tf.int32)
  else:
    u = tf.random.stateless_uniform([2], seed)
    offset = tf.minimum(
        tf.cast(tf.floor(u * tf.cast(max_offset + 1, tf.float32)), tf.int32), max_offset)
  valid = tf.minimum(size - offset, image_size)
  image = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([valid, [-1]], 0))
  image = tf.image.pad_to_bounding_box(image, 0, 0, canvas, canvas)
  image.set_shape([canvas, canvas, image.shape[-1]])
  return image, tf.cast(offset, tf.float32), tf.cast(valid, tf.float32)


def _choice(values, seed):
  """One of the static ints `values`, uniformly, as a float32 scalar."""
  values = tf.constant(values, tf.float32)
  i = tf.random.stateless_uniform([], seed, 0, tf.shape(values)[0], dtype=tf.int32)
  return values[i]


def _randint(low, high, seed):
  """Uniform integer in [low, high] (float32 scalars holding integers, low <= high)."""
  u = tf.random.stateless_uniform([], seed)
  return tf.minimum(low + tf.floor(u * (high - low + 1.0)), high)


def short_side_factor(hw, short_side, max_size):
  """Resize factor that brings the short side of `hw` to `short_side` unless the long side
  would then exceed `max_size`, in which case the long side becomes `max_size` (the rule of
  detectron2's ResizeShortestEdge and DETR's `get_size`)."""
  short = tf.maximum(tf.reduce_min(hw), 1.0)
  long = tf.maximum(tf.reduce_max(hw), 1.0)
  return tf.minimum(short_side / short, float(max_size) / long)


def resize_short_side_and_crop(image, image_size, size_divisor, *, short_sides, max_size,
                               eval_short_side, crop_probability=0.0,
                               crop_resize_sides=(400, 500, 600), crop_min=384,
                               crop_max=600, seed=None):
  """DETR's multi-scale geometry (short side from a list, long side capped), static canvas.

  Training (a seed): with probability `crop_probability`, first DETR's random-size crop:
  the image is viewed at a short side drawn from `crop_resize_sides`, and a window of
  height and width drawn from [crop_min, min(crop_max, side)] is cut at a random position
  of that view. Then the image (or the window) is resized so that its short side is drawn
  from `short_sides` and its long side is at most `max_size`. Both resizes compose into one:
  the window is cut from the original pixels and resampled once, so the result is an
  affine view `input = original * scale - offset` as in `resize_and_crop_image`. Where
  the resized content exceeds the `image_size` canvas (images more elongated than the
  canvas allows), a random `image_size` window of it is kept.

  Eval (no seed): short side `eval_short_side`, long side at most `max_size` and at most
  `image_size`, so that no content is cropped.

  Returns:
    image [P, P, C], scale [2] (sy, sx), offset [2] (oy, ox), valid [2] (h, w), with the
    meaning of `resize_and_crop_image`'s outputs.
  """
  canvas = padded_size(image_size, size_divisor)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  if seed is None:
    factor = tf.minimum(short_side_factor(hw, float(eval_short_side), max_size),
                        float(image_size) / tf.maximum(tf.reduce_max(hw), 1.0))
    corner, window = tf.zeros([2]), hw
  else:
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
    corner, window = tf.zeros([2]), hw
    if crop_probability > 0:
      # The random-size crop, expressed in original pixels: a window of (h, w) at the
      # intermediate view's scale s is a window of (h, w) / s in the original.
      s = short_side_factor(hw, _choice(crop_resize_sides, seeds[0]), 1e9)
      view = tf.round(hw * s)
      ch = _randint(tf.minimum(float(crop_min), view[0]), tf.minimum(float(crop_max), view[0]),
                    seeds[1])
      cw = _randint(tf.minimum(float(crop_min), view[1]), tf.minimum(float(crop_max), view[1]),
                    seeds[2])
      cy = _randint(0.0, view[0] - ch, seeds[3])
      cx = _randint(0.0, view[1] - cw, seeds[4])
      crop_corner = tf.floor(tf.stack([cy, cx]) / s)
      crop_window = tf.maximum(
          tf.minimum(tf.round(tf.stack([ch, cw]) / s), hw - crop_corner), 1.0)
      do_crop = tf.random.stateless_uniform([], seeds[5]) < crop_probability
      corner = tf.where(do_crop, crop_corner, corner)
      window = tf.where(do_crop, crop_window, window)
    factor = short_side_factor(window, _choice(short_sides, seeds[6]), max_size)
  corner_int = tf.cast(corner, tf.int32)
  window_int = tf.cast(window, tf.int32)
  image = tf.slice(image, tf.concat([corner_int, [0]], 0), tf.concat([window_int, [-1]], 0))
  scaled = tf.maximum(tf.round(window * factor), 1.0)
  scale = scaled / tf.maximum(window, 1.0)
  image = tf.image.resize(image, tf.cast(scaled, tf.int32), method='bilinear')
  # The canvas window over the resized content (a random one where it does not fit).
  image, canvas_offset, valid = _window_on_canvas(image, image_size, canvas,
                                                  None if seed is None else seeds[7])
  return image, scale, corner * scale + canvas_offset, valid


RESIZE_MODES = ('long_side', 'short_side')


def resize_image(image, data_cfg, seed=None):
  """The geometry `data_cfg.resize` names, with the config's parameters (training view
  with a seed, eval view without)."""
  check_geometry(data_cfg)
  mode = data_cfg.get('resize', 'long_side')
  if mode == 'long_side':
    return resize_and_crop_image(
        image, data_cfg.image_size, data_cfg.size_divisor, scale_min=data_cfg.aug_scale_min,
        scale_max=data_cfg.aug_scale_max, seed=seed)
  if mode == 'short_side':
    crop = data_cfg.random_size_crop
    return resize_short_side_and_crop(
        image, data_cfg.image_size, data_cfg.size_divisor,
        short_sides=tuple(data_cfg.short_sides), max_size=data_cfg.max_size,
        eval_short_side=data_cfg.eval_short_side, crop_probability=crop.probability,
        crop_resize_sides=tuple(crop.resize_sides), crop_min=crop.min_size,
        crop_max=crop.max_size, seed=seed)


def check_geometry(data_cfg):
  """Raises ValueError naming the field when the config's resize parameters cannot work."""
  mode = data_cfg.get('resize', 'long_side')
  if mode not in RESIZE_MODES:
    raise ValueError(f'data.resize={mode!r}; use one of {RESIZE_MODES}.')
  if mode == 'long_side':
    if not 0 < data_cfg.aug_scale_min <= data_cfg.aug_scale_max:
      raise ValueError(f'data.aug_scale_min={data_cfg.aug_scale_min}, data.aug_scale_max='
                       f'{data_cfg.aug_scale_max}: need 0 < min <= max.')
    return
  sides = tuple(data_cfg.short_sides)
  if not sides or min(sides) <= 0:
    raise ValueError(f'data.resize=short_side needs positive data.short_sides, got {sides}.')
  if data_cfg.eval_short_side <= 0 or data_cfg.max_size <= 0:
    raise ValueError(f'data.eval_short_side={data_cfg.eval_short_side} and data.max_size='
                     f'{data_cfg.max_size} must be positive.')
  crop = data_cfg.random_size_crop
  if not 0.0 <= crop.probability <= 1.0:
    raise ValueError(f'data.random_size_crop.probability={crop.probability}: not in [0, 1].')
  if crop.probability > 0 and not (
      tuple(crop.resize_sides) and 0 < crop.min_size <= crop.max_size):
    raise ValueError(f'data.random_size_crop: need resize_sides and 0 < min_size <= '
                     f'max_size, got {crop.resize_sides}, {crop.min_size}, {crop.max_size}.')


def resize_and_crop_boxes(boxes, scale, offset, valid):
  """Maps boxes into the input canvas and clips them to the image content there.

  Args:
    boxes: [n, 4] float32 (x1, y1, x2, y2) original pixels.
    scale: [2] (sy, sx); offset: [2] (oy, ox); valid: [2] (h, w) content size, all as
      returned by `resize_and_crop_image`.

  Returns:
    [n, 4] float32 boxes in input pixels, `original * scale - offset`, clipped to
    `[0, w] x [0, h]`; boxes outside the crop become empty (see `nonempty`).
  """
  sx_sy = tf.tile(tf.reverse(scale, [0]), [2])     # (sx, sy, sx, sy)
  ox_oy = tf.tile(tf.reverse(offset, [0]), [2])
  return clip_boxes(boxes * sx_sy - ox_oy, valid[0], valid[1])


def input_to_original(boxes, scale, offset):
  """Inverse of the canvas mapping: (input + offset) / scale.

  Args:
    boxes: [n, 4] float32 (x1, y1, x2, y2) input pixels.
    scale: [2] (sy, sx); offset: [2] (oy, ox).

  Returns:
    [n, 4] float32 boxes in original pixels.
  """
  sx_sy = tf.tile(tf.reverse(scale, [0]), [2])
  ox_oy = tf.tile(tf.reverse(offset, [0]), [2])
  return (boxes + ox_oy) / sx_sy


def crop_and_resize_masks(masks, boxes, mask_size):
  """Crops each instance's full-image mask to its box and resizes it to M x M.

  Sampling is RoIAlign with aligned=True and one bilinear sample per output cell, then a
  0.5 threshold (detectron2 `BitMasks.crop_and_resize`): cell k of M along x samples the
  continuous coordinate x1 + (k + 0.5) (x2 - x1) / M, i.e. that minus 0.5 in pixel-index
  coordinates. Samples outside the pixel centres take the edge value, as RoIAlign does.
  This is `tf.image.crop_and_resize` (bilinear) with those sample points, written as
  gathers so that only the 4 M^2 neighbours per instance are read and the edge rule
  needs no padded copy of the full-image masks.

  Args:
    masks: [n, H, W] uint8, non-zero inside the instance.
    boxes: [n, 4] float32 (x1, y1, x2, y2) in the masks' pixels.
    mask_size: int M.

  Returns:
    [n, M, M] uint8 in {0, 1}.
  """
  cells = (tf.range(mask_size, dtype=tf.float32) + 0.5) / float(mask_size)   # [M]
  x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)

  def neighbours(lo, hi, size):
    """Index pairs [n, M] around the samples between lo and hi, and the upper weight."""
    coords = lo[:, None] + cells[None, :] * (hi - lo)[:, None] - 0.5            # [n, M]
    floor = tf.floor(coords)
    last = tf.cast(size - 1, tf.float32)
    below = tf.cast(tf.clip_by_value(floor, 0.0, last), tf.int32)
    above = tf.cast(tf.clip_by_value(floor + 1.0, 0.0, last), tf.int32)
    return below, above, coords - floor

  shape = tf.shape(masks)
  y_lo, y_hi, wy = neighbours(y1, y2, shape[1])
  x_lo, x_hi, wx = neighbours(x1, x2, shape[2])

  def sample(rows, cols):
    picked = tf.gather(masks, rows, axis=1, batch_dims=1)                     # [n, M, W]
    picked = tf.gather(picked, cols, axis=2, batch_dims=1)                    # [n, M, M]
    return tf.cast(tf.minimum(picked, 1), tf.float32)

  wx, wy = wx[:, None, :], wy[:, :, None]
  top = sample(y_lo, x_lo) * (1.0 - wx) + sample(y_lo, x_hi) * wx
  bottom = sample(y_hi, x_lo) * (1.0 - wx) + sample(y_hi, x_hi) * wx
  values = top * (1.0 - wy) + bottom * wy
  return tf.cast(values >= 0.5, tf.uint8)


def _preprocess(example, data_cfg, seed, train):
  """Shared body of train_preprocess / eval_preprocess."""
  image = example['image']
  hw = tf.shape(image)[:2]
  boxes, keep = sanitize_boxes(example['boxes'], hw[0], hw[1])
  instances = {'boxes': boxes,
               'classes': tf.cast(example['classes'], tf.int32),
               'is_crowd': tf.cast(example['is_crowd'], tf.bool)}
  with_masks = data_cfg.with_masks
  if with_masks:
    instances['masks'] = tf.cast(example['masks'], tf.uint8)
  if train and data_cfg.skip_crowd_in_train:
    keep &= tf.logical_not(instances['is_crowd'])
  instances = select_instances(instances, keep)

  crop_seed = None
  if train:
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if data_cfg.aug_flip:
      do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
      args = (image, instances['boxes']) + ((instances['masks'],) if with_masks else ())
      flipped = tf.cond(do_flip, lambda: horizontal_flip(*args)[:len(args)], lambda: args)
      image, instances['boxes'] = flipped[:2]
      if with_masks:
        instances['masks'] = flipped[2]

  image, scale, offset, valid = resize_image(normalize_image(image), data_cfg, crop_seed)
  instances['boxes'] = resize_and_crop_boxes(instances['boxes'], scale, offset, valid)
  instances = select_instances(instances, nonempty(instances['boxes']))
  if with_masks:
    instances['masks'] = crop_and_resize_masks(
        instances['masks'], input_to_original(instances['boxes'], scale, offset),
        data_cfg.mask_size)
  return {'image': image,
          'image_id': tf.cast(example['image_id'], tf.int64),
          'orig_size': tf.cast(hw, tf.int32),
          'scale': scale,
          'offset': offset,
          'valid_size': valid,
          **instances}


def train_preprocess(example, seed, data_cfg):
  """Training view of one canonical example: sanitise, flip, scale jitter, crop, pad.

  Args:
    example: canonical source example: 'image' [H, W, 3] uint8 RGB, 'image_id' int64 [],
      'boxes' [n, 4] float32 (x1, y1, x2, y2) original pixels, 'classes' [n] int32,
      'is_crowd' [n] bool, 'masks' [n, H, W] uint8 when data_cfg.with_masks.
    seed: [2] int stateless seed of this example.
    data_cfg: the data config (configs/common.py `data_config`).

  Returns:
    dict with 'image' [P, P, 3] float32, 'image_id' int64 [], 'orig_size' int32 [2] (h, w),
    'scale' float32 [2] (sy, sx), 'offset' float32 [2] (oy, ox), 'valid_size' float32 [2]
    (h, w) of the image content on the canvas, 'boxes' [k, 4] float32
    input pixels, 'classes' [k] int32, 'is_crowd' [k] bool and, with masks, 'masks'
    [k, M, M] uint8 cropped to each final box; k <= n instances survive sanitising,
    crowd removal (data_cfg.skip_crowd_in_train) and the crop.
  """
  return _preprocess(example, data_cfg, seed, train=True)


def eval_preprocess(example, data_cfg):
  """Eval view of one canonical example: long side resized to image_size, padded, no crop.

  Args:
    example: canonical source example (see `train_preprocess`).
    data_cfg: the data config.

  Returns:
    The dict of `train_preprocess` with offset 0, no flip, crowd instances kept.
  """
  return _preprocess(example, data_cfg, None, train=False)
