"""Tests for jaxdet.ops.boxes against numpy brute-force references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import boxes as box_ops


_iou = jax.jit(box_ops.pairwise_iou)
_giou = jax.jit(box_ops.pairwise_giou)


def _random_boxes(rng, n, size=50.0):
  """[n, 4] boxes with some zero-size and identical ones mixed in."""
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(0, size / 2, (n, 2))
  wh[rng.random(n) < 0.15] = 0.0  # degenerate (points)
  wh[rng.random(n) < 0.1, 0] = 0.0  # zero width only
  out = np.concatenate([xy, xy + wh], axis=1)
  out[rng.random(n) < 0.1] = 0.0  # padding boxes
  return out.astype(np.float32)


def _ref_pair(a, b):
  """IoU and GIoU of two boxes, float64, loop form."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
  area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  inter = iw * ih
  union = area_a + area_b - inter
  iou = inter / union if union > 0 else 0.0
  cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0)
  ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0)
  enclose = cw * ch
  giou = iou - ((enclose - union) / enclose if enclose > 0 else 0.0)
  return iou, giou


def _ref_matrices(a, b):
  iou = np.zeros((len(a), len(b)))
  giou = np.zeros((len(a), len(b)))
  for i in range(len(a)):
    for j in range(len(b)):
      iou[i, j], giou[i, j] = _ref_pair(a[i], b[j])
  return iou, giou


def test_area_clamps_negative():
  boxes = np.array([[0, 0, 2, 3], [5, 5, 4, 8], [1, 1, 1, 1]], np.float32)
  np.testing.assert_allclose(box_ops.area(boxes), [6, 0, 0])


def test_pairwise_iou_giou_match_reference():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 37), _random_boxes(rng, 23)
  b[:5] = a[:5]  # identical pairs
  iou_ref, giou_ref = _ref_matrices(a, b)
  iou = np.asarray(_iou(a, b))
  giou = np.asarray(_giou(a, b))
  assert iou.shape == (37, 23) and giou.shape == (37, 23)
  assert np.all(np.isfinite(iou)) and np.all(np.isfinite(giou))
  np.testing.assert_allclose(iou, iou_ref, atol=1e-6)
  np.testing.assert_allclose(giou, giou_ref, atol=1e-6)
  # Identical non-degenerate boxes have IoU = GIoU = 1.
  same = box_ops.area(a[:5]) > 0
  np.testing.assert_allclose(np.diagonal(iou[:5, :5])[same], 1.0, atol=1e-6)
  np.testing.assert_allclose(np.diagonal(giou[:5, :5])[same], 1.0, atol=1e-6)


def test_iou_hand_values():
  a = np.array([[0, 0, 2, 2]], np.float32)
  b = np.array([[1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 0, 0], [4, 4, 6, 6]], np.float32)
  np.testing.assert_allclose(_iou(a, b)[0], [1 / 7, 0, 0, 0], atol=1e-7)
  # Touching boxes: enclose 4x2 = 8, union 8 -> GIoU 0; far boxes: 8 / 36.
  np.testing.assert_allclose(
      _giou(a, b)[0, [0, 1, 3]],
      [1 / 7 - 2 / 9, 0.0, -(36 - 8) / 36], atol=1e-6)


def test_zero_boxes_no_nan_in_values_and_gradients():
  z = jnp.zeros((3, 4))
  assert np.all(np.asarray(_iou(z, z)) == 0)
  assert np.all(np.asarray(_giou(z, z)) == 0)
  grad = jax.jit(jax.grad(lambda x: box_ops.pairwise_giou(x, z).sum()
                          + box_ops.pairwise_iou(x, z).sum()))(z)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_batched_pairwise_iou():
  rng = np.random.default_rng(1)
  a = np.stack([_random_boxes(rng, 6) for _ in range(3)])
  b = np.stack([_random_boxes(rng, 4) for _ in range(3)])
  out = _iou(a, b)
  assert out.shape == (3, 6, 4)
  for k in range(3):
    np.testing.assert_allclose(out[k], _ref_matrices(a[k], b[k])[0], atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(box_ops.pairwise_iou))(a, b), out, atol=1e-7)


def test_elementwise_matches_pairwise_diagonal():
  rng = np.random.default_rng(2)
  a, b = _random_boxes(rng, 20), _random_boxes(rng, 20)
  np.testing.assert_allclose(jax.jit(box_ops.elementwise_iou)(a, b),
                             np.diagonal(_iou(a, b)), atol=1e-7)
  np.testing.assert_allclose(jax.jit(box_ops.elementwise_giou)(a, b),
                             np.diagonal(_giou(a, b)), atol=1e-7)


