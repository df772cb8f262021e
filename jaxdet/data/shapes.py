"""The synthetic "shapes" dataset: boxes and instance masks that jaxdet draws itself.

Six classes of filled shapes (circle, square, triangle, ellipse, star, cross) on textured,
noisy backgrounds. Each image holds 0-10 objects whose nominal diameter runs from 10-16 px to 70%
of the image side, so at 256 px the COCO small (< 32²), medium and large (> 96²) ranges all
have ground truth. Shapes are drawn largest first, so smaller ones partly occlude larger ones;
an object is only placed where every object, itself included, keeps at least half of its area
visible (fragments that nobody labels would be noise, not difficulty). Every label describes
the visible part: the instance mask is the visible pixels, the box is the tight box of that
mask, the area is its pixel count.

Everything follows from `data.shapes.seed`: image `index` of a split is drawn from its own
generator seeded with (seed, split, index), so the same seed gives byte-identical files and a
larger dataset starts with the images of a smaller one.

The dataset is a tfds builder (`Shapes`, named `shapes`), prepared into `data.data_dir` on first
use under a builder config whose name encodes sizes and seed. Stored per image: the image as
JPEG (4:4:4, quality 92), one PNG instance-id map (0 = background, i = objects[i - 1]; visible
masks are disjoint, so one map holds them all), and objects {bbox: (x1, y1, x2, y2) pixels,
label, area}. The COCO ground truth of each split is written beside the records as
`instances_<split>.json` (category ids 1..6, RLE segmentations), which `ground_truth` loads.
"""

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import time
from typing import Dict, List

from absl import logging
import ml_collections
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_lib
import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow only feeds data here; the accelerators belong to JAX.
tf.config.set_visible_devices([], 'GPU')

CLASS_NAMES = ('circle', 'square', 'triangle', 'ellipse', 'star', 'cross')
CIRCLE, SQUARE, TRIANGLE, ELLIPSE, STAR, CROSS = range(len(CLASS_NAMES))
CATEGORY_IDS = tuple(range(1, len(CLASS_NAMES) + 1))  # COCO json ids, as COCO starts at 1

MAX_OBJECTS = 10
EMPTY_FRACTION = 0.04          # images drawn without any object (negatives)
MAX_DIAMETER = 0.7             # largest nominal diameter, as a fraction of the image side
# Smallest nominal diameter (px) per class, giving boxes from ~9 px: below these a star or a
# cross stops looking like one, and RetinaNet's smallest anchors (24 px at P3) barely match.
MIN_DIAMETER = (10.0, 12.0, 12.0, 16.0, 16.0, 14.0)
ELLIPSE_ASPECT = (1.6, 2.4)    # major / minor axis; no needles
MIN_VISIBLE_FRACTION = 0.5     # of an object's full area, after occlusion and the image border
MIN_VISIBLE_PIXELS = 20
PLACEMENT_TRIES = 6
MIN_CONTRAST = 80.0            # RGB distance of a fill to what lies beneath it
JPEG_QUALITY = 92
_SPLITS = ('train', 'validation')

# How hard the images are (`data.shapes.style`). 'standard' is everything above: up to 10
# objects from ~9 px, textured backgrounds and fills, unlabelled line clutter. 'simple' is
# the classic synthetic-shapes task (few objects on smooth backgrounds, solid fills, no
# clutter, nothing smaller than ~16 px), which a detector trained from scratch learns within
# minutes on a CPU; the CPU demo uses it. Occlusion, the border and the sensor noise are the
# same in both.
STYLES = {
    'standard': dict(max_objects=MAX_OBJECTS, min_diameter_scale=1.0, textures=True,
                     clutter=True),
    'simple': dict(max_objects=4, min_diameter_scale=1.6, textures=False, clutter=False),
}


# ------------------------------------------------------------------------------- drawing ---


