"""RoI feature extraction: RoIAlign (single and multilevel), RoIPool and SPP.

Conventions: features are NHWC `[B, H, W, C]`; boxes are `[B, R, 4]` float32
`(x1, y1, x2, y2)` in input pixels (the convention of `ops/boxes.py`), and
`spatial_scale` maps input pixels to feature cells (1 / stride).

RoIAlign follows detectron2's ROIAlign (`aligned=True` is ROIAlignV2) with a
fixed `sampling_ratio`: every output bin averages `sampling_ratio**2` bilinear
samples. The bilinear lookups of all samples of all boxes are done with one
gather from the flattened feature map, followed by a weighted sum, as the TPU
`multilevel_crop_and_resize` does; there are no per-box loops and every shape is
static, so the functions work under `jit`, `vmap` and `grad`.

RoIPool (Fast R-CNN) and spatial pyramid pooling (SPP-net) quantise the box to
feature cells and max-pool inside bins. Bins are read through bounded windows
of `max_bin_size` cells per axis (default: the whole feature map, which is
always exact), again with static shapes.
"""

import jax.numpy as jnp

# detectron2's level assignment adds this inside the log so that zero-size
# (padding) boxes give a finite level (then clamped to min_level).
_LEVEL_EPS = 1e-8


def _pair(size):
  if isinstance(size, int):
    return size, size
  return tuple(size)


