"""Tests of jaxdet/data/pipeline.py: the data contract, order, resumption, bad input."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import common
from jaxdet.data import pipeline

N = 4      # max_instances in these tests
M = 4      # mask_size


def _cfg(**overrides):
  cfg = common.data_config('shapes', image_size=64)
  cfg.size_divisor = 32
  cfg.max_instances = N
  cfg.mask_size = M
  cfg.shuffle_buffer = 100
  cfg.update(overrides)
  return cfg


def _examples(count, *, seed=0, with_masks=False, num_objects=None):
  """`count` random canonical examples (image ids 0..count-1) of varying size."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    h, w = int(rng.integers(24, 80)), int(rng.integers(24, 80))
    k = int(rng.integers(0, 4)) if num_objects is None else num_objects
    x1, y1 = rng.uniform(0, w - 8, k), rng.uniform(0, h - 8, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(6, 20, k), y1 + rng.uniform(6, 20, k)], -1)
    ex = {'image': rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
          'image_id': np.int64(i),
          'boxes': np.clip(boxes, 0, [w, h, w, h]).astype(np.float32).reshape(k, 4),
          'classes': rng.integers(0, 3, k).astype(np.int32),
          'is_crowd': np.zeros(k, bool)}
    if with_masks:
      ex['masks'] = (rng.random((k, h, w)) < 0.5).astype(np.uint8)
    out.append(ex)
  return out


def _dataset(examples):
  """The canonical examples as a tf.data.Dataset, as a source module returns them."""
  signature = {'image': tf.TensorSpec([None, None, 3], tf.uint8),
               'image_id': tf.TensorSpec([], tf.int64),
               'boxes': tf.TensorSpec([None, 4], tf.float32),
               'classes': tf.TensorSpec([None], tf.int32),
               'is_crowd': tf.TensorSpec([None], tf.bool)}
  if 'masks' in examples[0]:
    signature['masks'] = tf.TensorSpec([None, None, None], tf.uint8)
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
  return ds.apply(tf.data.experimental.assert_cardinality(len(examples)))


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _check_contract(batch, batch_size, with_masks):
  canvas = 64
  want = {'image': (np.float32, (batch_size, canvas, canvas, 3)),
          'image_id': (np.int64, (batch_size,)),
          'orig_size': (np.int32, (batch_size, 2)),
          'scale': (np.float32, (batch_size, 2)),
          'offset': (np.float32, (batch_size, 2)),
          'valid_size': (np.float32, (batch_size, 2)),
          'boxes': (np.float32, (batch_size, N, 4)),
          'classes': (np.int32, (batch_size, N)),
          'is_crowd': (np.bool_, (batch_size, N))}
  if with_masks:
    want['masks'] = (np.uint8, (batch_size, N, M, M))
  assert set(batch) == set(want)
  for key, (dtype, shape) in want.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape == shape, key
  padding = batch['classes'] < 0
  np.testing.assert_array_equal(batch['boxes'][padding], 0)
  assert not batch['is_crowd'][padding].any()
  if with_masks:
    np.testing.assert_array_equal(batch['masks'][padding], 0)
  # Valid boxes are non-empty and inside the canvas.
  valid = batch['boxes'][~padding]
  assert np.all(valid[:, 2:] > valid[:, :2]) and np.all(valid >= 0) and np.all(valid <= canvas)


def test_contract():
  # Train without masks and eval with masks here; the other combinations are checked
  # in the tests below.
  examples = _examples(6, with_masks=True)
  train = next(pipeline.train_iterator(_cfg(), batch_size=3, seed=0,
                                       source_dataset=_dataset(examples)))
  _check_contract(train, 3, with_masks=False)
  evals = list(pipeline.eval_iterator(_cfg(with_masks=True), batch_size=4,
                                      source_dataset=_dataset(examples)))
  for batch in evals:
    _check_contract(batch, 4, with_masks=True)
  np.testing.assert_array_equal(evals[0]['offset'], 0)