def test_conversions():
  boxes = np.array([[1, 2, 5, 10], [0, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(boxes), [[3, 6, 4, 8], [0, 0, 0, 0]])
  np.testing.assert_allclose(box_ops.xyxy_to_xywh(boxes), [[1, 2, 4, 8], [0, 0, 0, 0]])
  rng = np.random.default_rng(3)
  r = _random_boxes(rng, 50)
  np.testing.assert_allclose(
      box_ops.cxcywh_to_xyxy(box_ops.xyxy_to_cxcywh(r)), r, atol=1e-5)


def test_clip_boxes_per_image_sizes():
  boxes = np.array([[[-5, -5, 50, 50], [10, 20, 30, 40]],
                    [[-5, -5, 50, 50], [10, 20, 30, 40]]], np.float32)
  height = np.array([[30.0], [100.0]])  # [B, 1]
  width = np.array([[20.0], [100.0]])
  out = box_ops.clip_boxes(boxes, height, width)
  np.testing.assert_allclose(out[0], [[0, 0, 20, 30], [10, 20, 20, 30]])
  np.testing.assert_allclose(out[1], [[0, 0, 50, 50], [10, 20, 30, 40]])
  np.testing.assert_allclose(box_ops.clip_boxes(boxes[0], 30, 20), out[0])


def _ref_encode(boxes, anchors, weights):
  b, a = boxes.astype(np.float64), anchors.astype(np.float64)
  w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  cx, cy = b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h
  cxa, cya = a[:, 0] + 0.5 * wa, a[:, 1] + 0.5 * ha
  return np.stack([weights[0] * (cx - cxa) / wa, weights[1] * (cy - cya) / ha,
                   weights[2] * np.log(w / wa), weights[3] * np.log(h / ha)], 1)


@pytest.mark.parametrize('weights', [(1., 1., 1., 1.), (10., 10., 5., 5.)])
def test_encode_decode_round_trip(weights):
  rng = np.random.default_rng(4)
  anchors = _random_boxes(rng, 64)
  anchors[:, 2:] = anchors[:, :2] + rng.uniform(4, 40, (64, 2))
  boxes = anchors + rng.uniform(-8, 8, (64, 4)).astype(np.float32)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  deltas = jax.jit(box_ops.encode_boxes, static_argnums=2)(boxes, anchors, weights)
  np.testing.assert_allclose(deltas, _ref_encode(boxes, anchors, weights),
                             rtol=1e-5, atol=1e-5)
  decoded = jax.jit(box_ops.decode_boxes, static_argnums=2)(deltas, anchors, weights)
  np.testing.assert_allclose(decoded, boxes, atol=1e-3)


def test_encode_zero_size_boxes_is_finite():
  anchors = np.array([[0, 0, 16, 16], [8, 8, 40, 24]], np.float32)
  boxes = np.zeros((2, 4), np.float32)
  deltas = np.asarray(jax.jit(box_ops.encode_boxes)(boxes, anchors))
  assert np.all(np.isfinite(deltas))
  grad = jax.jit(jax.grad(lambda b: box_ops.encode_boxes(b, anchors).sum()))(boxes)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_decode_clamps_scale():
  anchors = np.array([[0, 0, 10, 20]], np.float32)
  deltas = np.array([[0, 0, 100.0, 50.0]], np.float32)
  clip = math.log(1000.0 / 16)
  out = np.asarray(box_ops.decode_boxes(deltas, anchors))[0]
  np.testing.assert_allclose(out[2] - out[0], 10 * 1000 / 16, rtol=1e-5)
  np.testing.assert_allclose(out[3] - out[1], 20 * 1000 / 16, rtol=1e-5)
  np.testing.assert_allclose((out[0] + out[2]) / 2, 5, atol=1e-3)
  # Weights divide before the clamp: dw = 100 / 5 = 20 is still clamped.
  out = np.asarray(box_ops.decode_boxes(deltas, anchors, (10., 10., 5., 5.)))[0]
  np.testing.assert_allclose(out[2] - out[0], 10 * math.exp(clip), rtol=1e-5)
  # Below the clamp nothing changes.
  out = np.asarray(box_ops.decode_boxes(np.array([[0.1, -0.2, 0.5, -0.5]]), anchors))[0]
  np.testing.assert_allclose(out, [1 + 5 - 5 * math.exp(0.5), -4 + 10 - 10 * math.exp(-0.5),
                                   1 + 5 + 5 * math.exp(0.5), -4 + 10 + 10 * math.exp(-0.5)],
                             rtol=1e-5)