def _axis_samples(start, size, out, sampling_ratio):
  """Sample coordinates along one axis, as detectron2's ROIAlign.

  Args:
    start: [B, R] RoI start in feature coordinates.
    size: [B, R] RoI size in feature coordinates.
    out: number of output bins.
    sampling_ratio: samples per bin.

  Returns:
    [B, R, out * sampling_ratio] sample coordinates, bin-major.
  """
  bin_size = size / out
  # Sample (iy + 0.5) / sampling_ratio of the way through bin p.
  frac = (jnp.arange(out * sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio
  return start[..., None] + frac * bin_size[..., None]


def _axis_neighbours(coord, extent):
  """Bilinear neighbour indices and weights along one axis.

  Reproduces detectron2 / torchvision `bilinear_interpolate`: a sample outside
  [-1, extent] contributes zero; a sample in [-1, 0] is clamped to 0; a sample
  past the last cell centre uses the last cell only.

  Args:
    coord: [B, R, S] sample coordinates (feature cells, cell i centred at i).
    extent: [B, R] float32 feature-map size along this axis.

  Returns:
    (idx, weight): [B, R, S, 2] int32 low/high indices and float32 weights
    (zero for invalid samples).
  """
  extent = extent[..., None]
  valid = (coord >= -1.0) & (coord <= extent)
  c = jnp.maximum(coord, 0.0)
  floor_c = jnp.floor(c)
  last = extent - 1.0
  at_end = floor_c >= last
  low = jnp.where(at_end, last, floor_c)
  high = jnp.where(at_end, last, floor_c + 1.0)
  frac = jnp.where(at_end, 0.0, c - floor_c)
  weight = jnp.stack([1.0 - frac, frac], axis=-1) * valid[..., None]
  idx = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  return idx, weight


def _roi_align_flat(flat, boxes, *, base, height, width, scale, output_size,
                    sampling_ratio, aligned):
  """RoIAlign of every box from one flattened feature buffer.

  Args:
    flat: [N, C] feature cells of all images (and levels), concatenated.
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    base: [B, R] int32 row of `flat` holding cell (0, 0) of the box's map.
    height: [B, R] int32 height of the box's feature map.
    width: [B, R] int32 width of the box's feature map.
    scale: [B, R] float32 input-pixel to feature-cell scale of the box's map.
    output_size: (out_h, out_w).
    sampling_ratio: samples per bin and axis (> 0).
    aligned: detectron2's ROIAlignV2 half-pixel shift.

  Returns:
    [B, R, out_h, out_w, C] pooled features, dtype of `flat`.
  """
  out_h, out_w = output_size
  g = sampling_ratio
  boxes = jnp.asarray(boxes, jnp.float32)
  # aligned=True: cell i covers [i, i+1) so its centre, where the value lives,
  # is at i + 0.5; shifting by -0.5 makes bilinear lookups exact (ROIAlignV2).
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * scale - offset
  y1 = boxes[..., 1] * scale - offset
  roi_w = boxes[..., 2] * scale - offset - x1
  roi_h = boxes[..., 3] * scale - offset - y1
  if not aligned:
    # Legacy ROIAlign (Detectron 1) forces a minimum RoI size of one cell.
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)

  ys = _axis_samples(y1, roi_h, out_h, g)  # [B, R, out_h * g]
  xs = _axis_samples(x1, roi_w, out_w, g)  # [B, R, out_w * g]
  yi, wy = _axis_neighbours(ys, height.astype(jnp.float32))  # [B, R, Sy, 2]
  xi, wx = _axis_neighbours(xs, width.astype(jnp.float32))  # [B, R, Sx, 2]

  # One gather for the 4 neighbours of all samples of all boxes.
  rows = base[..., None, None] + yi * width[..., None, None]  # [B, R, Sy, 2]
  index = rows[..., :, :, None, None] + xi[..., None, None, :, :]  # [B, R, Sy, 2, Sx, 2]
  values = jnp.take(flat, index, axis=0)  # [B, R, Sy, 2, Sx, 2, C]
  b, r = boxes.shape[:2]
  values = values.reshape(b, r, out_h, g, 2, out_w, g, 2, -1)
  wy = wy.reshape(b, r, out_h, g, 2)
  wx = wx.reshape(b, r, out_w, g, 2)
  # Bilinear weights, then the average over the g*g samples of each bin;
  # accumulated in float32 whatever the feature dtype.
  out = jnp.einsum('brhia,brwjk,brhiawjkc->brhwc', wy, wx, values,
                   preferred_element_type=jnp.float32)
  return (out / (g * g)).astype(flat.dtype)


def roi_align(features, boxes, *, output_size, spatial_scale, sampling_ratio,
              aligned=True):
  """RoIAlign (Mask R-CNN) of boxes from one feature map.

  Matches detectron2 `ROIAlign(output_size, spatial_scale, sampling_ratio,
  aligned)` for `sampling_ratio > 0`. (detectron2's adaptive
  `sampling_ratio=0` uses a data-dependent sample count and is not offered; on
  boxes of at most `sampling_ratio` bins per output cell it coincides.)

  Args:
    features: [B, H, W, C] feature map.
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    output_size: int or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    sampling_ratio: bilinear samples per bin and axis, > 0.
    aligned: True for detectron2's ROIAlignV2 (-0.5 pixel-centre shift);
      False for the original op (RoI size clamped to >= 1 cell).

  Returns:
    [B, R, out_h, out_w, C] pooled features, dtype of `features`.
  """
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio must be > 0, got {sampling_ratio}.')
  b, h, w, c = features.shape
  r = boxes.shape[1]
  flat = features.reshape(b * h * w, c)  # [B*H*W, C]
  base = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None] * (h * w), (b, r))
  full = lambda v, dt: jnp.full((b, r), v, dt)
  return _roi_align_flat(
      flat, boxes, base=base, height=full(h, jnp.int32),
      width=full(w, jnp.int32), scale=full(spatial_scale, jnp.float32),
      output_size=_pair(output_size), sampling_ratio=sampling_ratio,
      aligned=aligned)


