"""Speed of RoIAlign: jaxdet's one-gather multilevel op against a per-sample vmap version.

`jaxdet.ops.roi_align.multilevel_roi_align` fetches the four bilinear neighbours of every
sample of every box with one gather from the concatenated, flattened pyramid and applies
the weights in one einsum. The straightforward way to write RoIAlign in JAX is a scalar
bilinear lookup `(level, image, y, x) -> [C]` vmapped over samples, boxes and images; it is
defined here (`vmap_roi_align`) as the baseline, with the same semantics (torchvision's
bilinear rule, fixed sampling ratio, FPN level assignment), and doubles as an independent
check of the gather implementation.

Each row times a jitted forward + backward (gradient with respect to the features, as in
training) and reports the median over `repeats` calls after one warm-up call.

    python -m jaxdet.op_benchmark --images=8 --rois=512 --channels=256 --sizes=7,14
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.ops import roi_align as ra

_LEVELS = (2, 3, 4, 5)


def make_inputs(*, images, rois, channels, image_size, seed=0):
  """A random FPN pyramid (P2-P5) and boxes of all sizes, as float32 numpy arrays.

  Args:
    images: B.
    rois: R boxes per image.
    channels: C.
    image_size: int or (height, width) in input pixels, a multiple of 32.
    seed: numpy seed.

  Returns:
    (features_by_level: dict level -> [B, H / 2**level, W / 2**level, C],
     boxes: [B, R, 4] (x1, y1, x2, y2) input pixels, spread over the FPN levels).
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  rng = np.random.default_rng(seed)
  features = {l: rng.normal(size=(images, h >> l, w >> l, channels)).astype(np.float32)
              for l in _LEVELS}
  # Log-uniform sizes from 8 px to the image side: every level gets boxes.
  size = np.exp(rng.uniform(np.log(8.0), np.log(min(h, w)), (images, rois, 2)))
  xy = rng.uniform(0, 1, (images, rois, 2)) * (np.array([w, h]) - size)
  boxes = np.concatenate([xy, xy + size], -1).astype(np.float32)
  return features, boxes


def _bilinear(stacked, heights, widths, level, image, y, x):
  """torchvision `bilinear_interpolate` of one sample, from a padded level stack.

  Args:
    stacked: [L, B, Hmax, Wmax, C] pyramid, each level zero-padded to the largest.
    heights, widths: [L] int32 true sizes of the levels.
    level: scalar int32 index into L.
    image: scalar int32 image index.
    y, x: scalar float32 sample coordinates in the level's cells.

  Returns:
    [C] interpolated feature (0 for a sample outside [-1, size]).
  """
  h = heights[level].astype(jnp.float32)
  w = widths[level].astype(jnp.float32)
  valid = (y >= -1.0) & (y <= h) & (x >= -1.0) & (x <= w)

  def taps(c, n):
    c = jnp.maximum(c, 0.0)
    lo = jnp.floor(c)
    at_end = lo >= n - 1.0
    lo = jnp.where(at_end, n - 1.0, lo)
    hi = jnp.where(at_end, n - 1.0, lo + 1.0)
    frac = jnp.where(at_end, 0.0, c - lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32), frac

  y0, y1, ly = taps(y, h)
  x0, x1, lx = taps(x, w)
  f = lambda i, j: stacked[level, image, i, j]  # [C]
  value = ((1 - ly) * (1 - lx) * f(y0, x0) + (1 - ly) * lx * f(y0, x1) +
           ly * (1 - lx) * f(y1, x0) + ly * lx * f(y1, x1))
  return jnp.where(valid, value, 0.0)


def vmap_roi_align(features_by_level, boxes, *, output_size, sampling_ratio, aligned=True):
  """Multilevel RoIAlign written per sample and vmapped (the benchmark's baseline).

  Same contract as `multilevel_roi_align` with levels 2-5 and the default canonical size.

  Args:
    features_by_level: dict level -> [B, H_l, W_l, C] for levels 2..5.
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    output_size: int S (square output).
    sampling_ratio: samples per bin and axis, > 0.
    aligned: detectron2 ROIAlignV2 half-pixel shift.

  Returns:
    [B, R, S, S, C].
  """
  maps = [features_by_level[l] for l in _LEVELS]
  hmax = max(m.shape[1] for m in maps)
  wmax = max(m.shape[2] for m in maps)
  stacked = jnp.stack([jnp.pad(m, ((0, 0), (0, hmax - m.shape[1]), (0, wmax - m.shape[2]),
                                   (0, 0))) for m in maps])  # [L, B, Hmax, Wmax, C]
  heights = jnp.asarray([m.shape[1] for m in maps], jnp.int32)
  widths = jnp.asarray([m.shape[2] for m in maps], jnp.int32)
  s, g = output_size, sampling_ratio
  offset = 0.5 if aligned else 0.0
  frac = (jnp.arange(s * g, dtype=jnp.float32) + 0.5) / g  # [S*g] in bins

  def one_box(image, box):
    level = ra.assign_levels(box, min_level=_LEVELS[0], max_level=_LEVELS[-1])
    k = level - _LEVELS[0]
    scale = jnp.asarray([2.0**-l for l in _LEVELS], jnp.float32)[k]  # exact powers of 2
    x1, y1, x2, y2 = (box[i] * scale - offset for i in range(4))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
      rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
    ys = y1 + frac * (rh / s)  # [S*g]
    xs = x1 + frac * (rw / s)  # [S*g]
    per_x = jax.vmap(lambda y, x: _bilinear(stacked, heights, widths, k, image, y, x),
                     in_axes=(None, 0))
    grid = jax.vmap(per_x, in_axes=(0, None))(ys, xs)  # [S*g, S*g, C]
    return grid.reshape(s, g, s, g, -1).mean(axis=(1, 3))  # [S, S, C]

  per_image = jax.vmap(one_box, in_axes=(None, 0))
  images = jnp.arange(boxes.shape[0], dtype=jnp.int32)
  return jax.vmap(per_image)(images, jnp.asarray(boxes, jnp.float32))