def test_eval_order_and_padding_of_the_last_batch():
  cfg = _cfg()
  examples = _examples(10)
  batches = list(pipeline.eval_iterator(cfg, batch_size=4, source_dataset=_dataset(examples)))
  for batch in batches:
    _check_contract(batch, 4, with_masks=False)
  assert len(batches) == 3 == pipeline.num_eval_batches(
      cfg, batch_size=4, source_dataset=_dataset(examples))
  ids = np.concatenate([b['image_id'] for b in batches])
  np.testing.assert_array_equal(ids, list(range(10)) + [-1, -1])
  last = batches[-1]
  np.testing.assert_array_equal(last['image'][2:], 0)
  np.testing.assert_array_equal(last['classes'][2:], -1)
  np.testing.assert_array_equal(last['boxes'][2:], 0)
  # Real examples carry their original size and the eval scale (long side -> 64).
  for i, ex in enumerate(examples[:4]):
    h, w = ex['image'].shape[:2]
    np.testing.assert_array_equal(batches[0]['orig_size'][i], [h, w])
    np.testing.assert_allclose(batches[0]['scale'][i], np.round(np.array([h, w]) *
                                                                64 / max(h, w)) / [h, w])


def test_eval_limit_and_shards_run_the_same_number_of_batches():
  source = _dataset(_examples(9))
  cfg = _cfg(num_eval_images=5)
  ids = np.concatenate([b['image_id'] for b in pipeline.eval_iterator(
      cfg, batch_size=4, source_dataset=source)])
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, -1, -1, -1])
  # 9 images over 2 processes: 5 and 4, batches of 2 -> both yield 3 batches.
  cfg = _cfg()
  shards = [list(pipeline.eval_iterator(cfg, batch_size=2, shard_index=k, shard_count=2,
                                        source_dataset=source)) for k in range(2)]
  assert [len(s) for s in shards] == [3, 3]
  ids = [np.concatenate([b['image_id'] for b in s]) for s in shards]
  np.testing.assert_array_equal(ids[0], [0, 2, 4, 6, 8, -1])
  np.testing.assert_array_equal(ids[1], [1, 3, 5, 7, -1, -1])
  np.testing.assert_array_equal(shards[1][-1]['classes'], -1)


def test_train_epochs_are_permutations_in_a_new_order():
  cfg = _cfg()
  it = pipeline.train_iterator(cfg, batch_size=4, seed=0, source_dataset=_dataset(
      _examples(12)))
  epochs = [np.concatenate([b['image_id'] for b in _take(it, 3)]) for _ in range(3)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(12))


def test_train_determinism_and_resume():
  # 10 examples, batches of 3: step 5 starts at position 15, inside the second epoch.
  cfg = _cfg(with_masks=True)
  source = _dataset(_examples(10, with_masks=True))

  def batches(count, seed=3, start_step=0):
    return _take(pipeline.train_iterator(cfg, batch_size=3, seed=seed, start_step=start_step,
                                         source_dataset=source), count)

  fresh = batches(8)
  for batch in fresh:
    _check_contract(batch, 3, with_masks=True)
  _assert_batches_equal(batches(3), fresh[:3])
  for start_step in (1, 5):
    _assert_batches_equal(batches(3, start_step=start_step),
                          fresh[start_step:start_step + 3])
  other = batches(3, seed=4)
  assert not all(np.array_equal(x['image_id'], y['image_id']) for x, y in zip(fresh, other))
  assert not any(np.array_equal(x['image'], y['image']) for x, y in zip(fresh, other))


def test_train_shards_partition_the_data():
  source = _dataset(_examples(12))
  cfg = _cfg()
  seen = []
  for k in range(2):
    it = pipeline.train_iterator(cfg, batch_size=3, seed=0, shard_index=k, shard_count=2,
                                 source_dataset=source)
    seen.append(np.concatenate([b['image_id'] for b in _take(it, 2)]))   # one epoch
  assert len(set(seen[0])) == 6 and len(set(seen[1])) == 6
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(12))