def assign_levels(boxes, *, canonical_size=224, canonical_level=4, min_level=2,
                  max_level=5):
  """FPN level of each box (Lin et al. 2017, eq. 1; detectron2 convention).

  k = floor(canonical_level + log2(sqrt(w * h) / canonical_size + 1e-8)),
  clamped to [min_level, max_level].

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) input pixels.
    canonical_size: box size mapped to `canonical_level` (ImageNet 224).
    canonical_level: level of a canonical-size box.
    min_level: finest pyramid level available.
    max_level: coarsest pyramid level available.

  Returns:
    [...] int32 levels.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  size = jnp.sqrt(w * h)
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + _LEVEL_EPS))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features_by_level, boxes, *, output_size,
                         sampling_ratio, aligned=True, canonical_size=224,
                         canonical_level=4, min_level=2, max_level=5):
  """RoIAlign from an FPN pyramid, each box read from its assigned level.

  All levels are flattened and concatenated into one `[sum_l B*H_l*W_l, C]`
  buffer with per-level row offsets, so every box's samples come from a single
  gather (TPU `multilevel_crop_and_resize`), with spatial scale 2**-level.

  Args:
    features_by_level: dict level -> [B, H_l, W_l, C], holding at least the
      levels min_level..max_level (stride 2**level).
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    output_size: int or (out_h, out_w).
    sampling_ratio: bilinear samples per bin and axis, > 0.
    aligned: detectron2 ROIAlignV2 half-pixel shift.
    canonical_size: box size mapped to `canonical_level`.
    canonical_level: level of a canonical-size box.
    min_level: finest level used.
    max_level: coarsest level used.

  Returns:
    [B, R, out_h, out_w, C] pooled features.
  """
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio must be > 0, got {sampling_ratio}.')
  levels = list(range(min_level, max_level + 1))
  b, r = boxes.shape[:2]
  flats, offsets, heights, widths = [], [], [], []
  offset = 0
  for level in levels:
    f = features_by_level[level]
    _, h, w, c = f.shape
    flats.append(f.reshape(b * h * w, c))  # [B*H_l*W_l, C]
    offsets.append(offset)
    heights.append(h)
    widths.append(w)
    offset += b * h * w
  flat = jnp.concatenate(flats, axis=0)  # [sum_l B*H_l*W_l, C]

  level = assign_levels(boxes, canonical_size=canonical_size,
                        canonical_level=canonical_level, min_level=min_level,
                        max_level=max_level)  # [B, R]
  k = level - min_level
  height = jnp.asarray(heights, jnp.int32)[k]
  width = jnp.asarray(widths, jnp.int32)[k]
  image = jnp.arange(b, dtype=jnp.int32)[:, None]
  base = jnp.asarray(offsets, jnp.int32)[k] + image * height * width
  scale = jnp.asarray([2.0**-l for l in levels], jnp.float32)[k]
  return _roi_align_flat(
      flat, boxes, base=base, height=height, width=width, scale=scale,
      output_size=_pair(output_size), sampling_ratio=sampling_ratio,
      aligned=aligned)


def _round_half_away(x):
  """C `round`: halves away from zero (jnp.round rounds halves to even)."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _binned_max(features, y_start, y_end, x_start, x_end, max_bin_size):
  """Max of `features` over the integer rectangles of a grid of bins.

  Separable: a max over columns, then over rows, each through a static window
  of K cells from the bin start, masked to the bin.

  Args:
    features: [B, H, W, C].
    y_start: [B, R, nh] int32 first row of each bin row, in [0, H].
    y_end: [B, R, nh] int32 end row (exclusive), in [0, H].
    x_start: [B, R, nw] int32 first column, in [0, W].
    x_end: [B, R, nw] int32 end column (exclusive), in [0, W].
    max_bin_size: int or None; window length K per axis (None: the map size,
      always exact; smaller values truncate larger bins).

  Returns:
    [B, R, nh, nw, C], 0 for empty bins.
  """
  b, h, w, c = features.shape
  kh = h if max_bin_size is None else min(h, max_bin_size)
  kw = w if max_bin_size is None else min(w, max_bin_size)
  neg = jnp.asarray(-jnp.inf, features.dtype)
  bi = jnp.arange(b)[:, None, None, None]

  cols = x_start[..., None] + jnp.arange(kw)  # [B, R, nw, K]
  col_ok = cols < x_end[..., None]
  g = features[bi, :, jnp.minimum(cols, w - 1)]  # [B, R, nw, K, H, C]
  g = jnp.where(col_ok[..., None, None], g, neg)
  colmax = g.max(axis=3)  # [B, R, nw, H, C]

  rows = y_start[..., None] + jnp.arange(kh)  # [B, R, nh, K]
  row_ok = rows < y_end[..., None]
  ri = jnp.arange(rows.shape[1])[None, :, None, None]
  g = colmax[bi, ri, :, jnp.minimum(rows, h - 1)]  # [B, R, nh, K, nw, C]
  g = jnp.where(row_ok[..., None, None], g, neg)
  out = g.max(axis=3)  # [B, R, nh, nw, C]

  empty = ((y_end <= y_start)[..., :, None] |
           (x_end <= x_start)[..., None, :])  # [B, R, nh, nw]
  return jnp.where(empty[..., None], jnp.zeros((), features.dtype), out)


