"""Tests for jaxdet.data.shapes: the synthetic dataset's builder, examples and COCO json."""

import hashlib
import os

import numpy as np
from pycocotools import mask as mask_lib
import pytest

from configs import common
from jaxdet.data import shapes

SIZE = 128


def _config(data_dir, with_masks=True):
  cfg = common.data_config('shapes', image_size=SIZE)
  cfg.data_dir = str(data_dir)
  cfg.with_masks = with_masks
  cfg.shapes.num_train = 16
  cfg.shapes.num_validation = 8
  cfg.shapes.image_size = SIZE
  cfg.shapes.seed = 3
  return cfg


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  cfg = _config(tmp_path_factory.mktemp('shapes'))
  shapes.builder(cfg)  # prepares once for the module
  return cfg


@pytest.fixture(scope='module')
def validation(cfg):
  return list(shapes.dataset(cfg, 'validation').as_numpy_iterator())


def _files(builder):
  """Digest of every record and json file of a prepared variant."""
  out = {}
  for name in sorted(os.listdir(builder.data_dir)):
    if 'tfrecord' in name or name.endswith('.json') and name.startswith('instances'):
      with open(os.path.join(builder.data_dir, name), 'rb') as f:
        out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_canonical_examples(cfg, validation):
  assert shapes.num_examples(cfg, 'validation') == 8 == len(validation)
  assert shapes.num_examples(cfg, 'train') == 16
  for ex in validation:
    assert set(ex) == {'image', 'image_id', 'boxes', 'classes', 'is_crowd', 'masks'}
    n = len(ex['classes'])
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (SIZE, SIZE, 3)
    assert ex['image_id'].dtype == np.int64 and ex['image_id'].shape == ()
    assert ex['boxes'].dtype == np.float32 and ex['boxes'].shape == (n, 4)
    assert ex['classes'].dtype == np.int32 and ex['is_crowd'].dtype == bool
    assert ex['masks'].dtype == np.uint8 and ex['masks'].shape == (n, SIZE, SIZE)
    assert n <= shapes.MAX_OBJECTS and not ex['is_crowd'].any()
    assert np.all((ex['classes'] >= 0) & (ex['classes'] < len(shapes.CLASS_NAMES)))
  # Record order is generation order.
  assert [int(ex['image_id']) for ex in validation] == list(range(1, 9))
  # Without masks the instance maps are never decoded and no 'masks' key appears.
  no_masks = _config(cfg.data_dir, with_masks=False)
  ex = next(shapes.dataset(no_masks, 'validation').as_numpy_iterator())
  assert 'masks' not in ex
  np.testing.assert_array_equal(ex['boxes'], validation[0]['boxes'])


def test_masks_match_boxes(validation):
  for ex in validation:
    masks = ex['masks']
    assert set(np.unique(masks)) <= {0, 1}
    assert masks.sum(0).max(initial=0) <= 1  # visible parts are disjoint
    for mask, box in zip(masks, ex['boxes']):
      assert mask.sum() >= shapes.MIN_VISIBLE_PIXELS
      rows, cols = np.nonzero(mask)
      tight = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
      np.testing.assert_array_equal(box, tight)


def test_coco_json_matches_dataset(cfg, validation):
  gt = shapes.ground_truth(cfg, 'validation')
  assert sorted(gt.getImgIds()) == [int(ex['image_id']) for ex in validation]
  assert sorted(gt.getCatIds()) == shapes.category_ids(cfg) == [1, 2, 3, 4, 5, 6]
  assert [gt.cats[i]['name'] for i in shapes.category_ids(cfg)] == shapes.class_names(cfg)
  for ex in validation:
    info = gt.imgs[int(ex['image_id'])]
    assert (info['height'], info['width']) == (SIZE, SIZE)
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[int(ex['image_id'])]))
    assert len(anns) == len(ex['classes'])
    for ann, box, cls, mask in zip(anns, ex['boxes'], ex['classes'], ex['masks']):
      x1, y1, x2, y2 = box
      np.testing.assert_allclose(ann['bbox'], [x1, y1, x2 - x1, y2 - y1])
      assert ann['category_id'] == shapes.category_ids(cfg)[cls]
      assert ann['iscrowd'] == 0 and ann['area'] == mask.sum()
      np.testing.assert_array_equal(gt.annToMask(ann), mask)
      assert mask_lib.area(gt.annToRLE(ann)) == mask.sum()


