"""Tests for jaxdet.ops.roi_align: numpy loop references and detectron2 vectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from jaxdet.ops import roi_align as ra

_align = jax.jit(ra.roi_align, static_argnames=(
    'output_size', 'spatial_scale', 'sampling_ratio', 'aligned'))

# ---------------------------------------------------------------------------
# numpy references: one box, one bin, one sample at a time.


def _ref_bilinear(fmap, y, x):
  """torchvision `bilinear_interpolate` on fmap [H, W, C], float64."""
  h, w = fmap.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(fmap.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * fmap[y0, x0] + (1 - ly) * lx * fmap[y0, x1] +
          ly * (1 - lx) * fmap[y1, x0] + ly * lx * fmap[y1, x1])


def _ref_roi_align_one(fmap, box, out, scale, ratio, aligned):
  fmap = np.asarray(fmap, np.float64)
  off = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [float(v) * scale - off for v in box]
  rw, rh = x2 - x1, y2 - y1
  if not aligned:
    rw, rh = max(rw, 1.0), max(rh, 1.0)
  bw, bh = rw / out, rh / out
  res = np.zeros((out, out, fmap.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      acc = 0.0
      for iy in range(ratio):
        y = y1 + ph * bh + (iy + 0.5) * bh / ratio
        for ix in range(ratio):
          x = x1 + pw * bw + (ix + 0.5) * bw / ratio
          acc = acc + _ref_bilinear(fmap, y, x)
      res[ph, pw] = acc / (ratio * ratio)
  return res


def _ref_roi_align(features, boxes, out, scale, ratio, aligned):
  return np.stack([
      np.stack([_ref_roi_align_one(features[b], box, out, scale, ratio, aligned)
                for box in boxes[b]]) for b in range(len(boxes))])


def _ref_roi_pool(features, boxes, out, scale):
  """torchvision roi_pool_forward_kernel_impl, float64."""
  features = np.asarray(features, np.float64)
  bsz, h, w, c = features.shape
  res = np.zeros((bsz, boxes.shape[1], out, out, c))
  rnd = lambda v: math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)
  for b in range(bsz):
    for r, box in enumerate(boxes[b]):
      sx, sy, ex, ey = [rnd(float(v) * scale) for v in box]
      rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
      bh, bw = rh / out, rw / out
      for ph in range(out):
        hs = min(max(math.floor(ph * bh) + sy, 0), h)
        he = min(max(math.ceil((ph + 1) * bh) + sy, 0), h)
        for pw in range(out):
          ws = min(max(math.floor(pw * bw) + sx, 0), w)
          we = min(max(math.ceil((pw + 1) * bw) + sx, 0), w)
          if he > hs and we > ws:
            res[b, r, ph, pw] = features[b, hs:he, ws:we].max(axis=(0, 1))
  return res


def _ref_spp(features, boxes, levels, scale):
  features = np.asarray(features, np.float64)
  bsz, h, w, c = features.shape
  res = np.zeros((bsz, boxes.shape[1], sum(n * n for n in levels) * c))
  for b in range(bsz):
    for r, box in enumerate(boxes[b]):
      x0, y0 = math.floor(box[0] * scale), math.floor(box[1] * scale)
      ax = max(math.ceil(box[2] * scale) - x0, 1)
      ay = max(math.ceil(box[3] * scale) - y0, 1)
      parts = []
      for n in levels:
        for i in range(n):
          for j in range(n):
            hs = y0 + i * (ay // n)
            ws = x0 + j * (ax // n)
            he, we = hs + math.ceil(ay / n), ws + math.ceil(ax / n)
            hs, he = np.clip([hs, he], 0, h)
            ws, we = np.clip([ws, we], 0, w)
            if he > hs and we > ws:
              parts.append(features[b, hs:he, ws:we].max(axis=(0, 1)))
            else:
              parts.append(np.zeros(c))
      res[b, r] = np.concatenate(parts)
  return res


def _random_boxes(rng, bsz, r, size):
  """Boxes of all sizes, some partly outside the map, some tiny or empty."""
  xy = rng.uniform(-0.3 * size, size, (bsz, r, 2))
  wh = rng.uniform(0.0, 0.8 * size, (bsz, r, 2))
  wh[:, ::4] = rng.uniform(0.0, 1.5, (bsz, (r + 3) // 4, 2))  # tiny boxes
  wh[:, 1] = 0.0  # empty box
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('ratio', [1, 2])
def test_roi_align_matches_reference(aligned, ratio):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = _random_boxes(rng, 2, 12, 40.0)
  fn = jax.jit(lambda f, b: ra.roi_align(f, b, output_size=3, spatial_scale=0.25,
                                         sampling_ratio=ratio, aligned=aligned))
  got = fn(feats, boxes)
  assert got.shape == (2, 12, 3, 3, 3)
  want = _ref_roi_align(feats, boxes, 3, 0.25, ratio, aligned)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_roi_align_non_square_output():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
  boxes = np.array([[[0.5, 1.0, 5.0, 4.5]]], np.float32)
  got = jax.jit(lambda f, b: ra.roi_align(f, b, output_size=(2, 4), spatial_scale=1.0,
                                         sampling_ratio=2))(feats, boxes)
  assert got.shape == (1, 1, 2, 4, 2)
  # Rows: bins of height 1.75; columns of width 1.125; sample by sample.
  want = np.zeros((2, 4, 2))
  for ph in range(2):
    for pw in range(4):
      for iy in range(2):
        for ix in range(2):
          y = 0.5 + ph * 1.75 + (iy + 0.5) * 1.75 / 2
          x = 0.0 + pw * 1.125 + (ix + 0.5) * 1.125 / 2
          want[ph, pw] += _ref_bilinear(feats[0].astype(np.float64), y, x) / 4
  np.testing.assert_allclose(got[0, 0], want, atol=1e-5)


# detectron2 tests/layers/test_roi_align.py: 5x5 arange input, box (1, 1, 3, 3),
# 4x4 output, scale 1; its adaptive ratio is ceil(2 / 4) = 1 sample per bin.
_D2_ALIGNED = [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11],
               [12, 12.5, 13, 13.5]]
_D2_UNALIGNED = [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14],
                 [15, 15.5, 16, 16.5]]


@pytest.mark.parametrize('aligned,want', [(True, _D2_ALIGNED),
                                          (False, _D2_UNALIGNED)])
def test_roi_align_detectron2_vectors(aligned, want):
  feats = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  boxes = jnp.array([[[1.0, 1.0, 3.0, 3.0]]])
  got = _align(feats, boxes, output_size=4, spatial_scale=1.0,
                sampling_ratio=1, aligned=aligned)
  np.testing.assert_allclose(got[0, 0, ..., 0], np.array(want), atol=1e-5)


def test_roi_align_aligned_is_resolution_consistent():
  # detectron2: aligned RoIAlign of a 2x-downsampled map with box / 2 matches
  # the full-resolution result on a linear ramp (bilinear sampling is exact there).
  yy, xx = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing='ij')
  full = (2.0 * yy + 3.0 * xx)[None, :, :, None].astype(np.float32)
  boxes = np.array([[[3.0, 2.0, 11.0, 13.0]]], np.float32)
  a = _align(full, boxes, output_size=4, spatial_scale=1.0, sampling_ratio=2)
  half = full.reshape(1, 8, 2, 8, 2, 1).mean(axis=(2, 4))
  b = _align(half, boxes, output_size=4, spatial_scale=0.5, sampling_ratio=2)
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_roi_align_jit_vmap():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(3, 2, 7, 7, 2)).astype(np.float32)
  boxes = _random_boxes(rng, 3 * 2, 4, 7.0).reshape(3, 2, 4, 4)
  fn = lambda f, b: ra.roi_align(f, b, output_size=2, spatial_scale=1.0,
                                 sampling_ratio=2)
  got = jax.jit(jax.vmap(fn))(feats, boxes)
  want = np.stack([_ref_roi_align(feats[i], boxes[i], 2, 1.0, 2, True) for i in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_roi_align_grads():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(1, 5, 6, 2)).astype(np.float32)
  boxes = np.array([[[0.7, 1.3, 4.1, 3.6], [2.2, -0.4, 6.3, 4.35]]], np.float32)
  cot = rng.normal(size=(1, 2, 2, 2, 2))

  @jax.jit
  def f(fe, bx):
    out = ra.roi_align(fe, bx, output_size=2, spatial_scale=1.0, sampling_ratio=2)
    return jnp.sum(out * cot)

  # Linear in the features: check_grads is exact up to float32 rounding.
  jtu.check_grads(lambda fe: f(fe, boxes), (feats,), order=1, modes=['rev'],
                  eps=1e-2, atol=1e-3, rtol=1e-3)
  # Box gradient against a float64 central difference of the numpy reference.
  g = np.asarray(jax.grad(f, argnums=1)(feats, boxes))
  ref = lambda bx: float(np.sum(_ref_roi_align(feats, bx, 2, 1.0, 2, True) * cot))
  fd = np.zeros_like(g, np.float64)
  for idx in np.ndindex(*boxes.shape):
    d = np.zeros(boxes.shape)
    d[idx] = 1e-4
    fd[idx] = (ref(boxes + d) - ref(boxes - d)) / 2e-4
  np.testing.assert_allclose(g, fd, atol=2e-3)


def test_assign_levels():
  sizes = np.array([112.0, 224.0, 448.0, 16.0, 2000.0, 0.0, 223.0])
  boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], -1)
  boxes = np.concatenate([boxes, [[0.0, 0.0, 448.0, 112.0]]])  # sqrt(w * h) = 224
  got = jax.jit(ra.assign_levels)(boxes)
  np.testing.assert_array_equal(got, [3, 4, 5, 2, 5, 2, 3, 4])
  got = jax.jit(lambda b: ra.assign_levels(b, min_level=3, max_level=7))(boxes)
  np.testing.assert_array_equal(got, [3, 4, 5, 3, 7, 3, 3, 4])


def test_multilevel_roi_align_matches_per_level():
  rng = np.random.default_rng(4)
  img = 64
  feats = {l: rng.normal(size=(2, img >> l, img >> l, 3)).astype(np.float32)
           for l in range(2, 6)}
  sizes = np.array([[8.0, 20.0, 60.0, 112.0, 160.0, 250.0],
                    [0.0, 30.0, 224.0, 40.0, 10.0, 500.0]])
  xy = rng.uniform(-8, 48, (2, 6, 2))
  boxes = np.concatenate([xy, xy + sizes[..., None]], -1).astype(np.float32)
  fn = jax.jit(lambda f, b: ra.multilevel_roi_align(
      f, b, output_size=2, sampling_ratio=2, canonical_size=56))
  got = fn(feats, boxes)
  assert got.shape == (2, 6, 2, 2, 3)
  for b in range(2):
    for r in range(6):
      s = math.sqrt(sizes[b, r] ** 2)
      lvl = min(max(math.floor(4 + math.log2(s / 56 + 1e-8)), 2), 5)
      want = _ref_roi_align_one(feats[lvl][b], boxes[b, r], 2, 2.0 ** -lvl, 2, True)
      np.testing.assert_allclose(got[b, r], want, atol=1e-5, err_msg=f'{b},{r}')


@pytest.mark.parametrize('scale', [1.0, 0.5])
def test_roi_pool_matches_reference(scale):
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  boxes = _random_boxes(rng, 2, 10, 10.0 / scale)
  boxes[0, 2] = [0.5 / scale, 1.5 / scale, 2.5 / scale, 6.5 / scale]  # halves round away
  got = jax.jit(lambda f, b: ra.roi_pool(f, b, output_size=3, spatial_scale=scale))(
      feats, boxes)
  np.testing.assert_allclose(got, _ref_roi_pool(feats, boxes, 3, scale), atol=1e-6)
  # A window bound large enough for every bin gives the same result.
  bounded = jax.jit(lambda f, b: ra.roi_pool(f, b, output_size=3, spatial_scale=scale,
                                             max_bin_size=5))(feats, boxes)
  np.testing.assert_allclose(bounded, got, atol=0)


def test_roi_pool_bins_do_not_depend_on_the_other_rois():
  """Bin edges are exact: (size / 7) * 7 in float32 can exceed an integer and move a bin's
  end by a cell, differently depending on how XLA vectorises the batch of RoIs."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
  boxes = np.concatenate([np.array([[[4, 4, 20, 30], [0, 0, 63, 60]]], np.float32),
                          _random_boxes(rng, 1, 30, 64.0)], axis=1)
  pool = jax.jit(lambda f, b: ra.roi_pool(f, b, output_size=7, spatial_scale=1 / 8))
  together = pool(feats, boxes)
  want = _ref_roi_pool(feats, boxes, 7, 1 / 8)
  np.testing.assert_allclose(together, want, atol=1e-6)
  for r in (0, 1, 5):
    np.testing.assert_array_equal(pool(feats, boxes[:, r:r + 1])[0, 0], together[0, r])


