"""Tests of jaxdet/data/transforms.py against numpy references and closed-form geometry."""

import numpy as np
import pytest
import tensorflow as tf

from configs import common
from jaxdet.data import transforms


def _cfg(**overrides):
  cfg = common.data_config('shapes', image_size=64)
  cfg.size_divisor = 32
  cfg.mask_size = 4
  cfg.update(overrides)
  return cfg


def _example(image, boxes, classes=None, masks=None, is_crowd=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  ex = {'image': np.asarray(image, np.uint8), 'image_id': np.int64(7), 'boxes': boxes,
        'classes': np.arange(n, dtype=np.int32) if classes is None else np.int32(classes),
        'is_crowd': np.zeros(n, bool) if is_crowd is None else np.asarray(is_crowd)}
  if masks is not None:
    ex['masks'] = np.asarray(masks, np.uint8)
  return ex


def _rect_mask(h, w, box):
  x1, y1, x2, y2 = (int(v) for v in box)
  m = np.zeros((h, w), np.uint8)
  m[y1:y2, x1:x2] = 1
  return m


def _numpy(d):
  return {k: v.numpy() for k, v in d.items()}


def test_padded_size():
  assert transforms.padded_size(640, 128) == 640
  assert transforms.padded_size(256, 128) == 256
  assert transforms.padded_size(300, 128) == 384
  assert transforms.padded_size(100, 128) == 128


def test_normalize_image():
  image = np.array([[[255, 0, 128]]], np.uint8)
  got = transforms.normalize_image(image).numpy()
  want = (np.array([1.0, 0.0, 128 / 255]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)


def test_sanitize_boxes():
  boxes = np.array([
      [10, 10, 20, 20],          # fine
      [np.nan, 0, 5, 5],         # NaN
      [0, 0, np.inf, 5],         # inf
      [30, 10, 20, 20],          # negative width
      [5, 5, 5, 9],              # zero width
      [-10, -5, 15, 200],        # sticks out: clipped
      [120, 10, 150, 20],        # entirely right of the image
  ], np.float32)
  got, keep = transforms.sanitize_boxes(boxes, 50, 100)
  np.testing.assert_array_equal(keep.numpy(), [1, 0, 0, 0, 0, 1, 0])
  np.testing.assert_allclose(got.numpy()[keep.numpy()], [[10, 10, 20, 20], [0, 0, 15, 50]])
  assert np.all(np.isfinite(got.numpy()))


def test_horizontal_flip_against_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)
  boxes = np.array([[0, 1, 4, 5], [3.5, 2, 13, 9]], np.float32)
  masks = np.stack([_rect_mask(9, 13, (0, 1, 4, 5)), _rect_mask(9, 13, (4, 2, 13, 9))])
  img, b, m = transforms.horizontal_flip(image, boxes, masks)
  np.testing.assert_array_equal(img.numpy(), image[:, ::-1])
  np.testing.assert_array_equal(m.numpy(), masks[:, :, ::-1])
  np.testing.assert_allclose(b.numpy(), [[9, 1, 13, 5], [0, 2, 9.5, 9]])
  # The flipped box of a rectangle mask is the tight box of the flipped mask.
  cols = np.flatnonzero(m.numpy()[0].any(0))
  assert (cols[0], cols[-1] + 1) == (9, 13)


def test_eval_geometry():
  # 100 x 200 (h x w), long side to 256: scale 1.28, content 128 x 256, canvas 256.
  image = np.full((100, 200, 3), 200, np.uint8)
  ex = _example(image, [[10, 20, 50, 60]])
  out = _numpy(transforms.eval_preprocess(ex, _cfg(image_size=256, size_divisor=128)))
  assert out['image'].shape == (256, 256, 3) and out['image'].dtype == np.float32
  np.testing.assert_allclose(out['scale'], [1.28, 1.28])
  np.testing.assert_array_equal(out['offset'], [0, 0])
  np.testing.assert_array_equal(out['orig_size'], [100, 200])
  np.testing.assert_allclose(out['boxes'], [[12.8, 25.6, 64, 76.8]], rtol=1e-6)
  value = transforms.normalize_image(np.full((1, 1, 3), 200, np.uint8)).numpy()[0, 0]
  np.testing.assert_allclose(out['image'][:128], np.broadcast_to(value, (128, 256, 3)),
                             rtol=1e-5)
  np.testing.assert_array_equal(out['image'][128:], 0)   # zero padding below
  assert out['image_id'] == 7


def test_eval_pads_to_multiple_of_size_divisor():
  image = np.full((30, 40, 3), 90, np.uint8)
  out = _numpy(transforms.eval_preprocess(_example(image, []), _cfg(image_size=300,
                                                                    size_divisor=128)))
  assert out['image'].shape == (384, 384, 3)
  assert np.all(out['image'][:225, :300] != 0)   # 30 x 40 scaled by 7.5
  np.testing.assert_array_equal(out['image'][225:], 0)
  np.testing.assert_array_equal(out['image'][:, 300:], 0)
  assert out['boxes'].shape == (0, 4)


def _bright_box(image):
  """Tight box (x1, y1, x2, y2) of the pixels above the image's mid value."""
  on = image[..., 0] > 0.5 * (image[..., 0].max() + image[..., 0].min())
  rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def test_train_crop_maps_a_known_box():
  # A white rectangle on black, scaled x2 and cropped to 64: the box must land where
  # the white pixels land, and map back through scale / offset.
  box = np.array([20, 24, 44, 40], np.float32)
  image = np.repeat(_rect_mask(64, 64, box)[..., None] * 255, 3, axis=-1)
  cfg = _cfg(aug_scale_min=2.0, aug_scale_max=2.0, aug_flip=False)
  offsets = set()
  for s in range(8):
    out = _numpy(transforms.train_preprocess(_example(image, box), tf.constant([s, 1]), cfg))
    oy, ox = out['offset']
    assert 0 <= oy <= 64 and 0 <= ox <= 64 and oy == int(oy) and ox == int(ox)
    offsets.add((oy, ox))
    np.testing.assert_allclose(out['scale'], [2, 2])
    want = np.clip(box * 2 - [ox, oy, ox, oy], 0, 64)
    if want[2] - want[0] <= 0 or want[3] - want[1] <= 0:
      assert out['boxes'].shape == (0, 4)   # cropped away, with its class
      assert out['classes'].shape == (0,)
      continue
    np.testing.assert_allclose(out['boxes'][0], want, atol=1e-5)
    np.testing.assert_allclose(_bright_box(out['image']), want, atol=1.0)
    if np.all(want == box * 2 - [ox, oy, ox, oy]):   # not clipped: exact round trip
      back = transforms.input_to_original(out['boxes'], out['scale'], out['offset'])
      np.testing.assert_allclose(back.numpy()[0], box, atol=1e-5)
  assert len(offsets) > 4   # the crop position really is random


def test_train_scale_jitter_range():
  image = np.zeros((50, 100, 3), np.uint8)
  cfg = _cfg(image_size=64, aug_scale_min=0.5, aug_scale_max=1.5)
  sx = []
  for s in range(20):
    out = _numpy(transforms.train_preprocess(_example(image, []), tf.constant([s, 0]), cfg))
    assert out['image'].shape == (64, 64, 3)
    sx.append(out['scale'][1])
  sx = np.array(sx)
  # The long side (100) goes to 64 * r, r in [0.5, 1.5].
  assert sx.min() >= 0.32 - 0.01 and sx.max() <= 0.96 + 0.01 and sx.std() > 0.05


def test_train_flip_mirrors_the_unflipped_view():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
  boxes = np.array([[3, 4, 20, 30], [30, 10, 63, 60]], np.float32)
  on = _cfg(aug_scale_min=1.0, aug_scale_max=1.0, aug_flip=True)
  off = _cfg(aug_scale_min=1.0, aug_scale_max=1.0, aug_flip=False)
  plain = _numpy(transforms.train_preprocess(_example(image, boxes), tf.constant([0, 0]), off))
  flips = []
  for s in range(16):
    out = _numpy(transforms.train_preprocess(_example(image, boxes), tf.constant([s, 0]), on))
    flipped = not np.array_equal(out['image'], plain['image'])
    flips.append(flipped)
    if flipped:
      np.testing.assert_allclose(out['image'], plain['image'][:, ::-1], atol=1e-5)
      np.testing.assert_allclose(out['boxes'], [[44, 4, 61, 30], [1, 10, 34, 60]])
  assert 0 < sum(flips) < len(flips)


def test_train_drops_crowd_and_sanitises():
  image = np.zeros((40, 40, 3), np.uint8)
  boxes = [[1, 1, 10, 10], [5, 5, 30, 30], [np.nan, 1, 2, 3], [20, 20, 10, 30]]
  ex = _example(image, boxes, classes=[0, 1, 2, 3], is_crowd=[False, True, False, False])
  cfg = _cfg(image_size=40, size_divisor=8, aug_scale_min=1.0, aug_scale_max=1.0,
             aug_flip=False)
  out = _numpy(transforms.train_preprocess(ex, tf.constant([0, 0]), cfg))
  np.testing.assert_array_equal(out['classes'], [0])
  cfg.skip_crowd_in_train = False
  out = _numpy(transforms.train_preprocess(ex, tf.constant([0, 0]), cfg))
  np.testing.assert_array_equal(out['classes'], [0, 1])
  np.testing.assert_array_equal(out['is_crowd'], [False, True])
  out = _numpy(transforms.eval_preprocess(ex, _cfg(image_size=40, size_divisor=8)))
  np.testing.assert_array_equal(out['classes'], [0, 1])   # eval keeps crowd


def _reference_mask_crop(mask, box, m):
  """numpy RoIAlign(aligned=True), one bilinear sample per cell, edge-clamped.

  Returns the interpolated values [m, m] (before thresholding).
  """
  h, w = mask.shape
  x1, y1, x2, y2 = box
  xs = x1 + (np.arange(m) + 0.5) * (x2 - x1) / m - 0.5
  ys = y1 + (np.arange(m) + 0.5) * (y2 - y1) / m - 0.5

  def weights(coords, size):
    lo = np.floor(coords)
    frac = coords - lo
    lo_i = np.clip(lo, 0, size - 1).astype(int)
    hi_i = np.clip(lo + 1, 0, size - 1).astype(int)
    return lo_i, hi_i, frac

  x0, x1_, fx = weights(xs, w)
  y0, y1_, fy = weights(ys, h)
  f = mask.astype(np.float64)
  top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1_] * fx
  bottom = f[y1_][:, x0] * (1 - fx) + f[y1_][:, x1_] * fx
  return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_crop_and_resize_masks_against_numpy():
  rng = np.random.default_rng(3)
  h, w, m = 23, 31, 7
  masks = (rng.random((6, h, w)) < 0.5).astype(np.uint8)
  x1 = rng.uniform(-0.4, w - 3, 6)
  y1 = rng.uniform(-0.4, h - 3, 6)
  boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(1, 20, 6), w),
                    np.minimum(y1 + rng.uniform(1, 20, 6), h)], -1).astype(np.float32)
  boxes[0] = [0, 0, w, h]   # touches every border
  got = transforms.crop_and_resize_masks(masks, boxes, m).numpy()
  assert got.shape == (6, m, m) and got.dtype == np.uint8
  for i in range(6):
    ref = _reference_mask_crop(masks[i], boxes[i].astype(np.float64), m)
    decided = np.abs(ref - 0.5) > 1e-4
    np.testing.assert_array_equal(got[i][decided], (ref >= 0.5)[decided])


