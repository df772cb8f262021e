"""Tests for jaxdet.data.coco: label maps, the 'coco_json' reader and its bad-input handling."""

import json
import logging

import numpy as np
from PIL import Image
from pycocotools import mask as mask_lib
import pytest

from configs import common
from jaxdet.data import coco

H, W = 30, 40
CATEGORIES = [dict(id=18, name='dog'), dict(id=1, name='person'), dict(id=7, name='train')]


def _pattern(height=H, width=W):
  """A deterministic RGB image: red ramp along x, green along y, blue constant."""
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                   np.full_like(x, 90)], -1).astype(np.uint8)


def _uncompressed_rle(mask):
  """Brute-force COCO uncompressed RLE: run lengths in column-major order, zeros first."""
  flat = mask.flatten(order='F')
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  return {'counts': counts, 'size': list(mask.shape)}


def _exif_jpeg(path, pixels, orientation):
  image = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = orientation
  image.save(path, quality=95, exif=exif.tobytes())


CROWD = np.zeros((H, W), np.uint8)
CROWD[3:9, 20:31] = 1


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """A COCO-format folder whose images exercise every decoding path."""
  root = tmp_path_factory.mktemp('coco_json')
  images = root / 'images'
  images.mkdir()
  rgb = _pattern()
  Image.fromarray(rgb).save(images / 'rgb.png')
  Image.fromarray(rgb[..., 1]).save(images / 'gray.png')
  Image.fromarray(np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], -1)).save(
      images / 'rgba.png')
  Image.fromarray(rgb).quantize(colors=256).save(images / 'palette.png', transparency=0)
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(images / 'gray16.png')
  Image.fromarray(rgb).convert('CMYK').save(images / 'cmyk.jpg', quality=95)
  # Stored 40 wide x 30 high; orientation 6 = displayed rotated 90° clockwise, 30 x 40.
  _exif_jpeg(images / 'exif.jpg', rgb, 6)
  _exif_jpeg(images / 'exif_stored_grid.jpg', rgb, 6)
  (images / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  # The files really are in the modes under test.
  modes = {f: Image.open(images / f).mode for f in ('gray.png', 'rgba.png', 'palette.png',
                                                     'gray16.png', 'cmyk.jpg')}
  assert modes == {'gray.png': 'L', 'rgba.png': 'RGBA', 'palette.png': 'P',
                   'gray16.png': 'I;16', 'cmyk.jpg': 'CMYK'}
  assert Image.open(images / 'exif.jpg').getexif()[0x0112] == 6
  files = [('rgb.png', W, H), ('gray.png', W, H), ('rgba.png', W, H), ('palette.png', W, H),
           ('gray16.png', W, H), ('cmyk.jpg', W, H), ('exif.jpg', H, W),
           ('exif_stored_grid.jpg', W, H), ('corrupt.jpg', W, H), ('missing.png', W, H)]
  image_entries = [dict(id=100 + i, file_name=f, width=w, height=h)
                   for i, (f, w, h) in enumerate(files)]
  annotations = [
      dict(id=1, image_id=100, category_id=18, bbox=[5.5, 6.0, 10.0, 8.25], iscrowd=0,
           area=80.0, segmentation=[[5, 6, 15, 6, 15, 14, 5, 14]]),
      dict(id=2, image_id=100, category_id=1, bbox=[20.0, 3.0, 11.0, 6.0], iscrowd=1,
           area=66.0, segmentation=_uncompressed_rle(CROWD)),
      dict(id=3, image_id=100, category_id=99, bbox=[1.0, 1.0, 2.0, 2.0], iscrowd=0,
           area=4.0, segmentation=[[1, 1, 3, 1, 3, 3, 1, 3]]),
      dict(id=4, image_id=106, category_id=7, bbox=[2.0, 4.0, 6.0, 10.0], iscrowd=0,
           area=60.0, segmentation=[[2, 4, 8, 4, 8, 14, 2, 14]]),
  ]
  path = root / 'instances.json'
  path.write_text(json.dumps(dict(images=image_entries, annotations=annotations,
                                  categories=CATEGORIES)))
  return dict(annotations=str(path), images=str(images), rgb=rgb)


def _config(folder, with_masks=False):
  cfg = common.data_config('coco_json')
  cfg.with_masks = with_masks
  for split in ('train', 'validation'):
    cfg.coco_json[f'{split}_annotations'] = folder['annotations']
    cfg.coco_json[f'{split}_images'] = folder['images']
  return cfg


def _read(cfg, split='validation', **kwargs):
  return {int(ex['image_id']): ex
          for ex in coco.dataset(cfg, split, **kwargs).as_numpy_iterator()}


def test_coco_label_map():
  assert len(coco.COCO_CATEGORY_IDS) == len(coco.COCO_CLASS_NAMES) == 80
  assert list(coco.COCO_CATEGORY_IDS) == sorted(set(coco.COCO_CATEGORY_IDS))
  missing = sorted(set(range(1, 91)) - set(coco.COCO_CATEGORY_IDS))
  assert missing == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
  cfg = common.data_config('coco')
  assert coco.category_ids(cfg)[0] == 1 and coco.category_ids(cfg)[-1] == 90
  names = dict(zip(coco.category_ids(cfg), coco.class_names(cfg)))
  known = {1: 'person', 18: 'dog', 44: 'bottle', 62: 'chair', 72: 'tv', 85: 'clock',
           90: 'toothbrush'}
  assert {i: names[i] for i in known} == known


def test_tfds_example_conversion():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  example = {
      'image': tf.zeros([20, 40, 3], tf.uint8),
      'image/id': tf.constant(139, tf.int64),
      'objects': {
          'bbox': tf.constant([[0.1, 0.25, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5]], tf.float32),
          'label': tf.constant([0, 79], tf.int64),
          'is_crowd': tf.constant([False, True]),
      },
  }
  out = {k: v.numpy() for k, v in coco._from_tfds(example).items()}  # pylint: disable=protected-access
  np.testing.assert_allclose(out['boxes'], [[10, 2, 40, 10], [0, 0, 20, 20]], atol=1e-5)
  assert out['boxes'].dtype == np.float32 and out['classes'].dtype == np.int32
  np.testing.assert_array_equal(out['classes'], [0, 79])
  np.testing.assert_array_equal(out['is_crowd'], [False, True])
  assert out['image_id'] == 139 and out['image'].shape == (20, 40, 3)


def test_contiguous_ids_boxes_and_crowd(folder, caplog):
  cfg = _config(folder)
  assert coco.category_ids(cfg) == [1, 7, 18]  # sorted ids, whatever the json's order
  assert coco.class_names(cfg) == ['person', 'train', 'dog']
  with caplog.at_level(logging.WARNING):
    examples = _read(cfg)
  assert 'category ids [99]' in caplog.text  # the unknown category is dropped, loudly
  ex = examples[100]
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (H, W, 3)
  np.testing.assert_array_equal(ex['image'], folder['rgb'])
  assert ex['boxes'].dtype == np.float32 and ex['classes'].dtype == np.int32
  np.testing.assert_allclose(ex['boxes'], [[5.5, 6.0, 15.5, 14.25], [20.0, 3.0, 31.0, 9.0]])
  np.testing.assert_array_equal(ex['classes'], [2, 0])
  np.testing.assert_array_equal(ex['is_crowd'], [False, True])
  assert 'masks' not in ex
  empty = examples[101]  # an image without annotations is kept, with n = 0
  assert empty['boxes'].shape == (0, 4) and empty['classes'].shape == (0,)


def test_masks_from_polygons_and_rle(folder):
  examples = _read(_config(folder, with_masks=True))
  masks = examples[100]['masks']
  assert masks.dtype == np.uint8 and masks.shape == (2, H, W)
  np.testing.assert_array_equal(masks[1], CROWD)  # uncompressed RLE, decoded exactly
  # The rectangle polygon (5, 6)-(15, 14): interior pixels in, far pixels out.
  assert masks[0][7:13, 6:14].all() and masks[0].sum() == masks[0][5:15, 4:16].sum()
  assert abs(int(masks[0].sum()) - 80) <= 20
  assert examples[101]['masks'].shape == (0, H, W)
  # Masks of the upright EXIF image have the upright size.
  assert examples[106]['masks'].shape == (1, W, H)


def test_modes_become_rgb(folder):
  examples = _read(_config(folder))
  rgb = folder['rgb'].astype(int)
  for image_id in (101, 102, 103, 104, 105):
    assert examples[image_id]['image'].shape == (H, W, 3)
  gray = examples[101]['image']
  np.testing.assert_array_equal(gray, np.repeat(folder['rgb'][..., 1:2], 3, -1))
  np.testing.assert_array_equal(examples[102]['image'], folder['rgb'])  # alpha dropped
  assert np.abs(examples[103]['image'].astype(int) - rgb).mean() < 4  # palette quantised
  # 16-bit grayscale is scaled to 8 bits, not clipped to white.
  np.testing.assert_array_equal(examples[104]['image'][..., 0], folder['rgb'][..., 0])
  cmyk = examples[105]['image'].astype(int)
  assert np.abs(cmyk - rgb).mean() < 8


def test_exif_orientation(folder, caplog):
  with caplog.at_level(logging.WARNING):
    examples = _read(_config(folder))
  upright = examples[106]['image'].astype(int)
  # Orientation 6: the stored image rotated 90° clockwise is what a viewer shows.
  expected = np.rot90(folder['rgb'], k=-1).astype(int)
  assert upright.shape == (W, H, 3)
  assert np.abs(upright - expected).mean() < 4
  # Its box is taken as annotated on the upright image.
  np.testing.assert_allclose(examples[106]['boxes'], [[2.0, 4.0, 8.0, 14.0]])
  # A json whose size is the stored grid keeps the stored orientation, with a warning.
  stored = examples[107]['image'].astype(int)
  assert stored.shape == (H, W, 3) and np.abs(stored - folder['rgb']).mean() < 4
  assert 'exif_stored_grid.jpg' in caplog.text


def test_bad_files_are_skipped_warned_and_counted(folder, caplog):
  cfg = _config(folder)
  with caplog.at_level(logging.INFO):
    examples = _read(cfg)
  assert sorted(examples) == list(range(100, 108))
  assert 'corrupt.jpg' in caplog.text and 'missing.png' in caplog.text
  assert 'skipped 2 of 10 images' in caplog.text
  assert coco.num_examples(cfg, 'validation') == 10  # listed images, before decoding


def test_slices_and_shards(folder):
  cfg = _config(folder)
  assert coco.num_examples(cfg, 'validation[:4]') == 4
  assert sorted(_read(cfg, 'validation[:4]')) == [100, 101, 102, 103]
  sizes = [coco.num_examples(cfg, 'train', shard_index=i, shard_count=3) for i in range(3)]
  assert sizes == [4, 3, 3]
  ids = []
  for i in range(3):
    ids += list(_read(cfg, 'train', shard_index=i, shard_count=3))
  assert ids == list(range(100, 108))  # contiguous shards, in json order, bad files skipped


def test_ground_truth_is_the_json(folder):
  gt = coco.ground_truth(_config(folder), 'validation')
  assert sorted(gt.getImgIds()) == list(range(100, 110))
  ann = gt.anns[2]
  np.testing.assert_array_equal(gt.annToMask(ann), CROWD)
  assert mask_lib.area(gt.annToRLE(ann)) == CROWD.sum()


def test_missing_files_stop_at_once(folder, tmp_path):
  cfg = _config(folder)
  cfg.coco_json.validation_annotations = str(tmp_path / 'nope.json')
  with pytest.raises(coco.DatasetNotFoundError, match='nope.json'):
    coco.dataset(cfg, 'validation')
  cfg = _config(folder)
  cfg.coco_json.train_images = str(tmp_path / 'no_images')
  with pytest.raises(FileNotFoundError, match='no_images'):
    coco.num_examples(cfg, 'train')
  cfg = common.data_config('coco_json')
  with pytest.raises(FileNotFoundError, match='coco_json.train_annotations'):
    coco.dataset(cfg, 'train')


def test_tfds_coco_missing_says_how_to_build(tmp_path):
  cfg = common.data_config('coco')
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    coco.dataset(cfg, 'train')
  message = str(error.value)
  assert f'tfds build coco/2017 --data_dir={tmp_path}' in message
  assert '25 GB' in message and 'coco_json' in message
  with pytest.raises(FileNotFoundError):
    coco.num_examples(cfg, 'validation')
  cfg.with_masks = True
  with pytest.raises(ValueError, match='coco_json'):
    coco.dataset(cfg, 'train')