def test_same_seed_same_bytes(cfg, tmp_path):
  again = shapes.builder(_config(tmp_path))
  first = _files(shapes.builder(cfg))
  assert len(first) == 4  # train + validation records, two json files
  assert _files(again) == first


def test_render_is_deterministic_and_seed_dependent():
  a = shapes.render(96, 0, 'train', 5)
  b = shapes.render(96, 0, 'train', 5)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], shapes.render(96, 1, 'train', 5)['image'])
  assert not np.array_equal(a['image'], shapes.render(96, 0, 'validation', 5)['image'])


def test_sizes_cover_coco_ranges_at_256():
  """COCO small (< 32²), medium and large (> 96²) areas all occur, and some empty images."""
  areas, counts, labels = [], [], []
  for index in range(60):
    drawn = shapes.render(256, 0, 'validation', index)
    boxes = drawn['boxes']
    areas.append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    counts.append(len(boxes))
    labels.append(drawn['labels'])
    # The instance map and the boxes tell the same story.
    for i, box in enumerate(boxes):
      rows, cols = np.nonzero(drawn['instance_map'] == i + 1)
      np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    assert drawn['instance_map'].max() == len(boxes)
  areas = np.concatenate(areas)
  assert (areas < 32**2).mean() > 0.2
  assert (areas > 96**2).mean() > 0.05
  assert ((areas >= 32**2) & (areas <= 96**2)).mean() > 0.2
  assert areas.min() >= 36  # no 2-px fragments
  assert 0 in counts and max(counts) <= shapes.MAX_OBJECTS
  assert set(np.concatenate(labels)) == set(range(len(shapes.CLASS_NAMES)))


def test_simple_style_is_few_larger_objects_on_smooth_backgrounds():
  counts, areas = [], []
  for index in range(40):
    simple = shapes.render(128, 0, 'validation', index, 'simple')
    counts.append(len(simple['boxes']))
    boxes = simple['boxes']
    areas.extend((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  assert max(counts) <= shapes.STYLES['simple']['max_objects']
  # Without textures or clutter the background is a smooth colour field: neighbouring pixels
  # differ by a fraction of a grey level (the standard style's stripes and checks do not).
  roughness = [np.abs(np.diff(shapes._background(np.random.default_rng(i), 128, False, False),
                              axis=1)).mean() for i in range(10)]
  textured = [np.abs(np.diff(shapes._background(np.random.default_rng(i), 128), axis=1)).mean()
              for i in range(10)]
  assert max(roughness) < 1.5 and max(textured) > 3
  assert min(areas) >= 100 and np.mean(counts) > 1.5
  with pytest.raises(ValueError, match='style'):
    shapes.render(64, 0, 'train', 0, 'hard')


def test_standard_style_is_the_default_rendering():
  a, b = shapes.render(64, 3, 'train', 2), shapes.render(64, 3, 'train', 2, 'standard')
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], shapes.render(64, 3, 'train', 2, 'simple')['image'])


def test_shards_partition_the_split(cfg):
  ids = []
  for index in range(3):
    shard = list(shapes.dataset(cfg, 'train', shard_index=index, shard_count=3)
                 .as_numpy_iterator())
    assert len(shard) == shapes.num_examples(cfg, 'train', shard_index=index, shard_count=3)
    ids += [int(ex['image_id']) for ex in shard]
  assert ids == list(range(1, 17))