# Outline radius of each class relative to its nominal radius: the half-size of the window
# that a shape is rasterised in.
_EXTENT = (1.0, 0.8 * np.sqrt(2.0), 1.0, 1.0, 1.0, np.hypot(1.0, 0.32))
# Unit outward normals of an equilateral triangle whose vertex points up (y grows downwards).
_TRIANGLE_NORMALS = [(np.cos(a), np.sin(a)) for a in np.pi / 2 + 2 * np.pi / 3 * np.arange(3)]


def _inside(label: int, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
  """Whether points lie inside a shape of nominal radius 1 centred at the origin.

  u, v: [h, w] coordinates in the shape's rotated frame, in units of its nominal radius.
  Returns bool [h, w].
  """
  if label == CIRCLE:
    return u * u + v * v <= 1.0
  if label == ELLIPSE:
    return u * u + (v * aspect) ** 2 <= 1.0
  if label == SQUARE:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8
  if label == CROSS:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
  if label == TRIANGLE:  # circumradius 1: every edge at distance 1/2 from the centre
    out = None
    for nu, nv in _TRIANGLE_NORMALS:
      edge = u * nu + v * nv <= 0.5
      out = edge if out is None else out & edge
    return out
  # Five-pointed star, a vertex up: fold the angle into the half sector [0, pi/5] between an
  # outer vertex (1, 0) and an inner vertex at radius 0.45; the outline there is the segment
  # joining them. (A regular pentagram has 0.38; fatter arms stay recognisable when small.)
  half = np.pi / 5
  psi = np.mod(np.arctan2(v, u) + np.pi / 2, 2 * half)
  psi = np.minimum(psi, 2 * half - psi)
  rho = np.sqrt(u * u + v * v)
  px, py = rho * np.cos(psi), rho * np.sin(psi)
  dx, dy = 0.45 * np.cos(half) - 1.0, 0.45 * np.sin(half)
  return dx * py - dy * (px - 1.0) >= 0.0


def _shape_region(label, cx, cy, radius, angle, aspect, size):
  """Rasterises one shape by pixel-centre sampling.

  Pixel (i, j) is inside when its centre (j + 0.5, i + 0.5) is.
  Returns (y0, x0, mask, dx, dy, full_area): mask bool [h, w] is the part inside the
  size x size image with top-left pixel (y0, x0); dx [1, w], dy [h, 1] are the pixel centres
  relative to the shape centre; full_area counts the pixels of the whole shape, including
  any part beyond the image border.
  """
  extent = _EXTENT[label] * radius + 1.0
  x_lo, x_hi = int(np.floor(cx - extent)), int(np.ceil(cx + extent)) + 1
  y_lo, y_hi = int(np.floor(cy - extent)), int(np.ceil(cy + extent)) + 1
  dx = (np.arange(x_lo, x_hi, dtype=np.float32) + 0.5 - cx)[None, :]
  dy = (np.arange(y_lo, y_hi, dtype=np.float32) + 0.5 - cy)[:, None]
  cos, sin = np.cos(angle), np.sin(angle)
  u = (dx * cos + dy * sin) / radius
  v = (dy * cos - dx * sin) / radius
  inside = _inside(label, u, v, aspect)
  full_area = int(inside.sum())
  y0, x0 = max(y_lo, 0), max(x_lo, 0)
  y1, x1 = min(y_hi, size), min(x_hi, size)
  if y1 <= y0 or x1 <= x0:
    return 0, 0, np.zeros((0, 0), bool), dx[:, :0], dy[:0], full_area
  sy, sx = slice(y0 - y_lo, y1 - y_lo), slice(x0 - x_lo, x1 - x_lo)
  return y0, x0, inside[sy, sx], dx[:, sx], dy[sy], full_area


def _background(rng: np.random.Generator, size: int, textures: bool = True,
                clutter: bool = True) -> np.ndarray:
  """A background: float32 [size, size, 3] in [0, 255]-ish RGB.

  Always a smooth colour field; with `textures` also stripes, blotches or a checkerboard,
  with `clutter` sometimes unlabelled thin lines.
  """
  base = rng.uniform(30, 225, 3)
  k = int(rng.integers(2, 6))
  grid = np.clip(base + rng.normal(0, rng.uniform(10, 50), (k, k, 3)), 0, 255)
  field = np.asarray(Image.fromarray(grid.astype(np.uint8)).resize(
      (size, size), Image.BILINEAR), np.float32)
  if not textures:
    return field
  coords = np.arange(size, dtype=np.float32) + 0.5
  xx, yy = coords[None, :], coords[:, None]
  kind = rng.integers(4)
  if kind == 1:  # stripes
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    ax, ay = xx * (np.cos(theta) * 2 * np.pi / period), yy * (np.sin(theta) * 2 * np.pi / period)
    wave = np.sin(ax) * np.cos(ay) + np.cos(ax) * np.sin(ay)  # sin(ax + ay), separably
    field += (rng.uniform(8, 30) * rng.uniform(0.3, 1.0, 3).astype(np.float32)) * wave[..., None]
  elif kind == 2:  # blotches: mid-frequency colour noise
    m = int(rng.choice([8, 16, 32]))
    blot = np.clip(128 + 40 * rng.normal(0, 1, (m, m, 3)), 0, 255).astype(np.uint8)
    blot = np.asarray(Image.fromarray(blot).resize((size, size), Image.BICUBIC), np.float32)
    field += rng.uniform(0.3, 0.8) * (blot - 128)
  elif kind == 3:  # checkerboard
    cell = rng.uniform(8, 48)
    sign_x, sign_y = 1 - 2 * (np.floor(xx / cell) % 2), 1 - 2 * (np.floor(yy / cell) % 2)
    field += (rng.uniform(8, 25) * sign_x * sign_y)[..., None]
  if clutter and rng.random() < 0.35:  # unlabelled clutter: thin lines
    canvas = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
      ends = [tuple(p) for p in rng.uniform(0, size, (2, 2))]
      draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                width=int(rng.integers(1, 4)))
    field = np.array(canvas, np.float32)
  return field


