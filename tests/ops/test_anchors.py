"""Tests for jaxdet.ops.anchors."""

import math

import numpy as np

from jaxdet.ops import anchors as anchor_ops

RETINANET = dict(min_level=3, max_level=7, num_scales=3,
                 aspect_ratios=(1.0, 2.0, 0.5), anchor_size=3.0)


def test_shapes_and_counts():
  anchors = anchor_ops.generate_anchors((128, 96), **RETINANET)
  assert sorted(anchors) == [3, 4, 5, 6, 7]
  for level, a in anchors.items():
    assert a.dtype == np.float32
    assert a.shape == (math.ceil(128 / 2**level), math.ceil(96 / 2**level), 9, 4)
  flat = anchor_ops.flatten_anchors(anchors)
  sizes = anchor_ops.level_sizes(anchors)
  assert sizes == [16 * 12 * 9, 8 * 6 * 9, 4 * 3 * 9, 2 * 2 * 9, 1 * 1 * 9]
  assert flat.shape == (sum(sizes), 4) and flat.dtype == np.float32
  # Level order and row-major (y, x, anchor) order inside each level.
  splits = np.split(flat, np.cumsum(sizes)[:-1])
  for level, piece in zip(range(3, 8), splits):
    np.testing.assert_array_equal(piece, anchors[level].reshape(-1, 4))


def test_non_divisible_size_rounds_up():
  anchors = anchor_ops.generate_anchors(100, min_level=3, max_level=4, num_scales=1,
                                        aspect_ratios=(1.0,), anchor_size=4.0)
  assert anchors[3].shape[:2] == (13, 13)
  assert anchors[4].shape[:2] == (7, 7)


def test_centres():
  anchors = anchor_ops.generate_anchors((64, 32), **RETINANET)
  for level, a in anchors.items():
    stride = 2**level
    cx = (a[..., 0] + a[..., 2]) / 2
    cy = (a[..., 1] + a[..., 3]) / 2
    want_x = stride / 2 + stride * np.arange(a.shape[1])
    want_y = stride / 2 + stride * np.arange(a.shape[0])
    np.testing.assert_allclose(cx, np.broadcast_to(want_x[None, :, None], cx.shape), atol=1e-4)
    np.testing.assert_allclose(cy, np.broadcast_to(want_y[:, None, None], cy.shape), atol=1e-4)


def test_p3_anchors_for_anchor_size_3():
  """The 9 anchors of SpineNet's RetinaNet at P3: sizes 24, 30.2, 38.1."""
  anchors = anchor_ops.generate_anchors(128, **RETINANET)
  a = anchors[3][0, 0]  # [9, 4] at the first location, centre (4, 4)
  w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  sizes = np.sqrt(w * h).reshape(3, 3)  # [scale, ratio]
  np.testing.assert_allclose(sizes[:, 0], [24.0, 30.2, 38.1], atol=0.05)
  np.testing.assert_allclose(sizes, np.repeat(sizes[:, :1], 3, axis=1), rtol=1e-5)
  # Aspect ratio w / h in the configured order inside each scale.
  np.testing.assert_allclose((w / h).reshape(3, 3), [[1, 2, 0.5]] * 3, rtol=1e-5)
  # Exact corners of the first two anchors: base 24 square, then w = 24 sqrt 2.
  np.testing.assert_allclose(a[0], [4 - 12, 4 - 12, 4 + 12, 4 + 12], atol=1e-5)
  hw, hh = 12 * math.sqrt(2), 12 / math.sqrt(2)
  np.testing.assert_allclose(a[1], [4 - hw, 4 - hh, 4 + hw, 4 + hh], atol=1e-5)
  # P7 sizes 384 .. 610 (SpineNet paper setting).
  a7 = anchors[7][0, 0]
  s7 = np.sqrt((a7[:, 2] - a7[:, 0]) * (a7[:, 3] - a7[:, 1]))
  np.testing.assert_allclose([s7.min(), s7.max()], [384.0, 384 * 2**(2 / 3)], rtol=1e-5)


def test_small_case_full_ordering():
  """Brute-force the whole array for a 2-level, 2-scale, 2-ratio case."""
  anchors = anchor_ops.generate_anchors((16, 8), min_level=2, max_level=3, num_scales=2,
                                        aspect_ratios=(1.0, 4.0), anchor_size=2.0)
  for level in (2, 3):
    stride = 2**level
    want = []
    for y in range(math.ceil(16 / stride)):
      for x in range(math.ceil(8 / stride)):
        for s in range(2):
          for r in (1.0, 4.0):
            base = 2.0 * stride * 2**(s / 2)
            w, h = base * math.sqrt(r), base / math.sqrt(r)
            cx, cy = stride / 2 + x * stride, stride / 2 + y * stride
            want.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    np.testing.assert_allclose(anchors[level].reshape(-1, 4), np.array(want), rtol=1e-6,
                               atol=1e-5)