def test_crowd_removed_in_train_kept_in_eval():
  examples = _examples(4, num_objects=3)
  for ex in examples:
    ex['boxes'] = np.array([[2, 2, 20, 20], [4, 4, 22, 22], [1, 1, 23, 23]], np.float32)
    ex['is_crowd'] = np.array([False, True, False])
  source = _dataset(examples)
  cfg = _cfg(aug_scale_min=1.0, aug_scale_max=1.0)
  train = next(pipeline.train_iterator(cfg, batch_size=4, seed=0, source_dataset=source))
  assert not train['is_crowd'].any()
  np.testing.assert_array_equal((train['classes'] >= 0).sum(1), 2)
  batch = next(pipeline.eval_iterator(cfg, batch_size=4, source_dataset=source))
  np.testing.assert_array_equal(batch['is_crowd'][:, :3], [[False, True, False]] * 4)


def test_too_many_objects_truncated_with_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(pipeline, '_truncation_warned', False)
  source = _dataset(_examples(6, num_objects=7))
  cfg = _cfg()
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.eval_iterator(cfg, batch_size=2, source_dataset=source))
    _take(pipeline.train_iterator(cfg, batch_size=2, seed=0, source_dataset=source), 3)
  warnings = [r for r in caplog.records if 'max_instances' in r.getMessage()]
  assert len(warnings) == 1
  assert 'has 7 objects' in warnings[0].getMessage()
  for batch in batches:
    assert batch['boxes'].shape == (2, N, 4)
    assert np.all(batch['classes'] >= 0)   # the first N kept, no padding


def test_bad_boxes_are_clipped_or_dropped():
  image = np.zeros((32, 64, 3), np.uint8)
  boxes = np.array([
      [np.nan, 1, 5, 5],        # NaN: dropped
      [10, 10, 10, 20],         # zero width: dropped
      [30, 5, 20, 15],          # negative width: dropped
      [70, 2, 90, 20],          # outside: dropped
      [-8, -4, 16, 8],          # partly outside: clipped to (0, 0, 16, 8)
      [50, 20, np.inf, 30],     # inf: dropped
  ], np.float32)
  ex = {'image': image, 'image_id': np.int64(3), 'boxes': boxes,
        'classes': np.arange(6, dtype=np.int32), 'is_crowd': np.zeros(6, bool)}
  cfg = _cfg(max_instances=8)
  batch = next(pipeline.eval_iterator(cfg, batch_size=1, source_dataset=_dataset([ex])))
  np.testing.assert_array_equal(batch['classes'][0], [4] + [-1] * 7)
  np.testing.assert_allclose(batch['boxes'][0, 0], [0, 0, 16, 8])   # scale 1 (64 px)
  train = next(pipeline.train_iterator(cfg, batch_size=1, seed=0,
                                       source_dataset=_dataset([ex])))
  assert np.all(np.isfinite(train['boxes']))
  assert set(train['classes'][0]) <= {4, -1}


def test_images_without_objects_are_kept():
  examples = _examples(5, num_objects=0, with_masks=True)
  cfg = _cfg(with_masks=True)
  source = _dataset(examples)
  train = next(pipeline.train_iterator(cfg, batch_size=5, seed=0, source_dataset=source))
  assert sorted(train['image_id']) == list(range(5))
  np.testing.assert_array_equal(train['classes'], -1)
  np.testing.assert_array_equal(train['boxes'], 0)
  np.testing.assert_array_equal(train['masks'], 0)
  batch = next(pipeline.eval_iterator(cfg, batch_size=5, source_dataset=source))
  np.testing.assert_array_equal(batch['image_id'], range(5))
  np.testing.assert_array_equal(batch['classes'], -1)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="'coco'.*'coco_json'.*'shapes'"):
    pipeline.num_classes(_cfg(name='imagenet'))
  with pytest.raises(ValueError, match='imagenet'):
    next(pipeline.train_iterator(_cfg(name='imagenet'), batch_size=1, seed=0))
  with pytest.raises(ValueError, match='valid names'):
    pipeline.check_available(_cfg(name='imagenet'), 'train')


