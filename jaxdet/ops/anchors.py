"""Multilevel anchor boxes, computed once on the host with numpy.

Anchors depend only on the (static) padded image size, so they are numpy
constants that `jit` folds into the program; nothing here runs on device.

Layout. Level l has stride 2**l and a grid of H_l x W_l = ceil(H / 2**l) x
ceil(W / 2**l) locations, with A = num_scales * len(aspect_ratios) anchors per
location, ordered scale-major: `for s in range(num_scales): for r in
aspect_ratios`. `generate_anchors` returns `{level: [H_l, W_l, A, 4]}`, so a
dense head output of shape `[B, H_l, W_l, A * K]` reshaped to
`[B, H_l * W_l * A, K]` lines up row for row with `anchors[l].reshape(-1, 4)`
(channel a * K + k of location (y, x) is output k of anchor a there), and
concatenating levels in increasing order lines up with `flatten_anchors`.
"""

import math

import numpy as np


def _as_hw(image_size):
  """int or (height, width) -> (height, width) as Python ints."""
  if np.ndim(image_size) == 0:
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


def generate_anchors(image_size, *, min_level, max_level, num_scales,
                     aspect_ratios, anchor_size):
  """RetinaNet anchors for every pyramid level.

  Follows the RetinaNet paper (Lin et al., ICCV 2017, section 4) as configured
  in TF Model Garden: on level l the base size is anchor_size * 2**l *
  2**(s / num_scales) for s in [0, num_scales), an aspect ratio r is w / h with
  w = base * sqrt(r) and h = base / sqrt(r), and centres sit at
  stride / 2 + k * stride.

  Args:
    image_size: int or (height, width) of the padded input in pixels.
    min_level: finest level (stride 2**min_level).
    max_level: coarsest level, inclusive.
    num_scales: number of octave subdivisions per level.
    aspect_ratios: sequence of w / h ratios.
    anchor_size: base size in units of the level's stride.

  Returns:
    dict level -> float32 numpy [H_l, W_l, A, 4] (x1, y1, x2, y2) in input
    pixels, A = num_scales * len(aspect_ratios), scale-major.
  """
  height, width = _as_hw(image_size)
  anchors = {}
  for level in range(min_level, max_level + 1):
    stride = 2.0 ** level
    # [A, 2] half sizes (w / 2, h / 2), scale-major then aspect ratio.
    half = []
    for s in range(num_scales):
      base = anchor_size * stride * 2.0 ** (s / num_scales)
      for r in aspect_ratios:
        half.append((0.5 * base * math.sqrt(r), 0.5 * base / math.sqrt(r)))
    half = np.asarray(half, np.float64)
    h_l, w_l = math.ceil(height / stride), math.ceil(width / stride)
    cy = stride / 2 + stride * np.arange(h_l, dtype=np.float64)
    cx = stride / 2 + stride * np.arange(w_l, dtype=np.float64)
    cx = np.broadcast_to(cx[None, :, None], (h_l, w_l, len(half)))
    cy = np.broadcast_to(cy[:, None, None], (h_l, w_l, len(half)))
    hw, hh = half[:, 0], half[:, 1]
    boxes = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)
    anchors[level] = boxes.astype(np.float32)  # [H_l, W_l, A, 4]
  return anchors


def flatten_anchors(anchors_by_level):
  """Concatenates per-level anchors in increasing level order.

  Args:
    anchors_by_level: dict level -> [H_l, W_l, A, 4] from `generate_anchors`.

  Returns:
    float32 numpy [sum_l H_l * W_l * A, 4] (x1, y1, x2, y2).
  """
  return np.concatenate(
      [anchors_by_level[l].reshape(-1, 4) for l in sorted(anchors_by_level)],
      axis=0).astype(np.float32)


def level_sizes(anchors_by_level):
  """Number of anchors on each level, in increasing level order.

  Splitting a `[..., sum, K]` array at the cumulative sums of these sizes gives
  the per-level pieces of `flatten_anchors`.

  Args:
    anchors_by_level: dict level -> [H_l, W_l, A, 4].

  Returns:
    list of ints H_l * W_l * A.
  """
  return [int(np.prod(anchors_by_level[l].shape[:-1]))
          for l in sorted(anchors_by_level)]