def _fill(rng, colour, dx, dy, radius, textures=True):
  """Solid colour [3] or a textured fill [h, w, 3] for a shape; and its mean colour [3]."""
  kind = rng.choice(4, p=(0.65, 0.15, 0.1, 0.1))
  if kind == 0 or not textures:
    return colour, colour
  second = colour * rng.uniform(0.4, 0.65)
  if kind == 1:  # stripes
    theta, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
    t = np.sin((dx * np.cos(theta) + dy * np.sin(theta)) * (2 * np.pi / period)) > 0
  elif kind == 2:  # checker
    cell = rng.uniform(3, 8)
    t = (np.floor(dx / cell) + np.floor(dy / cell)) % 2 > 0
  else:  # linear gradient across the shape
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip((dx * np.cos(theta) + dy * np.sin(theta)) / (2 * radius) + 0.5, 0, 1)
  t = np.asarray(t, np.float32)[..., None]
  return colour * (1 - t) + second * t, (colour + second) / 2


def render(image_size: int, seed: int, split: str, index: int,
           style: str = 'standard') -> Dict[str, np.ndarray]:
  """Draws image `index` of `split` in `style` (STYLES); a pure function of its arguments.

  Returns image uint8 [S, S, 3]; instance_map uint8 [S, S] (0 background, i for object i - 1);
  boxes float32 [n, 4] (x1, y1, x2, y2) pixels, the tight box of each visible mask;
  labels int64 [n] in 0..5; areas int64 [n] visible pixel counts.
  """
  if style not in STYLES:
    raise ValueError(f'data.shapes.style={style!r}; choose one of {sorted(STYLES)}.')
  st = STYLES[style]
  size = image_size
  rng = np.random.default_rng([seed, _SPLITS.index(split), index])
  background = _background(rng, size, st['textures'], st['clutter'])
  image = background.copy()
  instance_map = np.zeros((size, size), np.uint8)
  num = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, st['max_objects'] + 1))
  labels = rng.integers(0, len(CLASS_NAMES), num)
  smallest = [MIN_DIAMETER[c] * st['min_diameter_scale'] for c in labels]
  diameters = np.array([np.exp(rng.uniform(np.log(lo), np.log(max(lo, MAX_DIAMETER * size))))
                        for lo in smallest])
  order = np.argsort(-diameters, kind='stable')  # large first: small ones occlude them
  placed_labels, regions, full_areas, visible, mean_colours = [], [], [], [], []
  for label, diameter in zip(labels[order], diameters[order]):
    radius = diameter / 2
    aspect = rng.uniform(*ELLIPSE_ASPECT)
    angle = 0.0 if label == CIRCLE else rng.uniform(0, 2 * np.pi)
    for _ in range(PLACEMENT_TRIES):
      cx, cy = rng.uniform(0.3 * radius, size - 0.3 * radius, 2)
      y0, x0, mask, dx, dy, full_area = _shape_region(
          label, cx, cy, radius, angle, aspect, size)
      own = int(mask.sum())
      if own < max(MIN_VISIBLE_FRACTION * full_area, MIN_VISIBLE_PIXELS):
        continue
      h, w = mask.shape
      beneath = instance_map[y0:y0 + h, x0:x0 + w][mask]
      covered = np.bincount(beneath, minlength=len(visible) + 1)[1:]
      left = np.asarray(visible, np.int64) - covered
      if np.any(left < np.maximum(MIN_VISIBLE_FRACTION * np.asarray(full_areas),
                                  MIN_VISIBLE_PIXELS)):
        continue
      # A fill that stands out from the background and from the objects it covers.
      references = [background[y0:y0 + h:4, x0:x0 + w:4].mean((0, 1))]  # every 16th pixel
      references += [mean_colours[j] for j in np.flatnonzero(covered)]
      candidates = rng.uniform(0, 255, (12, 3))
      distance = np.min(np.linalg.norm(
          candidates[:, None] - np.asarray(references)[None], axis=-1), axis=1)
      good = np.flatnonzero(distance >= MIN_CONTRAST)
      colour = candidates[good[0] if good.size else np.argmax(distance)].astype(np.float32)
      fill, mean_colour = _fill(rng, colour, dx, dy, radius, st['textures'])
      region = image[y0:y0 + h, x0:x0 + w]
      region[mask] = fill[mask] if fill.ndim == 3 else fill
      instance_map[y0:y0 + h, x0:x0 + w][mask] = len(visible) + 1
      visible = list(left) + [own]
      full_areas.append(full_area)
      placed_labels.append(int(label))
      regions.append((y0, x0, h, w))
      mean_colours.append(mean_colour)
      break
  # Sensor noise over everything, objects included; uniform (unit variance) because drawing
  # bytes costs a fraction of drawing normals.
  scale = rng.uniform(0, 10) / 73.9
  noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape).astype(np.float32)
  noise *= scale
  image += noise
  image += 0.5 - 127.5 * scale  # centres the noise; +0.5 rounds in the cast below
  image = np.clip(image, 0, 255, out=image).astype(np.uint8)

  boxes = np.zeros((len(regions), 4), np.float32)
  areas = np.zeros((len(regions),), np.int64)
  for i, (y0, x0, h, w) in enumerate(regions):
    own = instance_map[y0:y0 + h, x0:x0 + w] == i + 1
    rows, cols = np.flatnonzero(own.any(1)), np.flatnonzero(own.any(0))
    # Continuous corners: pixel (i, j) covers [j, j + 1) x [i, i + 1).
    boxes[i] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
    areas[i] = own.sum()
  return dict(image=image, instance_map=instance_map, boxes=boxes,
              labels=np.asarray(placed_labels, np.int64), areas=areas)


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  if fmt == 'JPEG':
    Image.fromarray(array).save(buffer, format=fmt, quality=JPEG_QUALITY, subsampling=0)
  else:  # the instance maps are mostly background: fast settings compress them well
    Image.fromarray(array).save(buffer, format=fmt, compress_level=1)
  return buffer.getvalue()