def test_crop_and_resize_rectangle_mask_is_all_ones():
  box = np.array([[5, 7, 35, 27]], np.float32)   # 30 x 20, larger than M
  masks = _rect_mask(40, 50, box[0])[None]
  np.testing.assert_array_equal(transforms.crop_and_resize_masks(masks, box, 8).numpy(), 1)
  # Left half of the box only: left half of the crop.
  half = _rect_mask(40, 50, (5, 7, 20, 27))[None]
  got = transforms.crop_and_resize_masks(half, box, 8).numpy()[0]
  np.testing.assert_array_equal(got[:, :4], 1)
  np.testing.assert_array_equal(got[:, 4:], 0)
  # A box on the image border, mask up to the border.
  edge = np.array([[0, 0, 12, 10]], np.float32)
  got = transforms.crop_and_resize_masks(_rect_mask(10, 12, edge[0])[None], edge, 4)
  np.testing.assert_array_equal(got.numpy(), 1)
  assert transforms.crop_and_resize_masks(
      np.zeros((0, 10, 12), np.uint8), np.zeros((0, 4), np.float32), 4).shape == (0, 4, 4)


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_train_masks_follow_flip_and_crop(seed):
  # Each mask is exactly its box, so whatever the flip / scale / crop, each final mask
  # (the mask cropped to the final box) is all ones.
  h, w = 48, 64
  boxes = np.array([[2, 3, 30, 40], [35, 10, 62, 46], [10, 30, 50, 47]], np.float32)
  masks = np.stack([_rect_mask(h, w, b) for b in boxes])
  image = np.zeros((h, w, 3), np.uint8)
  cfg = _cfg(with_masks=True, mask_size=4, aug_scale_min=1.0, aug_scale_max=2.0)
  out = _numpy(transforms.train_preprocess(
      _example(image, boxes, masks=masks), tf.constant([seed, 5]), cfg))
  assert out['masks'].shape == (len(out['boxes']), 4, 4)
  original = transforms.input_to_original(out['boxes'], out['scale'], out['offset']).numpy()
  big = np.all(original[:, 2:] - original[:, :2] >= 2.0, axis=1)   # not a thin sliver
  assert big.any()
  np.testing.assert_array_equal(out['masks'][big], 1)