def test_roi_pool_grad_goes_to_argmax():
  feats = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  boxes = jnp.array([[[0.0, 0.0, 3.0, 3.0]]])
  g = jax.jit(jax.grad(lambda f: ra.roi_pool(f, boxes, output_size=2,
                                             spatial_scale=1.0).sum()))(feats)
  want = np.zeros((4, 4))
  want[1, 1] = want[1, 3] = want[3, 1] = want[3, 3] = 1.0
  np.testing.assert_array_equal(g[0, ..., 0], want)


def test_spatial_pyramid_pool_matches_reference():
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(2, 9, 8, 2)).astype(np.float32)
  boxes = _random_boxes(rng, 2, 8, 16.0)
  boxes[1, 3] = [0.0, 0.0, 16.0, 18.0]  # whole map: a = 8 x 9 cells
  got = jax.jit(lambda f, b: ra.spatial_pyramid_pool(f, b, spatial_scale=0.5))(
      feats, boxes)
  assert got.shape == (2, 8, 50 * 2)
  assert ra.num_pyramid_bins() == 50
  np.testing.assert_allclose(got, _ref_spp(feats, boxes, (1, 2, 3, 6), 0.5), atol=1e-6)
  # The 1x1 level of the whole-map box is the global max.
  np.testing.assert_allclose(got[1, 3, :2], feats[1].max(axis=(0, 1)))
