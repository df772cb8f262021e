"""COCO: tfds `coco/2017` (data.name 'coco') and COCO-format folders ('coco_json').

Both sources yield the canonical example, one image per element:

  image     uint8 [H, W, 3]   RGB, upright
  image_id  int64 []          the image id of the COCO ground truth
  boxes     float32 [n, 4]    (x1, y1, x2, y2) original-image pixels, continuous coordinates
  classes   int32 [n]         contiguous ids 0..C-1 (`category_ids` maps them back)
  is_crowd  bool [n]
  masks     uint8 [n, H, W]   instance masks {0, 1}; only with data.with_masks ('coco_json')

n may be 0. Boxes are passed on as annotated; clipping and dropping degenerate boxes is the
pipeline's job. Contiguous ids follow sorted category ids, so for COCO 2017 class i is
COCO_CATEGORY_IDS[i].

'coco_json' reads any COCO instances json (`data.coco_json.<split>_annotations`) and its image
folder (`<split>_images`) with pycocotools and PIL, trusting nothing in them:
  - an image that is missing or cannot be decoded is skipped with a warning naming the file;
    the number skipped is logged at the end of every pass;
  - grayscale, 16-bit, palette, RGBA (alpha dropped) and CMYK images become RGB;
  - EXIF orientation is applied (PIL.ImageOps.exif_transpose), so images come out upright and
    annotations are taken to refer to the upright image, as annotation tools show it and as
    the json's width/height then say. Where the json's width/height instead match only the
    stored (unrotated) pixel grid, the annotator saw that grid: the image is kept unrotated, with
    a warning. An image whose size matches neither is skipped, since its boxes cannot be placed;
  - annotations whose category id is not among the categories are dropped with a warning.
"""

import collections
import concurrent.futures
import contextlib
import functools
import io
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image, ImageOps
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_lib
import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow only feeds data here; the accelerators belong to JAX.
tf.config.set_visible_devices([], 'GPU')

TFDS_NAME = 'coco/2017'

# The 80 category ids used by COCO 2014/2017 detection (of 1..90), in contiguous order, and
# their names (instances_val2017.json 'categories').
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush')

# Threads decoding 'coco_json' images (PIL releases the GIL while decoding). The order of the
# examples does not depend on it.
DECODE_THREADS = min(8, os.cpu_count() or 1)
_ORIENTATION = 0x0112  # EXIF tag


class DatasetNotFoundError(FileNotFoundError):
  """A dataset, or a file it needs, is missing; the message says how to provide it."""


def _split_name(split: str) -> str:
  return re.match(r'\w+', split).group(0)  # 'validation[:100]' -> 'validation'


def _check_name(data_cfg):
  if data_cfg.name not in ('coco', 'coco_json'):
    raise ValueError(f"jaxdet.data.coco reads data.name 'coco' or 'coco_json', "
                     f'not {data_cfg.name!r}.')


# --------------------------------------------------------------------------- tfds coco ---


