"""Runs a trained model on image files: one JSON of detections and one drawn PNG per image.

Images go through the evaluation geometry (long side to data.image_size, padded), in
batches of eval_batch_size padded with blank images so the predict function compiles once.
Files that cannot be decoded are skipped with a warning that names them.
"""

import glob
import json
import os
from typing import Dict, List

from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from jaxdet import evaluate
from jaxdet import parallel
from jaxdet.data import pipeline

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def list_images(spec: str) -> List[str]:
  """A file, a directory (its image files, sorted) or a glob pattern."""
  if os.path.isdir(spec):
    paths = [os.path.join(spec, f) for f in sorted(os.listdir(spec))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
  elif any(ch in spec for ch in '*?['):
    paths = sorted(glob.glob(spec))
  else:
    paths = [spec]
  if not paths or not all(os.path.exists(p) for p in paths):
    raise FileNotFoundError(f'No image files at {spec!r}.')
  return paths


def draw(image: np.ndarray, detections: List[Dict], class_names, min_score=0.3) -> Image.Image:
  """Boxes and labels over an RGB uint8 image [H, W, 3]; detections in COCO-style xyxy."""
  canvas = Image.fromarray(image).convert('RGB')
  pen = ImageDraw.Draw(canvas)
  for d in detections:
    if d['score'] < min_score:
      continue
    color = _PALETTE[d['class'] % len(_PALETTE)]
    x1, y1, x2, y2 = d['box']
    pen.rectangle([x1, y1, x2, y2], outline=color, width=2)
    pen.text((x1 + 2, y1 + 1), f"{class_names[d['class']]} {d['score']:.2f}", fill=color)
  return canvas


def predict_files(config, model, module, variables, mesh, images: str, output: str,
                  min_score: float = 0.3) -> Dict[str, List[Dict]]:
  """Detections for every readable image under `images`, written to `output`."""
  os.makedirs(output, exist_ok=True)
  predict = evaluate.make_predict_fn(model, module, config, mesh)
  batch_size = config.get('eval_batch_size', config.global_batch_size)
  class_names = pipeline.class_names(config.data)
  paths = list_images(images)
  loaded = []
  for path in paths:
    image = pipeline.load_image(path)
    if image is not None:
      loaded.append((path, image))
  skipped = len(paths) - len(loaded)
  if skipped:
    logging.warning('Skipped %d unreadable image(s) of %d.', skipped, len(paths))

  everything = {}
  for start in range(0, len(loaded), batch_size):
    chunk = loaded[start:start + batch_size]
    examples = [pipeline.preprocess_image(image, config.data) for _, image in chunk]
    while len(examples) < batch_size:  # Blank padding keeps one compiled shape.
      blank = dict(examples[0])
      blank['image_id'] = np.full_like(np.asarray(examples[0]['image_id']), -1)
      examples.append(blank)
    batch = {k: np.concatenate([np.asarray(e[k]) for e in examples]) for k in examples[0]}
    out = parallel.fetch(predict(variables, parallel.global_batch(batch, mesh)))
    for b, (path, image) in enumerate(chunk):
      dets = [{'box': [float(v) for v in out['boxes'][b, k]],
               'score': float(out['scores'][b, k]),
               'class': int(out['classes'][b, k]),
               'label': class_names[int(out['classes'][b, k])]}
              for k in range(int(out['num'][b]))]
      name = os.path.splitext(os.path.basename(path))[0]
      draw(image, dets, class_names, min_score).save(os.path.join(output, f'{name}.png'))
      everything[path] = dets
  with open(os.path.join(output, 'detections.json'), 'w') as f:
    json.dump(everything, f, indent=1)
  logging.info('Wrote detections for %d image(s) to %s', len(everything), output)
  return everything
