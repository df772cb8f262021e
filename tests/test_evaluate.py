"""COCO evaluation: result conversion and pycocotools scores on known detections."""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

from jaxdet import evaluate


def _ground_truth():
  gt = COCO()
  gt.dataset = {
      'images': [{'id': 7, 'width': 200, 'height': 100}, {'id': 9, 'width': 200, 'height': 100}],
      'categories': [{'id': 3, 'name': 'a'}, {'id': 5, 'name': 'b'}],
      'annotations': [
          {'id': 1, 'image_id': 7, 'category_id': 3, 'bbox': [10, 10, 40, 30], 'area': 1200,
           'iscrowd': 0},
          {'id': 2, 'image_id': 9, 'category_id': 5, 'bbox': [50, 20, 100, 60], 'area': 6000,
           'iscrowd': 0},
      ]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def _detections(boxes, classes, scores):
  boxes = np.asarray(boxes, np.float32)
  return {'boxes': boxes, 'classes': np.asarray(classes, np.int32),
          'scores': np.asarray(scores, np.float32),
          'num': np.array([(np.asarray(s) > 0).sum() for s in scores])}


def test_detections_to_coco_maps_ids_boxes_and_skips_padding():
  dets = _detections([[[10, 10, 50, 40], [0, 0, 0, 0]], [[1, 2, 3, 4], [0, 0, 0, 0]]],
                     [[0, -1], [1, -1]], [[0.9, 0.0], [0.8, 0.0]])
  results = evaluate.detections_to_coco(dets, np.array([7, -1]), [3, 5])
  assert results == [{'image_id': 7, 'category_id': 3, 'bbox': [10.0, 10.0, 40.0, 30.0],
                      'score': np.float32(0.9).item()}]


def test_perfect_detections_score_ap_one():
  dets = _detections([[[10, 10, 50, 40]], [[50, 20, 150, 80]]], [[0], [1]], [[0.9], [0.8]])
  results = evaluate.detections_to_coco(dets, np.array([7, 9]), [3, 5])
  metrics = evaluate.coco_evaluate(_ground_truth(), results, 'bbox')
  np.testing.assert_allclose(metrics['bbox/AP'], 1.0)
  np.testing.assert_allclose(metrics['bbox/AP50'], 1.0)
  assert set(metrics) == {f'bbox/{n}' for n in evaluate.STAT_NAMES}


def test_bbox_evaluation_leaves_results_untouched():
  """pycocotools' loadRes writes box polygons into bbox results; ours must stay box-only so
  that a box model on a dataset with masks is not scored as if it predicted masks."""
  results = [{'image_id': 7, 'category_id': 3, 'bbox': [10, 10, 20, 20], 'score': 0.9}]
  evaluate.coco_evaluate(_ground_truth(), results, 'bbox')
  assert results == [{'image_id': 7, 'category_id': 3, 'bbox': [10, 10, 20, 20], 'score': 0.9}]


def test_wrong_class_and_shifted_boxes_score_lower():
  # Right box, wrong class on image 7; a box with IoU ~0.6 on image 9.
  dets = _detections([[[10, 10, 50, 40]], [[70, 20, 170, 80]]], [[1], [1]], [[0.9], [0.8]])
  results = evaluate.detections_to_coco(dets, np.array([7, 9]), [3, 5])
  metrics = evaluate.coco_evaluate(_ground_truth(), results, 'bbox')
  assert 0.0 < metrics['bbox/AP50'] < 1.0
  assert metrics['bbox/AP75'] == 0.0


def test_no_detections_is_zero_not_a_crash():
  metrics = evaluate.coco_evaluate(_ground_truth(), [], 'bbox')
  assert metrics['bbox/AP'] == 0.0
