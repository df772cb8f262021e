"""Inference loop and COCO evaluation (pycocotools) of bbox and, for mask models, segm.

`postprocess` runs under jit on the global batch; detections come back to the host, padding
images (image_id -1) are dropped, contiguous classes are mapped to the dataset's category
ids and boxes to COCO xywh in original-image pixels.
"""

import contextlib
import io
import time
from typing import Any, Dict, Iterable, List

from absl import logging
import jax
import numpy as np

from jaxdet import parallel

# pycocotools' COCOeval.stats order.
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def make_predict_fn(model, module, config, mesh):
  """jit((variables, batch) -> detections), batch sharded over 'data'."""

  def predict(variables, batch):
    # The whole batch goes in as `targets`: models that need per-image metadata at inference
    # (DETR's padding mask from orig_size/scale/offset) read it; none may read ground truth.
    outputs = model.apply(variables, batch['image'], train=False, targets=batch)
    return module.postprocess(outputs, batch, config)

  return jax.jit(predict, in_shardings=(None, parallel.batch_sharding(mesh)))


def detections_to_coco(detections: Dict[str, np.ndarray], image_ids: np.ndarray,
                       category_ids: List[int], orig_sizes=None) -> List[Dict[str, Any]]:
  """Fixed-shape detections of one batch -> COCO result dicts (padding images skipped).

  detections: boxes [B, K, 4] (x1, y1, x2, y2) original pixels, scores [B, K],
  classes [B, K] contiguous ids, num [B], optionally masks [B, K, M, M] box-relative
  probabilities (pasted into the image and RLE-encoded when orig_sizes is given).
  """
  results = []
  for b, image_id in enumerate(np.asarray(image_ids)):
    if image_id < 0:
      continue
    for k in range(int(detections['num'][b])):
      x1, y1, x2, y2 = (float(v) for v in detections['boxes'][b, k])
      result = {'image_id': int(image_id),
                'category_id': int(category_ids[int(detections['classes'][b, k])]),
                'bbox': [x1, y1, x2 - x1, y2 - y1],
                'score': float(detections['scores'][b, k])}
      if 'masks' in detections and orig_sizes is not None:
        from jaxdet.ops import masks as mask_ops  # pylint: disable=g-import-not-at-top
        result['segmentation'] = mask_ops.encode_rle(mask_ops.paste_mask_numpy(
            detections['masks'][b, k], detections['boxes'][b, k], tuple(orig_sizes[b])))
      results.append(result)
  return results


def coco_evaluate(ground_truth, results: List[Dict[str, Any]], iou_type: str = 'bbox',
                  image_ids: Iterable[int] = None) -> Dict[str, float]:
  """pycocotools COCOeval on a COCO object and result dicts -> {'<iou_type>/AP': ...}."""
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  if not results:
    logging.warning('No detections: every %s metric is 0.', iou_type)
    return {f'{iou_type}/{name}': 0.0 for name in STAT_NAMES}
  # loadRes adds a box polygon as 'segmentation' to bbox results: give it copies, so a box-only
  # model's results do not later look like mask results.
  detections = ground_truth.loadRes([dict(r) for r in results])
  evaluator = COCOeval(ground_truth, detections, iou_type)
  if image_ids is not None:
    evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  logging.info('COCO %s evaluation:\n%s', iou_type, out.getvalue())
  # COCOeval reports -1 where a size range has no ground truth; keep it as reported.
  return {f'{iou_type}/{name}': float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


def evaluate(config, model, module, variables, mesh, *, batches=None) -> Dict[str, float]:
  """Runs the eval split through the model and scores it with pycocotools (one-off)."""
  return make_evaluator(config, model, module, mesh)(variables, batches=batches)


def make_evaluator(config, model, module, mesh):
  """(variables, batches=None) -> metrics; compiles the predict function once for all calls.

  variables: {'params', 'batch_stats'} (sharded or replicated arrays).
  batches: optional iterable of host-local eval batches (defaults to the config's eval split).
  """
  predict = make_predict_fn(model, module, config, mesh)
  return lambda variables, batches=None: _evaluate(config, predict, variables, mesh, batches)


def _evaluate(config, predict, variables, mesh, batches) -> Dict[str, float]:
  from jaxdet.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.time()
  eval_batch = config.get('eval_batch_size', config.global_batch_size)
  local_batch = parallel.local_batch_size(eval_batch, mesh)
  if batches is None:
    batches = pipeline.eval_iterator(config.data, batch_size=local_batch,
                                     shard_index=jax.process_index(),
                                     shard_count=jax.process_count())
  category_ids = pipeline.category_ids(config.data)
  results, seen = [], []
  for local in batches:
    detections = parallel.fetch(predict(variables, parallel.global_batch(local, mesh)))
    image_ids = parallel.fetch(parallel.global_batch(
        {'image_id': local['image_id']}, mesh))['image_id']
    orig_sizes = parallel.fetch(parallel.global_batch(
        {'orig_size': local['orig_size']}, mesh))['orig_size']
    results.extend(detections_to_coco(detections, image_ids, category_ids, orig_sizes))
    seen.extend(int(i) for i in image_ids if i >= 0)
  metrics = {}
  if jax.process_index() == 0:
    ground_truth = pipeline.ground_truth(config.data, config.data.eval_split)
    metrics.update(coco_evaluate(ground_truth, results, 'bbox', seen))
    if config.data.with_masks and any('segmentation' in r for r in results):
      metrics.update(coco_evaluate(ground_truth, results, 'segm', seen))
  metrics['eval/images'] = float(len(seen))
  metrics['eval/seconds'] = time.time() - start
  logging.info('Evaluated %d images in %.1f s: %s', len(seen), metrics['eval/seconds'],
               {k: round(v, 4) for k, v in metrics.items() if k.startswith(('bbox', 'segm'))})
  return metrics