def _tfds_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The prepared tfds coco/2017 builder; stops with instructions when it is not prepared."""
  builder = tfds.builder(TFDS_NAME, data_dir=data_cfg.data_dir)
  if not builder.is_prepared():
    data_dir = os.fspath(builder.data_dir_root)
    raise DatasetNotFoundError(
        f'tfds {TFDS_NAME} is not prepared in {data_dir}. Prepare it once with\n'
        f'  tfds build {TFDS_NAME} --data_dir={data_dir}\n'
        'which downloads ~25 GB of images and annotations from cocodataset.org (and needs '
        'about twice that in free disk space while it builds), or set --config.data.data_dir '
        'to the folder that already holds it. Alternatively read the official annotation '
        'json and image folders directly:\n'
        '  --config.data.name=coco_json '
        '--config.data.coco_json.train_annotations=.../annotations/instances_train2017.json '
        '--config.data.coco_json.train_images=.../train2017 '
        '--config.data.coco_json.validation_annotations=.../annotations/'
        'instances_val2017.json --config.data.coco_json.validation_images=.../val2017')
  return builder


def _shard_tfds(split: str, shard_index: int, shard_count: int):
  # Contiguous, near-equal slices per process, as tfds.split_for_jax_process.
  if shard_count == 1:
    return split
  return tfds.even_splits(split, n=shard_count)[shard_index]


def _from_tfds(example):
  """tfds coco/2017 example -> canonical example (without masks)."""
  image = example['image']                                    # uint8 [H, W, 3]
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  height, width = size[0], size[1]
  yxyx = example['objects']['bbox']                           # [n, 4] normalised y1 x1 y2 x2
  boxes = tf.stack([yxyx[:, 1] * width, yxyx[:, 0] * height,
                    yxyx[:, 3] * width, yxyx[:, 2] * height], axis=-1)
  return {
      'image': image,
      'image_id': example['image/id'],
      'boxes': boxes,                                         # [n, 4] x1 y1 x2 y2 pixels
      # tfds numbers the labels in the json's category order (sorted ids): contiguous already.
      'classes': tf.cast(example['objects']['label'], tf.int32),
      'is_crowd': example['objects']['is_crowd'],
  }


def _tfds_dataset(data_cfg, split, shard_index, shard_count):
  if data_cfg.with_masks:
    raise ValueError(
        f'tfds {TFDS_NAME} holds no instance masks. For mask models read the official '
        'annotations with --config.data.name=coco_json (--config.data.coco_json.'
        '<split>_annotations=.../instances_<split>2017.json, <split>_images=.../<split>2017).')
  builder = _tfds_builder(data_cfg)
  ds = builder.as_dataset(split=_shard_tfds(split, shard_index, shard_count),
                          shuffle_files=False,
                          read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(_from_tfds, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@functools.lru_cache(maxsize=4)
def _tfds_ground_truth(data_dir: Optional[str], split: str) -> coco_lib.COCO:
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: dict(id=ex['image/id'], file_name=ex['image/filename'],
                              shape=tf.image.extract_jpeg_shape(ex['image']),
                              objects=ex['objects']),
              num_parallel_calls=tf.data.AUTOTUNE)
  images, annotations = [], []
  for ex in tfds.as_numpy(ds):
    height, width = int(ex['shape'][0]), int(ex['shape'][1])
    images.append(dict(id=int(ex['id']), width=width, height=height,
                       file_name=ex['file_name'].decode()))
    objects = ex['objects']
    for k in range(len(objects['label'])):
      y1, x1, y2, x2 = (float(v) for v in objects['bbox'][k])
      annotations.append(dict(
          id=int(objects['id'][k]), image_id=int(ex['id']),
          category_id=COCO_CATEGORY_IDS[int(objects['label'][k])],
          bbox=[x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height],
          area=float(objects['area'][k]), iscrowd=int(objects['is_crowd'][k])))
  categories = [dict(id=i, name=n) for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES)]
  return _coco_from_dict(dict(images=images, annotations=annotations, categories=categories))


def _coco_from_dict(dataset: Dict) -> coco_lib.COCO:
  gt = coco_lib.COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    gt.createIndex()
  return gt


# --------------------------------------------------------------------------- coco_json ---


def _json_files(data_cfg, split: str) -> Tuple[str, str]:
  """(annotation json, image folder) of a split; stops at once when either is missing."""
  name = _split_name(split)
  keys = (f'{name}_annotations', f'{name}_images')
  if not all(k in data_cfg.coco_json for k in keys):
    raise ValueError(f"data.name='coco_json' knows the splits 'train' and 'validation', not "
                     f'{name!r} (from split {split!r}).')
  annotations, images = (data_cfg.coco_json[k] for k in keys)
  if not annotations or not images:
    raise DatasetNotFoundError(
        f"data.name='coco_json' reads split {name!r} from a COCO instances json and its image "
        f'folder: set --config.data.coco_json.{keys[0]}=<file.json> and '
        f'--config.data.coco_json.{keys[1]}=<folder>.')
  if not os.path.isfile(annotations):
    raise DatasetNotFoundError(
        f'Annotation file {annotations} (--config.data.coco_json.{keys[0]}) does not exist.')
  if not os.path.isdir(images):
    raise DatasetNotFoundError(
        f'Image folder {images} (--config.data.coco_json.{keys[1]}) does not exist.')
  return annotations, images


@functools.lru_cache(maxsize=4)
def _load_json(path: str) -> coco_lib.COCO:
  logging.info('Reading COCO annotations %s', path)
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    return coco_lib.COCO(path)


def _reference_json(data_cfg) -> str:
  """The json whose categories define the contiguous ids: validation's, else train's.

  COCO lists the same categories in both; the smaller file is read when evaluating alone.
  """
  for name in ('validation', 'train'):
    if data_cfg.coco_json[f'{name}_annotations']:
      return _json_files(data_cfg, name)[0]
  raise DatasetNotFoundError(
      "data.name='coco_json' needs --config.data.coco_json.train_annotations and/or "
      'validation_annotations (COCO instances json files) and the matching *_images folders.')


def _select(ids: Sequence[int], split: str, shard_index: int, shard_count: int) -> List[int]:
  """Applies a 'name[a:b]' slice, then takes shard `shard_index` of `shard_count`.

  Shards are contiguous; the first len % shard_count get one extra, as tfds.even_splits.
  """
  ids = list(ids)
  match = re.fullmatch(r'\w+(?:\[(-?\d*):(-?\d*)\])?', split.replace(' ', ''))
  if not match:
    raise ValueError(f"coco_json splits are 'train' or 'validation' with an optional "
                     f"[start:end] slice of image indices, not {split!r}.")
  if match.group(1) or match.group(2):
    start, end = (int(g) if g else None for g in match.groups())
    ids = ids[start:end]
  per_shard, extra = divmod(len(ids), shard_count)
  begin = shard_index * per_shard + min(shard_index, extra)
  return ids[begin:begin + per_shard + (shard_index < extra)]


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. 16-bit and float grayscale are scaled, not clipped, to 8 bits."""
  if image.mode == 'RGB':
    return image
  if image.mode.startswith('I') or image.mode == 'F':
    values = np.asarray(image, np.float32)
    if values.max(initial=0) > 255:  # 16-bit data (PNG stores such images as I;16 / I)
      values = values / 257.0
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
  elif image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # PIL expects palette transparency to go through RGBA
  return image.convert('RGB')


