"""Tests for jaxdet.ops.nms against a brute-force greedy numpy NMS.

Boxes have integer coordinates and thresholds are dyadic (0.25, 0.5, 0.75), so
intersections and unions are exact in float32 and float64 alike and the
comparison IoU > threshold cannot differ between the two implementations.
"""

import functools

import jax
import numpy as np
import pytest

from jaxdet.ops import nms as nms_ops


def _ref_iou(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
  return inter / union if union > 0 else 0.0


def _ref_nms(boxes, scores, thr, valid=None, classes=None):
  """Greedy NMS: all kept indices in visiting order."""
  n = len(scores)
  valid = np.ones(n, bool) if valid is None else valid
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if not valid[i]:
      continue
    if any(_ref_iou(boxes[i], boxes[k]) > thr
           and (classes is None or classes[i] == classes[k]) for k in kept):
      continue
    kept.append(i)
  return kept


def _random_set(rng, n, extent=100):
  """[n, 4] integer boxes jittered around n // 8 cluster boxes, and [n] scores.

  Clusters make long suppression chains (A suppresses B, B would suppress C
  but is gone), which is where a non-greedy shortcut would differ.
  """
  k = max(n // 8, 1)
  xy = rng.integers(0, extent, (k, 2))
  wh = rng.integers(8, 40, (k, 2))
  boxes = np.concatenate([xy, xy + wh], 1)[rng.integers(0, k, n)]
  boxes = boxes + rng.integers(-4, 5, (n, 4))
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  return boxes.astype(np.float32), rng.random(n).astype(np.float32)


def _check(indices, num_valid, ref, max_output):
  indices, num_valid = np.asarray(indices), int(num_valid)
  want = ref[:max_output]
  assert indices.shape == (max_output,) and indices.dtype == np.int32
  assert num_valid == len(want)
  np.testing.assert_array_equal(indices[:num_valid], want)
  np.testing.assert_array_equal(indices[num_valid:], -1)


@pytest.mark.parametrize('n,tile,thr', [(203, 64, 0.25), (77, 512, 0.75), (300, 40, 0.5)])
def test_exact_against_greedy(n, tile, thr):
  rng = np.random.default_rng(n)
  boxes, scores = _random_set(rng, n)
  ref = _ref_nms(boxes, scores, thr)
  assert 5 < len(ref) < n  # the case exercises suppression
  # max_output below the kept count (early stop) and above it (-1 padding).
  for max_output in (len(ref) // 2, len(ref) + 17):
    fn = jax.jit(functools.partial(nms_ops.nms, iou_threshold=thr, max_output=max_output,
                                   tile_size=tile))
    _check(*fn(boxes, scores), ref, max_output)


@pytest.mark.parametrize('tile', [1, 3])
def test_chain_and_threshold_hand_cases(tile):
  # IoU(A, B) = IoU(B, C) = 7/13 > 0.5, IoU(A, C) = 1/4: greedy keeps A and C.
  # D and E have IoU exactly 1/2, which does not suppress (IoU > threshold).
  boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10],
                    [50, 50, 54, 52], [50, 50, 54, 51]], np.float32)
  scores = np.array([5, 4, 3, 2, 1], np.float32)
  # tile 1 exercises the cross-tile path only, tile 3 the in-tile fixed point.
  indices, num = nms_ops.nms(boxes, scores, iou_threshold=0.5, max_output=5,
                             tile_size=tile)
  assert int(num) == 4
  np.testing.assert_array_equal(indices, [0, 2, 3, 4, -1])


def test_score_ties_lower_index_first():
  rng = np.random.default_rng(7)
  boxes, _ = _random_set(rng, 90)
  scores = rng.integers(0, 4, 90).astype(np.float32)  # many ties
  ref = _ref_nms(boxes, scores, 0.5)
  _check(*nms_ops.nms(boxes, scores, iou_threshold=0.5, max_output=90, tile_size=16),
         ref, 90)


def test_identical_boxes_keep_one():
  boxes = np.tile(np.array([[10, 10, 30, 40]], np.float32), (20, 1))
  scores = np.linspace(0.1, 0.9, 20).astype(np.float32)
  indices, num = nms_ops.nms(boxes, scores, iou_threshold=0.5, max_output=5, tile_size=8)
  assert int(num) == 1
  np.testing.assert_array_equal(indices, [19, -1, -1, -1, -1])
  # Equal scores too: the lowest index survives.
  indices, num = nms_ops.nms(boxes, np.ones(20, np.float32), iou_threshold=0.5,
                             max_output=5, tile_size=8)
  np.testing.assert_array_equal(indices, [0, -1, -1, -1, -1])


def test_validity_mask():
  rng = np.random.default_rng(3)
  boxes, scores = _random_set(rng, 120)
  valid = rng.random(120) < 0.6
  ref = _ref_nms(boxes, scores, 0.5, valid=valid)
  _check(*nms_ops.nms(boxes, scores, iou_threshold=0.5, max_output=100, valid=valid,
                      tile_size=32), ref, 100)
  indices, num = nms_ops.nms(boxes, scores, iou_threshold=0.5, max_output=100,
                             valid=np.zeros(120, bool), tile_size=32)
  assert int(num) == 0
  np.testing.assert_array_equal(indices, -1)


def test_batched_class_aware():
  rng = np.random.default_rng(5)
  b, n = 3, 140
  sets = [_random_set(rng, n) for _ in range(b)]
  boxes = np.stack([s[0] for s in sets])
  scores = np.stack([s[1] for s in sets])
  classes = rng.integers(0, 3, (b, n)).astype(np.int32)
  valid = rng.random((b, n)) < 0.9
  valid[2] = False
  fn = jax.jit(functools.partial(nms_ops.batched_nms, iou_threshold=0.5, max_output=60,
                                 tile_size=32))
  indices, num = fn(boxes, scores, classes, valid=valid)
  assert indices.shape == (b, 60) and num.shape == (b,)
  agnostic, num_agnostic = fn(boxes, scores, valid=valid)
  for k in range(b):
    _check(indices[k], num[k], _ref_nms(boxes[k], scores[k], 0.5, valid[k], classes[k]), 60)
    _check(agnostic[k], num_agnostic[k], _ref_nms(boxes[k], scores[k], 0.5, valid[k]), 60)
  # Classes keep overlapping boxes apart.
  assert len(_ref_nms(boxes[0], scores[0], 0.5, valid[0], classes[0])) > len(
      _ref_nms(boxes[0], scores[0], 0.5, valid[0]))
  assert int(num[2]) == 0 and np.all(np.asarray(indices[2]) == -1)
  # vmap of the single-image function gives the same answer.
  vm = jax.vmap(functools.partial(nms_ops.nms, iou_threshold=0.5, max_output=60,
                                  tile_size=32))(boxes, scores, valid=valid, classes=classes)
  np.testing.assert_array_equal(vm[0], indices)
  np.testing.assert_array_equal(vm[1], num)


def test_top_k_pads():
  scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]], np.float32)
  values, indices = nms_ops.top_k(scores, 2)
  np.testing.assert_array_equal(indices, [[1, 2], [0, 1]])
  values, indices = nms_ops.top_k(scores, 5)
  np.testing.assert_array_equal(indices, [[1, 2, 0, -1, -1], [0, 1, 2, -1, -1]])
  assert np.all(np.isneginf(np.asarray(values)[:, 3:]))
  assert indices.dtype == np.int32