def test_stateless_randomness():
  image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  cfg = _cfg()
  a = _numpy(transforms.train_preprocess(_example(image, [[1, 2, 30, 30]]),
                                         tf.constant([4, 2]), cfg))
  b = _numpy(transforms.train_preprocess(_example(image, [[1, 2, 30, 30]]),
                                         tf.constant([4, 2]), cfg))
  c = _numpy(transforms.train_preprocess(_example(image, [[1, 2, 30, 30]]),
                                         tf.constant([4, 3]), cfg))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['image'], c['image'])


# ------------------------------------------------------------- DETR's short-side geometry


def _short_cfg(image_size=128, short_sides=(48, 64), eval_short_side=64, max_size=96,
               crop_probability=0.0, crop=None):
  cfg = _cfg(image_size=image_size, resize='short_side', short_sides=short_sides,
             eval_short_side=eval_short_side, max_size=max_size, aug_flip=False)
  cfg.random_size_crop.update(probability=crop_probability, **(crop or {}))
  return cfg


def test_short_side_eval_geometry():
  # 60 x 80 (h x w): short side to 64 -> 64 x 85.33, rounded to 64 x 85.
  image = np.full((60, 80, 3), 200, np.uint8)
  out = _numpy(transforms.eval_preprocess(_example(image, [[8, 6, 40, 30]]), _short_cfg()))
  assert out['image'].shape == (128, 128, 3)
  np.testing.assert_array_equal(out['valid_size'], [64, 85])
  np.testing.assert_allclose(out['scale'], [64 / 60, 85 / 80], rtol=1e-6)
  np.testing.assert_array_equal(out['offset'], [0, 0])
  assert np.all(out['image'][:64, :85] != 0) and np.all(out['image'][64:] == 0)
  assert np.all(out['image'][:, 85:] == 0)
  np.testing.assert_allclose(out['boxes'][0], [8 * 85 / 80, 6.4, 40 * 85 / 80, 32],
                             rtol=1e-5)