def _decode(path: str, info: Dict) -> np.ndarray:
  """Reads an image file as upright RGB uint8 [H, W, 3]; raises when it cannot be used.

  info: the json's image entry; its width/height decide between the EXIF-upright and the
  stored pixel grid (see the module docstring).
  """
  with Image.open(path) as stored:
    stored.load()
    try:
      # exif_transpose copies even an upright image; most files have no orientation tag.
      upright = (ImageOps.exif_transpose(stored)
                 if stored.getexif().get(_ORIENTATION, 1) != 1 else stored)
    except Exception as e:  # pylint: disable=broad-except
      # Unreadable EXIF does not make the pixels unusable.
      logging.warning('%s: ignoring unreadable EXIF data (%s)', path, e)
      upright = stored
    expected = (info.get('width'), info.get('height'))
    if not all(expected) or upright.size == expected:
      image = upright
    elif stored.size == expected:
      logging.warning('%s: its annotation size %dx%d is the stored pixel grid, not the '
                      'EXIF-upright %dx%d; keeping the stored orientation.',
                      path, *expected, *upright.size)
      image = stored
    else:
      raise ValueError(f'its size {stored.size[0]}x{stored.size[1]} does not match the '
                       f'annotation size {expected[0]}x{expected[1]}')
    return np.asarray(_to_rgb(image), np.uint8)


def _box(coco: coco_lib.COCO, ann: Dict) -> List[float]:
  """COCO xywh -> (x1, y1, x2, y2); from the segmentation where a bbox is missing."""
  if 'bbox' in ann and len(ann['bbox']) == 4:
    x, y, w, h = (float(v) for v in ann['bbox'])
  else:
    x, y, w, h = (float(v) for v in mask_lib.toBbox(coco.annToRLE(ann)))
  return [x, y, x + w, y + h]


def _mask(coco: coco_lib.COCO, ann: Dict, height: int, width: int) -> np.ndarray:
  """uint8 [H, W] mask from polygons or RLE; all zeros (with a warning) where unreadable."""
  try:
    mask = coco.annToMask(ann) if ann.get('segmentation') else None
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Annotation %s: unreadable segmentation (%s); using an empty mask.',
                    ann.get('id'), e)
    mask = None
  if mask is None or mask.shape != (height, width):
    return np.zeros((height, width), np.uint8)
  return mask.astype(np.uint8)


def _read_example(coco, image_id, image_dir, contiguous, with_masks) -> Optional[Dict]:
  """One canonical example as numpy arrays; None (with a warning) for an unusable image."""
  info = coco.imgs[image_id]
  path = os.path.join(image_dir, info.get('file_name', ''))
  try:
    image = _decode(path, info)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the decoder raises, the file is skipped, never the run.
    logging.warning('Skipping image %s (id %d): %s: %s', path, image_id, type(e).__name__, e)
    return None
  anns = [a for a in coco.imgToAnns.get(image_id, []) if a['category_id'] in contiguous]
  example = {
      'image': image,
      'image_id': np.int64(image_id),
      'boxes': np.array([_box(coco, a) for a in anns], np.float32).reshape(-1, 4),
      'classes': np.array([contiguous[a['category_id']] for a in anns], np.int32),
      'is_crowd': np.array([bool(a.get('iscrowd', 0)) for a in anns], bool),
  }
  if with_masks:
    height, width = image.shape[:2]
    if not info.get('height') or not info.get('width'):
      info['height'], info['width'] = height, width  # annToMask reads the size from here
    masks = [_mask(coco, a, height, width) for a in anns]
    example['masks'] = (np.stack(masks) if masks
                        else np.zeros((0, height, width), np.uint8))
  return example