def test_preprocess_image_matches_eval():
  cfg = _cfg(with_masks=True)
  examples = _examples(1, with_masks=True)
  batch = next(pipeline.eval_iterator(cfg, batch_size=1, source_dataset=_dataset(examples)))
  single = pipeline.preprocess_image(examples[0]['image'], cfg)
  assert single.keys() == batch.keys()
  for k in single:
    assert single[k].shape == batch[k].shape and single[k].dtype == batch[k].dtype, k
  for k in ('image', 'orig_size', 'scale', 'offset'):
    np.testing.assert_allclose(single[k], batch[k], atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(single['classes'], -1)
  with pytest.raises(ValueError, match='uint8'):
    pipeline.preprocess_image(np.zeros((8, 8), np.float32), cfg)


def test_load_image_conversions(tmp_path, caplog):
  rgb = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)

  def save(name, img, **kw):
    path = os.fspath(tmp_path / name)
    img.save(path, **kw)
    return path

  got = pipeline.load_image(save('rgb.png', Image.fromarray(rgb)))
  np.testing.assert_array_equal(got, rgb)
  gray = rgb[..., 0]
  got = pipeline.load_image(save('gray.png', Image.fromarray(gray, 'L')))
  np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((6, 10, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(
      pipeline.load_image(save('rgba.png', Image.fromarray(rgba, 'RGBA'))), rgb)
  palette = Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
  got = pipeline.load_image(save('palette.png', palette))
  np.testing.assert_array_equal(got, np.asarray(palette.convert('RGB')))
  cmyk = Image.fromarray(rgb).convert('CMYK')
  got = pipeline.load_image(save('cmyk.tif', cmyk))
  assert got.shape == (6, 10, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(cmyk.convert('RGB')))
  deep = (gray.astype(np.uint16) * 257)
  got = pipeline.load_image(save('deep.png', Image.fromarray(deep)))
  np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, -1))

  # EXIF orientation 6: stored landscape, shown rotated 90 degrees clockwise.
  exif = Image.Exif()
  exif[0x0112] = 6
  got = pipeline.load_image(save('rotated.png', Image.fromarray(rgb), exif=exif))
  np.testing.assert_array_equal(got, np.rot90(rgb, k=-1))

  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'\xff\xd8\xff\xe0 this is not an image')
  with caplog.at_level(logging.WARNING):
    assert pipeline.load_image(bad) is None
  assert any('broken.jpg' in r.getMessage() for r in caplog.records)


def test_shapes_integration(tmp_path):
  pytest.importorskip('jaxdet.data.shapes')
  cfg = common.data_config('shapes', image_size=128)
  cfg.data_dir = os.fspath(tmp_path)
  cfg.shapes.update(num_train=16, num_validation=8, image_size=128)
  cfg.with_masks = True
  cfg.mask_size = 8
  cfg.max_instances = 12
  assert pipeline.num_classes(cfg) == 6
  assert pipeline.check_available(cfg, 'train') == 16
  assert len(pipeline.class_names(cfg)) == 6
  batches = _take(pipeline.train_iterator(cfg, batch_size=4, seed=0), 5)   # past an epoch
  batch = batches[0]
  assert batch['image'].shape == (4, 128, 128, 3)
  assert batch['masks'].shape == (4, 12, 8, 8)
  valid = batch['classes'] >= 0
  assert valid.any() and np.all(batch['classes'][valid] < 6)
  assert batch['masks'][valid].mean() > 0.3   # masks cropped to their boxes are mostly on
  evals = list(pipeline.eval_iterator(cfg, batch_size=3))
  ids = np.concatenate([b['image_id'] for b in evals])
  gt = pipeline.ground_truth(cfg, cfg.eval_split)
  assert sorted(ids[ids >= 0]) == sorted(gt.getImgIds()) and (ids < 0).sum() == 1
  counts = [len(gt.getAnnIds(imgIds=[int(i)])) for i in evals[0]['image_id']]
  np.testing.assert_array_equal((evals[0]['classes'] >= 0).sum(1), counts)