@pytest.mark.parametrize('hw, want', [
    ((20, 80), (24, 96)),      # short side 64 would make the long side 256 > max_size 96
    ((100, 300), (32, 96)),    # shrinks as well
])
def test_short_side_long_side_capped(hw, want):
  image = np.zeros(hw + (3,), np.uint8)
  out = _numpy(transforms.eval_preprocess(_example(image, []), _short_cfg()))
  np.testing.assert_allclose(out['scale'], np.array(want) / np.array(hw), rtol=1e-6)


def test_short_side_eval_never_crops_to_the_canvas():
  # Short side 64 on a 1:4 image asks for 256 px; max_size 300 allows it; the 128 canvas
  # does not, so eval shrinks the image to fit rather than cut content.
  image = np.zeros((40, 160, 3), np.uint8)
  cfg = _short_cfg(max_size=300)
  out = _numpy(transforms.eval_preprocess(_example(image, [[150, 0, 160, 40]]), cfg))
  np.testing.assert_allclose(out['scale'], [32 / 40, 128 / 160])
  np.testing.assert_allclose(out['boxes'][0], [120, 0, 128, 32], rtol=1e-6)


def test_short_side_train_draws_from_the_list():
  image = np.zeros((60, 90, 3), np.uint8)
  cfg = _short_cfg(short_sides=(30, 45, 60), max_size=1000)
  shorts = set()
  for s in range(24):
    out = _numpy(transforms.train_preprocess(_example(image, []), tf.constant([s, 3]), cfg))
    shorts.add(round(float(out['scale'][0]) * 60))
    np.testing.assert_array_equal(out['offset'], [0, 0])    # fits the canvas: no crop
  assert shorts == {30, 45, 60}


