"""Tests for jaxdet.ops.masks (targets, pasting, IoU, RLE, segm evaluation) and the RoIAlign
benchmark's reference implementation."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jaxdet import evaluate
from jaxdet import op_benchmark
from jaxdet.ops import masks as mask_ops

_targets = jax.jit(mask_ops.mask_targets, static_argnames=('output_size', 'threshold'))
_paste = jax.jit(mask_ops.paste_masks, static_argnames=('height', 'width'))

# ---------------------------------------------------------------------------
# numpy references, one sample at a time.


def _ref_box_sample(mask, box, x, y):
  """Value of a box-relative mask at image point (x, y): bilinear between cell centres,
  edge cells held up to the box edge, 0 outside the box (float64)."""
  m = mask.shape[0]
  x1, y1, x2, y2 = (float(v) for v in box)
  u = (x - x1) / max(x2 - x1, 1e-6) * m
  v = (y - y1) / max(y2 - y1, 1e-6) * m
  if not (0 <= u <= m and 0 <= v <= m):
    return 0.0
  cu = min(max(u - 0.5, 0.0), m - 1.0)
  cv = min(max(v - 0.5, 0.0), m - 1.0)
  j0, i0 = int(np.floor(cu)), int(np.floor(cv))
  j1, i1 = min(j0 + 1, m - 1), min(i0 + 1, m - 1)
  a, b = cu - j0, cv - i0
  return ((1 - a) * (1 - b) * mask[i0, j0] + a * (1 - b) * mask[i0, j1] +
          (1 - a) * b * mask[i1, j0] + a * b * mask[i1, j1])


def _ref_targets(gt_masks, gt_boxes, rois, matched, s):
  gt = (np.asarray(gt_masks) > 0).astype(np.float64)
  out = np.zeros((len(rois), s, s))
  for r, (roi, g) in enumerate(zip(rois, matched)):
    x1, y1, x2, y2 = (float(v) for v in roi)
    for i in range(s):
      for j in range(s):
        x = x1 + (j + 0.5) * (x2 - x1) / s
        y = y1 + (i + 0.5) * (y2 - y1) / s
        out[r, i, j] = _ref_box_sample(gt[g], gt_boxes[g], x, y)
  return out


def _ref_grid_sample(mask, box, h, w):
  """detectron2 `_do_paste_mask`: grid_sample(align_corners=False, zeros padding) of every
  pixel centre, written per pixel (float64)."""
  m = mask.shape[0]
  x1, y1, x2, y2 = (float(v) for v in box)
  out = np.zeros((h, w))
  for py in range(h):
    gy = (py + 0.5 - y1) / (y2 - y1) * 2 - 1  # normalised [-1, 1] over the box
    for px in range(w):
      gx = (px + 0.5 - x1) / (x2 - x1) * 2 - 1
      # align_corners=False: -1 and 1 are the outer edges of the M cells.
      cx, cy = ((gx + 1) * m - 1) / 2, ((gy + 1) * m - 1) / 2
      j0, i0 = int(np.floor(cx)), int(np.floor(cy))
      acc = 0.0
      for i, wi in ((i0, 1 - (cy - i0)), (i0 + 1, cy - i0)):
        for j, wj in ((j0, 1 - (cx - j0)), (j0 + 1, cx - j0)):
          if 0 <= i < m and 0 <= j < m:
            acc += wi * wj * mask[i, j]
      out[py, px] = acc
  return out


def _crop_to_box(full, box, m):
  """Box-relative M x M mask of a full-image binary mask: the data pipeline's crop (aligned
  RoIAlign with one sample per cell, edge clamped, thresholded at 0.5)."""
  h, w = full.shape
  x1, y1, x2, y2 = box
  ys = y1 + (np.arange(m) + 0.5) * (y2 - y1) / m - 0.5
  xs = x1 + (np.arange(m) + 0.5) * (x2 - x1) / m - 0.5

  def taps(c, n):
    lo = np.clip(np.floor(c), 0, n - 1).astype(int)
    hi = np.clip(np.floor(c) + 1, 0, n - 1).astype(int)
    return lo, hi, c - np.floor(c)

  y0, y1_, wy = taps(ys, h)
  x0, x1_, wx = taps(xs, w)
  f = full.astype(np.float64)
  top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1_] * wx
  bot = f[y1_][:, x0] * (1 - wx) + f[y1_][:, x1_] * wx
  return ((top * (1 - wy[:, None]) + bot * wy[:, None]) >= 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------
# mask_targets


def _random_instances(rng, n, m, size):
  xy = rng.uniform(0, size * 0.6, (n, 2))
  wh = rng.uniform(4, size * 0.4, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  masks = (rng.uniform(size=(n, m, m)) > 0.5).astype(np.uint8)
  return masks, boxes


def test_mask_targets_match_reference():
  rng = np.random.default_rng(0)
  gt_masks, gt_boxes = _random_instances(rng, 3, 8, 64.0)
  matched = rng.integers(0, 3, 10).astype(np.int32)
  # RoIs around their ground truth: jittered, shrunk, grown past the box, one far outside.
  g = gt_boxes[matched]
  wh = np.concatenate([g[:, 2:] - g[:, :2]] * 2, 1)
  rois = (g + rng.uniform(-0.4, 0.4, (10, 4)) * wh).astype(np.float32)
  rois = np.concatenate([rois[:, :2], np.maximum(rois[:, 2:], rois[:, :2] + 1)], 1)
  rois[0] = g[0] + np.array([-5, -5, 5, 5], np.float32)
  rois[1] = [200, 200, 220, 230]
  soft = _targets(gt_masks, gt_boxes, rois, matched, output_size=6, threshold=None)
  want = _ref_targets(gt_masks, gt_boxes, rois, matched, 6)
  assert soft.shape == (10, 6, 6) and soft.dtype == jnp.float32
  np.testing.assert_allclose(soft, want, atol=1e-5)
  assert (np.asarray(soft[1]) == 0).all()
  hard = _targets(gt_masks, gt_boxes, rois, matched, output_size=6)
  near = np.abs(want - 0.5) < 1e-4
  np.testing.assert_array_equal(np.asarray(hard)[~near], (want >= 0.5)[~near])


def test_mask_targets_roi_equal_to_gt_box_is_the_resized_mask():
  rng = np.random.default_rng(1)
  gt_masks, gt_boxes = _random_instances(rng, 2, 12, 64.0)
  rois, matched = gt_boxes[::-1].copy(), np.array([1, 0], np.int32)
  # S == M: exactly the ground truth mask.
  same = _targets(gt_masks, gt_boxes, rois, matched, output_size=12)
  np.testing.assert_array_equal(same, gt_masks[::-1])
  # S != M: the ground truth mask bilinearly resized (half-pixel centres, edge clamped).
  for s in (28, 5):
    got = _targets(gt_masks, gt_boxes, rois, matched, output_size=s, threshold=None)
    want = jax.image.resize(gt_masks[::-1].astype(np.float32), (2, s, s), 'linear',
                            antialias=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_mask_targets_zero_outside_gt_box():
  # A RoI twice the size of a full (all-ones) ground truth box, centred on it: the centre
  # half of the target is 1, the ring around it 0.
  gt_masks = np.ones((1, 8, 8), np.uint8)
  gt_boxes = np.array([[20, 10, 40, 30]], np.float32)
  rois = np.array([[10, 0, 50, 40]], np.float32)
  got = np.asarray(_targets(gt_masks, gt_boxes, rois, np.zeros(1, np.int32), output_size=8))
  want = np.zeros((8, 8))
  want[2:6, 2:6] = 1
  np.testing.assert_array_equal(got[0], want)


def test_mask_targets_vmap_over_images():
  rng = np.random.default_rng(2)
  per_image = [_random_instances(rng, 4, 8, 64.0) for _ in range(2)]
  gt_masks = np.stack([p[0] for p in per_image])
  gt_boxes = np.stack([p[1] for p in per_image])
  rois = gt_boxes[:, [1, 2, 0]] + 1.0
  matched = np.tile(np.array([1, 2, 0], np.int32), (2, 1))
  fn = jax.jit(jax.vmap(lambda *a: mask_ops.mask_targets(*a, output_size=7, threshold=None)))
  got = fn(gt_masks, gt_boxes, rois, matched)
  for b in range(2):
    want = _ref_targets(gt_masks[b], gt_boxes[b], rois[b], matched[b], 7)
    np.testing.assert_allclose(got[b], want, atol=1e-5)


# ---------------------------------------------------------------------------
# pasting


def test_paste_matches_grid_sample_reference_and_numpy():
  rng = np.random.default_rng(3)
  masks = rng.uniform(size=(4, 6, 6)).astype(np.float32)
  # Boxes inside, partly outside and tiny, with fractional corners.
  boxes = np.array([[3.3, 2.7, 20.2, 15.9], [-4.0, 10.5, 9.5, 30.0], [25.0, 20.0, 27.5, 21.5],
                    [0.0, 0.0, 32.0, 24.0]], np.float32)
  got = np.asarray(_paste(masks, boxes, height=24, width=32))
  assert got.shape == (4, 24, 32)
  for k in range(4):
    want = _ref_grid_sample(masks[k].astype(np.float64), boxes[k], 24, 32)
    np.testing.assert_allclose(got[k], want, atol=1e-5)
    host = mask_ops.paste_mask_numpy(masks[k], boxes[k], (24, 32))
    assert host.dtype == np.uint8 and host.shape == (24, 32)
    near = np.abs(want - 0.5) < 1e-4
    np.testing.assert_array_equal(host[~near], (want >= 0.5)[~near])


def test_paste_round_trip_of_a_rectangle():
  h, w = 60, 80
  full = np.zeros((h, w), np.uint8)
  full[12:41, 20:62] = 1  # rows 12..40, columns 20..61
  # The rectangle's own box: the box-relative mask is all ones and pastes back exactly.
  tight = np.array([20, 12, 62, 41], np.float32)
  m = _crop_to_box(full, tight, 28)
  assert m.all()
  np.testing.assert_array_equal(mask_ops.paste_mask_numpy(m, tight, (h, w)), full)
  # A larger box with fractional corners: equal except within a pixel of the border.
  loose = np.array([14.3, 5.6, 70.2, 50.9], np.float32)
  m = _crop_to_box(full, loose, 28)
  pasted = mask_ops.paste_mask_numpy(m, loose, (h, w))
  wrong = np.argwhere(pasted != full)
  assert len(wrong) < 0.1 * full.sum()
  dist_y = np.minimum(np.abs(wrong[:, 0] - 12), np.abs(wrong[:, 0] - 40))
  dist_x = np.minimum(np.abs(wrong[:, 1] - 20), np.abs(wrong[:, 1] - 61))
  assert (np.minimum(dist_y, dist_x) <= 1).all()
  # The JAX paste agrees with the host one.
  jax_pasted = np.asarray(_paste(m[None].astype(np.float32), loose[None], height=h, width=w))
  np.testing.assert_array_equal(jax_pasted[0] >= 0.5, pasted.astype(bool))


def test_paste_degenerate_boxes_are_empty():
  m = np.ones((4, 4), np.float32)
  for box in ([5, 5, 5, 9], [np.nan, 0, 4, 4], [100, 100, 120, 120]):
    assert mask_ops.paste_mask_numpy(m, np.array(box, np.float32), (16, 16)).sum() == 0
  got = _paste(m[None], np.array([[5, 5, 5, 9]], np.float32), height=16, width=16)
  assert float(jnp.abs(got).max()) == 0.0


# ---------------------------------------------------------------------------
# IoU and RLE


def test_mask_iou_matches_brute_force():
  rng = np.random.default_rng(4)
  a = rng.uniform(size=(3, 10, 12)) > 0.6
  b = rng.uniform(size=(4, 10, 12)) > 0.4
  a[2] = False
  b[3] = False
  got = np.asarray(jax.jit(mask_ops.mask_iou)(a, b))
  want = np.zeros((3, 4))
  for i in range(3):
    for j in range(4):
      union = (a[i] | b[j]).sum()
      want[i, j] = (a[i] & b[j]).sum() / union if union else 0.0
  np.testing.assert_allclose(got, want, atol=1e-6)
  # pycocotools computes the same IoU from RLEs.
  rle = lambda x: [mask_utils.encode(np.asfortranarray(v.astype(np.uint8))) for v in x]
  coco = mask_utils.iou(rle(a[:2]), rle(b[:3]), [0, 0, 0])
  np.testing.assert_allclose(got[:2, :3], coco, atol=1e-6)


def test_encode_rle_round_trip():
  rng = np.random.default_rng(5)
  binary = (rng.uniform(size=(17, 23)) > 0.5).astype(np.uint8)
  rle = mask_ops.encode_rle(binary)
  assert isinstance(rle['counts'], str) and rle['size'] == [17, 23]
  back = json.loads(json.dumps(rle))
  np.testing.assert_array_equal(mask_utils.decode(back), binary)
  assert mask_utils.area(back) == binary.sum()


# ---------------------------------------------------------------------------
# segm evaluation through evaluate.coco_evaluate


def _rect(h, w, x1, y1, x2, y2):
  out = np.zeros((h, w), np.uint8)
  out[y1:y2, x1:x2] = 1
  return out


def _segm_ground_truth():
  # Image 1: a 40 x 30 rectangle; image 2: a 50 x 40 rectangle; same category.
  gts = {1: (10, 10, 50, 40), 2: (20, 30, 70, 70)}
  anns = []
  for image_id, (x1, y1, x2, y2) in gts.items():
    mask = _rect(80, 100, x1, y1, x2, y2)
    anns.append({'id': image_id, 'image_id': image_id, 'category_id': 4,
                 'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': int(mask.sum()), 'iscrowd': 0,
                 'segmentation': mask_ops.encode_rle(mask)})
  gt = COCO()
  gt.dataset = {'images': [{'id': i, 'width': 100, 'height': 80} for i in gts],
                'categories': [{'id': 4, 'name': 'thing'}], 'annotations': anns}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def _segm_results(boxes, scores):
  dets = {'boxes': np.asarray(boxes, np.float32)[:, None],
          'scores': np.asarray(scores, np.float32)[:, None],
          'classes': np.zeros((2, 1), np.int32), 'num': np.ones(2, np.int32),
          'masks': np.ones((2, 1, 28, 28), np.float32)}
  return evaluate.detections_to_coco(dets, np.array([1, 2]), [4],
                                     orig_sizes=np.array([[80, 100], [80, 100]]))


def test_segm_evaluation_perfect_masks():
  results = _segm_results([[10, 10, 50, 40], [20, 30, 70, 70]], [0.9, 0.8])
  metrics = evaluate.coco_evaluate(_segm_ground_truth(), results, 'segm')
  np.testing.assert_allclose(metrics['segm/AP'], 1.0)
  np.testing.assert_allclose(metrics['segm/AP75'], 1.0)


def test_segm_evaluation_wrong_mask_matches_hand_computation():
  # Image 2's mask covers the left 36 of the 50 columns: IoU 0.72, a true positive at the
  # IoU thresholds 0.50..0.70 (5 of 10) and a false positive above. There, image 1's mask
  # (higher score) is the only hit: precision 1 up to recall 0.5, i.e. 51 of COCO's 101
  # recall points. AP = (5 * 1 + 5 * 51 / 101) / 10.
  results = _segm_results([[10, 10, 50, 40], [20, 30, 56, 70]], [0.9, 0.8])
  metrics = evaluate.coco_evaluate(_segm_ground_truth(), results, 'segm')
  np.testing.assert_allclose(metrics['segm/AP'], (5 + 5 * 51 / 101) / 10, atol=1e-6)
  np.testing.assert_allclose(metrics['segm/AP50'], 1.0)
  np.testing.assert_allclose(metrics['segm/AP75'], 51 / 101, atol=1e-6)
  # With the wrong mask scored higher, precision at recall 0.5 drops to 1/2 above IoU 0.72.
  results = _segm_results([[10, 10, 50, 40], [20, 30, 56, 70]], [0.7, 0.8])
  metrics = evaluate.coco_evaluate(_segm_ground_truth(), results, 'segm')
  np.testing.assert_allclose(metrics['segm/AP'], (5 + 5 * 0.5 * 51 / 101) / 10, atol=1e-6)


# ---------------------------------------------------------------------------
# the RoIAlign benchmark's implementations


def test_roi_align_benchmark_smoke():
  rows = op_benchmark.roi_align_rows(images=1, rois=4, channels=4, sizes=(7,), repeats=1,
                                     image_size=64)
  assert {r['impl'] for r in rows} == {'gather', 'vmap'}
  for r in rows:
    assert r['output'] == 7 and r['seconds'] > 0
    assert r['max_abs_diff'] < 1e-4


def test_roi_align_vmap_reference_agrees_with_multilevel():
  from jaxdet.ops import roi_align as ra  # pylint: disable=g-import-not-at-top
  features, boxes = op_benchmark.make_inputs(images=2, rois=6, channels=3, image_size=64,
                                             seed=1)
  args = dict(output_size=5, sampling_ratio=2)
  want = jax.jit(lambda f, b: ra.multilevel_roi_align(f, b, **args))(features, boxes)
  got = jax.jit(lambda f, b: op_benchmark.vmap_roi_align(f, b, **args))(features, boxes)
  np.testing.assert_allclose(got, want, atol=1e-5)