def _timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def roi_align_rows(*, images=8, rois=512, channels=256, sizes=(7, 14), repeats=5,
                   sampling_ratio=2, image_size=(800, 1216), aligned=True):
  """Median forward + backward seconds of both RoIAlign implementations.

  Args:
    images, rois, channels: B, R (per image), C.
    sizes: output sizes S to time (7: box head, 14: mask head).
    repeats: timed calls per row, after one warm-up call.
    sampling_ratio: samples per bin and axis.
    image_size: input pixels (P2 is a quarter of it per side).
    aligned: ROIAlignV2.

  Returns:
    list of dicts, one per (size, implementation): impl ('gather' for
    `multilevel_roi_align`, 'vmap' for `vmap_roi_align`), output, images, rois, channels,
    sampling_ratio, seconds, and max_abs_diff between the two forward outputs.
  """
  features, boxes = make_inputs(images=images, rois=rois, channels=channels,
                                image_size=image_size)
  features = {l: jnp.asarray(v) for l, v in features.items()}
  boxes = jnp.asarray(boxes)
  impls = {'gather': lambda f, b, s: ra.multilevel_roi_align(
               f, b, output_size=s, sampling_ratio=sampling_ratio, aligned=aligned),
           'vmap': lambda f, b, s: vmap_roi_align(
               f, b, output_size=s, sampling_ratio=sampling_ratio, aligned=aligned)}
  rows = []
  for s in sizes:
    cot = jnp.asarray(np.random.default_rng(1).normal(
        size=(images, rois, s, s, channels)).astype(np.float32))
    outputs = {}
    for name, impl in impls.items():
      forward = jax.jit(lambda f, b, impl=impl, s=s: impl(f, b, s))
      outputs[name] = np.asarray(forward(features, boxes))
      del forward
      # Training cost: forward and the features' gradient for a fixed cotangent.
      step = jax.jit(jax.grad(lambda f, b, impl=impl, s=s: jnp.vdot(impl(f, b, s), cot)))
      seconds = _timed(step, (features, boxes), repeats)
      rows.append({'impl': name, 'output': s, 'images': images, 'rois': rois,
                   'channels': channels, 'sampling_ratio': sampling_ratio,
                   'seconds': seconds})
    diff = float(np.max(np.abs(outputs['gather'] - outputs['vmap'])))
    for row in rows[-2:]:
      row['max_abs_diff'] = diff
  return rows


def format_rows(rows):
  lines = ['| impl | output | images x rois x channels | sampling | fwd+bwd s | max diff |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['impl']} | {r['output']}x{r['output']} | "
                 f"{r['images']} x {r['rois']} x {r['channels']} | {r['sampling_ratio']} | "
                 f"{r['seconds']:.4f} | {r['max_abs_diff']:.1e} |")
  return '\n'.join(lines)


_IMAGES = flags.DEFINE_integer('images', 8, 'Images per batch.')
_ROIS = flags.DEFINE_integer('rois', 512, 'RoIs per image.')
_CHANNELS = flags.DEFINE_integer('channels', 256, 'Feature channels.')
_SIZES = flags.DEFINE_list('sizes', ['7', '14'], 'Output sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per row.')
_RATIO = flags.DEFINE_integer('sampling_ratio', 2, 'Samples per bin and axis.')
_IMAGE_SIZE = flags.DEFINE_list('image_size', ['800', '1216'], 'Input height, width.')


def main(argv):
  del argv
  rows = roi_align_rows(images=_IMAGES.value, rois=_ROIS.value, channels=_CHANNELS.value,
                        sizes=tuple(int(s) for s in _SIZES.value), repeats=_REPEATS.value,
                        sampling_ratio=_RATIO.value,
                        image_size=tuple(int(v) for v in _IMAGE_SIZE.value))
  print(f'RoIAlign forward + backward on {jax.devices()[0].device_kind}, median seconds:')
  print(format_rows(rows))


if __name__ == '__main__':
  app.run(main)