@pytest.mark.parametrize('crop_probability', [0.0, 0.5, 1.0])
def test_short_side_train_boxes_follow_the_pixels(crop_probability):
  # A white rectangle on black through the random-size crop, the resize and the canvas
  # crop: its box must land where its pixels land, and map back exactly when unclipped.
  box = np.array([30, 40, 70, 64], np.float32)
  image = np.repeat(_rect_mask(100, 120, box)[..., None] * 255, 3, axis=-1)
  cfg = _short_cfg(image_size=96, short_sides=(64, 80, 96), max_size=200,
                   crop_probability=crop_probability,
                   crop=dict(resize_sides=(80, 100), min_size=40, max_size=70))
  cropped = 0
  for s in range(16):
    out = _numpy(transforms.train_preprocess(_example(image, box), tf.constant([s, 5]), cfg))
    sy, sx = out['scale']
    oy, ox = out['offset']
    want = box * [sx, sy, sx, sy] - [ox, oy, ox, oy]
    if crop_probability == 0:
      assert sy == pytest.approx(sx, rel=0.02)
    content = out['image'][..., 0] != 0
    content_hw = [content.any(1).sum(), content.any(0).sum()]
    np.testing.assert_array_equal(out['valid_size'], content_hw)
    clipped = np.clip(want, 0, content_hw[::-1] * 2)
    cropped += not np.allclose(clipped, want)
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
      continue
    np.testing.assert_allclose(out['boxes'][0], clipped, atol=1e-3)
    np.testing.assert_allclose(_bright_box(out['image']), clipped, atol=1.0)
    if np.allclose(clipped, want):
      back = transforms.input_to_original(out['boxes'], out['scale'], out['offset'])
      np.testing.assert_allclose(back.numpy()[0], box, atol=1e-3)
  if crop_probability == 1.0:
    assert cropped > 0


def test_random_size_crop_window():
  # 800 x 800, viewed at 400, window 384 x 384 there = 768 x 768 original pixels, then
  # short side 480: scale 480 / 768, the window's corner within 32 original pixels.
  image = np.zeros((800, 800, 3), np.uint8)
  cfg = _short_cfg(image_size=480, short_sides=(480,), max_size=1333, crop_probability=1.0,
                   crop=dict(resize_sides=(400,), min_size=384, max_size=384))
  corners = set()
  for s in range(6):
    out = _numpy(transforms.train_preprocess(_example(image, []), tf.constant([s, 7]), cfg))
    np.testing.assert_allclose(out['scale'], [0.625, 0.625])
    assert np.all(0 <= out['offset']) and np.all(out['offset'] <= 32 * 0.625)
    corners.add(tuple(out['offset']))
  assert len(corners) > 1


@pytest.mark.parametrize('update, match', [
    (dict(resize='shortest'), 'data.resize'),
    (dict(resize='short_side', short_sides=()), 'short_sides'),
    (dict(resize='short_side', max_size=0), 'max_size'),
    (dict(aug_scale_min=0.0), 'aug_scale_min'),
])
def test_bad_geometry_config_is_named(update, match):
  cfg = _cfg(**update)
  with pytest.raises(ValueError, match=match):
    transforms.eval_preprocess(_example(np.zeros((8, 8, 3), np.uint8), []), cfg)


def test_bad_random_size_crop_is_named():
  cfg = _short_cfg(crop_probability=1.5)
  with pytest.raises(ValueError, match='probability'):
    transforms.train_preprocess(_example(np.zeros((8, 8, 3), np.uint8), []),
                                tf.constant([0, 0]), cfg)