def _json_dataset(data_cfg, split, shard_index, shard_count):
  annotation_file, image_dir = _json_files(data_cfg, split)
  coco = _load_json(annotation_file)
  contiguous = {c: i for i, c in enumerate(category_ids(data_cfg))}
  image_ids = _select(coco.getImgIds(), split, shard_index, shard_count)
  unknown = collections.Counter(
      a['category_id'] for i in image_ids for a in coco.imgToAnns.get(i, [])
      if a['category_id'] not in contiguous)
  if unknown:
    logging.warning('%s: dropping %d annotations whose category ids %s are not among the '
                    'categories of %s.', annotation_file, sum(unknown.values()),
                    sorted(unknown), _reference_json(data_cfg))
  with_masks = bool(data_cfg.with_masks)
  read = functools.partial(_read_example, coco, image_dir=image_dir, contiguous=contiguous,
                           with_masks=with_masks)

  def generate():
    """One pass over the images in json order, decoded ahead by a thread pool."""
    skipped = 0
    pool = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS)
    try:
      pending = collections.deque()
      ids = iter(image_ids)
      for image_id in ids:
        pending.append(pool.submit(read, image_id))
        if len(pending) >= 2 * DECODE_THREADS:
          break
      while pending:
        example = pending.popleft().result()
        next_id = next(ids, None)
        if next_id is not None:
          pending.append(pool.submit(read, next_id))
        if example is None:
          skipped += 1
        else:
          yield example
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    if skipped:
      logging.warning('%s: skipped %d of %d images that could not be read (named above).',
                      annotation_file, skipped, len(image_ids))
    else:
      logging.info('%s: read all %d images.', annotation_file, len(image_ids))

  signature = {
      'image': tf.TensorSpec([None, None, 3], tf.uint8),
      'image_id': tf.TensorSpec([], tf.int64),
      'boxes': tf.TensorSpec([None, 4], tf.float32),
      'classes': tf.TensorSpec([None], tf.int32),
      'is_crowd': tf.TensorSpec([None], tf.bool),
  }
  if with_masks:
    signature['masks'] = tf.TensorSpec([None, None, None], tf.uint8)
  return tf.data.Dataset.from_generator(generate, output_signature=signature)


# ------------------------------------------------------------------------------ public ---


def dataset(data_cfg, split: str, *, shard_index: int = 0,
            shard_count: int = 1) -> tf.data.Dataset:
  """Canonical examples of `split` (module docstring) for this shard, in a fixed order.

  split: 'train' or 'validation', optionally sliced ('validation[:500]'; for 'coco_json' an
  index slice of the json's image list). Shards are contiguous and near-equal in size.
  """
  _check_name(data_cfg)
  if data_cfg.name == 'coco':
    return _tfds_dataset(data_cfg, split, shard_index, shard_count)
  return _json_dataset(data_cfg, split, shard_index, shard_count)


def num_examples(data_cfg, split: str, *, shard_index: int = 0, shard_count: int = 1) -> int:
  """Images in this shard of `split` ('coco_json': before undecodable ones are skipped)."""
  _check_name(data_cfg)
  if data_cfg.name == 'coco':
    splits = _tfds_builder(data_cfg).info.splits
    return int(splits[_shard_tfds(split, shard_index, shard_count)].num_examples)
  coco = _load_json(_json_files(data_cfg, split)[0])
  return len(_select(coco.getImgIds(), split, shard_index, shard_count))


def ground_truth(data_cfg, split: str) -> coco_lib.COCO:
  """COCO ground truth of the whole `split`: image ids = `image_id`, the dataset's category ids.

  'coco_json': the annotation json itself. 'coco': rebuilt from the tfds records (boxes,
  the annotations' own areas, iscrowd; no segmentations), which reproduces bbox AP only as
  closely as tfds stored the boxes (float32, normalised); official numbers, and any segm AP,
  need the official json through 'coco_json'.
  """
  _check_name(data_cfg)
  if data_cfg.name == 'coco':
    _tfds_builder(data_cfg)  # the actionable error when it is missing
    return _tfds_ground_truth(data_cfg.data_dir, _split_name(split))
  return _load_json(_json_files(data_cfg, split)[0])


def category_ids(data_cfg) -> List[int]:
  """Contiguous class id -> the dataset's category id."""
  _check_name(data_cfg)
  if data_cfg.name == 'coco':
    return list(COCO_CATEGORY_IDS)
  return sorted(_load_json(_reference_json(data_cfg)).cats)


def class_names(data_cfg) -> List[str]:
  """Contiguous class id -> category name."""
  _check_name(data_cfg)
  if data_cfg.name == 'coco':
    return list(COCO_CLASS_NAMES)
  cats = _load_json(_reference_json(data_cfg)).cats
  return [cats[i].get('name', str(i)) for i in sorted(cats)]