# ------------------------------------------------------------------------- tfds builder ---


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes and seed of one shapes variant (mirrors `data.shapes`)."""
  num_train: int = 2000
  num_validation: int = 500
  image_size: int = 256
  seed: int = 0
  style: str = 'standard'


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder of the shapes dataset; needs no network."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Six shape classes; boxes, instance-id maps, COCO json.'}
  # Nothing is downloaded, so there is no checksums file beside the code to look for (finding
  # the code's folder also needs the optional importlib_resources package).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'image/id': np.int64,
            'instance_map': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'objects': tfds.features.Sequence({
                'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'area': np.int64,
            }),
        }),
        # Records in generation order: image ids ascend, reading needs no shuffle of files.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train),
            'validation': self._generate_examples('validation', config.num_validation)}

  def _generate_examples(self, split, count):
    config = self.builder_config
    # While preparing, data_dir is tfds's temporary folder, renamed into place on success.
    out_dir = os.fspath(self.data_dir)
    images, annotations = [], []
    for index in range(count):
      drawn = render(config.image_size, config.seed, split, index, config.style)
      image_id = index + 1
      height, width = drawn['image'].shape[:2]
      images.append(dict(id=image_id, width=width, height=height,
                         file_name=f'{split}/{index:06d}.jpg'))
      ids = np.arange(1, len(drawn['labels']) + 1, dtype=np.uint8)
      # pycocotools wants [H, W, n] in Fortran order: that is [n, W, H] in C order.
      transposed = np.ascontiguousarray(drawn['instance_map'].T)                  # [W, H]
      masks = (transposed[None] == ids[:, None, None]).view(np.uint8).transpose(2, 1, 0)
      rles = mask_lib.encode(masks) if len(ids) else []
      for box, label, area, rle in zip(drawn['boxes'], drawn['labels'], drawn['areas'], rles):
        x1, y1, x2, y2 = (float(c) for c in box)
        annotations.append(dict(
            id=len(annotations) + 1, image_id=image_id, category_id=CATEGORY_IDS[label],
            bbox=[x1, y1, x2 - x1, y2 - y1], area=float(area), iscrowd=0,
            segmentation=dict(size=rle['size'], counts=rle['counts'].decode('ascii'))))
      yield index, {
          'image': _encode(drawn['image'], 'JPEG'),
          'image/id': image_id,
          'instance_map': _encode(drawn['instance_map'], 'PNG'),
          'objects': {'bbox': drawn['boxes'], 'label': drawn['labels'],
                      'area': drawn['areas']},
      }
    categories = [dict(id=i, name=n, supercategory='shape')
                  for i, n in zip(CATEGORY_IDS, CLASS_NAMES)]
    with tf.io.gfile.GFile(os.path.join(out_dir, f'instances_{split}.json'), 'w') as f:
      json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def builder(data_cfg: ml_collections.ConfigDict) -> Shapes:
  """The prepared builder of `data_cfg.shapes` in `data_cfg.data_dir`; prepares it if needed."""
  s = data_cfg.shapes
  style = str(s.get('style', 'standard'))
  if style not in STYLES:
    raise ValueError(f'data.shapes.style={style!r}; choose one of {sorted(STYLES)}.')
  return _prepared(data_cfg.data_dir, int(s.num_train), int(s.num_validation),
                   int(s.image_size), int(s.seed), style)


@functools.lru_cache(maxsize=8)
def _prepared(data_dir, num_train, num_validation, image_size, seed, style) -> Shapes:
  # Cached: one builder per variant and process (tfds logs each custom config it meets).

  def make():
    suffix = '' if style == 'standard' else f'_{style}'
    config = ShapesConfig(
        name=f'train{num_train}_val{num_validation}_size{image_size}_seed{seed}{suffix}',
        num_train=num_train, num_validation=num_validation, image_size=image_size, seed=seed,
        style=style)
    return Shapes(config=config, data_dir=data_dir)

  b = make()
  if b.is_prepared():
    return b
  logging.info('Generating the shapes dataset (%d train + %d validation %s images at %d px) '
               'in %s', num_train, num_validation, style, image_size, b.data_dir)
  start = time.time()
  try:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except Exception:  # pylint: disable=broad-except
    # Processes sharing a data_dir race to prepare it; losing the final rename is fine.
    b = make()
    if not b.is_prepared():
      raise
  logging.info('Generated the shapes dataset in %.1f s.', time.time() - start)
  return b


# ------------------------------------------------------------------------------- reading ---


def _shard(split: str, shard_index: int, shard_count: int):
  # Contiguous, near-equal slices per process, as tfds.split_for_jax_process.
  if shard_count == 1:
    return split
  return tfds.even_splits(split, n=shard_count)[shard_index]


def _to_canonical(example, with_masks: bool):
  """tfds example -> canonical example (see module docstring of jaxdet/data/coco.py)."""
  labels = example['objects']['label']
  out = {
      'image': example['image'],                             # uint8 [H, W, 3]
      'image_id': example['image/id'],                       # int64 []
      'boxes': example['objects']['bbox'],                   # float32 [n, 4] x1 y1 x2 y2
      'classes': tf.cast(labels, tf.int32),                  # int32 [n]
      'is_crowd': tf.zeros_like(labels, dtype=tf.bool),      # bool [n]
  }
  if with_masks:
    ids = tf.range(1, tf.shape(labels)[0] + 1, dtype=tf.int32)
    instance_map = tf.cast(example['instance_map'][..., 0], tf.int32)        # [H, W]
    out['masks'] = tf.cast(tf.equal(instance_map[None], ids[:, None, None]),
                           tf.uint8)                                          # [n, H, W]
  return out


def dataset(data_cfg, split: str, *, shard_index: int = 0,
            shard_count: int = 1) -> tf.data.Dataset:
  """Canonical examples of `split` ('train', 'validation' or a tfds slice of them).

  Yields image uint8 [H, W, 3], image_id int64 [], boxes float32 [n, 4] (x1, y1, x2, y2)
  pixels, classes int32 [n] in 0..5, is_crowd bool [n] (all False) and, with
  data_cfg.with_masks, masks uint8 [n, H, W]. In record order; only this shard.
  """
  b = builder(data_cfg)
  decoders = None if data_cfg.with_masks else {'instance_map': tfds.decode.SkipDecoding()}
  # No autocache: the pipeline may read a prefix only (num_eval_images), which tfds's cache
  # would warn about; the records are small and local.
  ds = b.as_dataset(split=_shard(split, shard_index, shard_count), shuffle_files=False,
                    decoders=decoders, read_config=tfds.ReadConfig(try_autocache=False))
  with_masks = bool(data_cfg.with_masks)
  return ds.map(lambda ex: _to_canonical(ex, with_masks),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def num_examples(data_cfg, split: str, *, shard_index: int = 0, shard_count: int = 1) -> int:
  return int(builder(data_cfg).info.splits[_shard(split, shard_index, shard_count)].num_examples)


def ground_truth(data_cfg, split: str) -> coco_lib.COCO:
  """The split's COCO ground truth (image ids = `image_id`, category ids 1..6)."""
  b = builder(data_cfg)
  name = re.match(r'\w+', split).group(0)  # 'validation[:100]' -> its whole split's json
  path = os.path.join(os.fspath(b.data_dir), f'instances_{name}.json')
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    return coco_lib.COCO(path)


def category_ids(data_cfg) -> List[int]:
  del data_cfg
  return list(CATEGORY_IDS)


def class_names(data_cfg) -> List[str]:
  del data_cfg
  return list(CLASS_NAMES)