def roi_pool(features, boxes, *, output_size, spatial_scale, max_bin_size=None):
  """RoIPool (Fast R-CNN, Girshick 2015, sec. 2.1), as torchvision `roi_pool`.

  Box corners are rounded to cells, the RoI (inclusive of its end cell) is cut
  into out_h x out_w bins with floor / ceil bounds, each bin is max-pooled; a
  bin entirely outside the map is 0.

  Args:
    features: [B, H, W, C] feature map.
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    output_size: int or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    max_bin_size: optional static bound on a bin's extent in cells (see
      `_binned_max`); None is exact.

  Returns:
    [B, R, out_h, out_w, C].
  """
  out_h, out_w = _pair(output_size)
  _, h, w, _ = features.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  q = _round_half_away(boxes * spatial_scale)  # [B, R, 4]

  def bounds(start, end, out, extent):
    # torchvision: roi size includes the end cell and is at least 1. The bin bounds
    # floor(p * size / out) and ceil((p + 1) * size / out) are computed in integers: in
    # float32, (size / out) * out can land just above an integer, and XLA may evaluate it
    # differently depending on the batch, moving a bin edge by a cell.
    start = start.astype(jnp.int32)
    size = jnp.maximum(end.astype(jnp.int32) - start + 1, 1)[..., None]
    p = jnp.arange(out, dtype=jnp.int32)
    lo = (p * size) // out + start[..., None]
    hi = ((p + 1) * size + out - 1) // out + start[..., None]
    return jnp.clip(lo, 0, extent), jnp.clip(hi, 0, extent)

  y0, y1 = bounds(q[..., 1], q[..., 3], out_h, h)
  x0, x1 = bounds(q[..., 0], q[..., 2], out_w, w)
  return _binned_max(features, y0, y1, x0, x1, max_bin_size)


def spatial_pyramid_pool(features, boxes, *, levels=(1, 2, 3, 6),
                         spatial_scale, max_bin_size=None):
  """Spatial pyramid pooling of RoIs (SPP-net, He et al. 2014, sec. 2.3 / 4).

  The RoI covers the a_h x a_w feature cells it touches, [floor(x1 * s),
  ceil(x2 * s)) (at least one cell). Each pyramid level n is a max pool with
  window ceil(a / n) and stride floor(a / n) per axis, giving n x n bins, as in
  the paper; bins are clipped to the map (0 where nothing is left).

  Args:
    features: [B, H, W, C] feature map.
    boxes: [B, R, 4] (x1, y1, x2, y2) input pixels.
    levels: pyramid sizes n; SPP-net detection uses {1, 2, 3, 6} = 50 bins.
    spatial_scale: feature cells per input pixel (1 / stride).
    max_bin_size: optional static bound on a bin's extent in cells.

  Returns:
    [B, R, sum(n * n) * C]: per level, bins in row-major order, channels last.
  """
  _, h, w, c = features.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  start = jnp.floor(boxes[..., :2] * spatial_scale)  # [B, R, 2] (x, y)
  end = jnp.maximum(jnp.ceil(boxes[..., 2:] * spatial_scale), start + 1.0)
  size = (end - start).astype(jnp.int32)  # [B, R, 2]
  start = start.astype(jnp.int32)

  def bounds(axis, n, extent):
    a = size[..., axis, None]
    window = -(-a // n)  # ceil(a / n)
    stride = a // n
    lo = start[..., axis, None] + jnp.arange(n) * stride
    hi = lo + window
    return jnp.clip(lo, 0, extent), jnp.clip(hi, 0, extent)

  pooled = []
  for n in levels:
    y0, y1 = bounds(1, n, h)
    x0, x1 = bounds(0, n, w)
    p = _binned_max(features, y0, y1, x0, x1, max_bin_size)  # [B, R, n, n, C]
    pooled.append(p.reshape(p.shape[0], p.shape[1], n * n * c))
  return jnp.concatenate(pooled, axis=-1)


def num_pyramid_bins(levels=(1, 2, 3, 6)):
  """Number of SPP bins, e.g. 50 for the detection pyramid {1, 2, 3, 6}."""
  return sum(n * n for n in levels)
