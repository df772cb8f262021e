"""Faster / Mask R-CNN: parameter counts, samplers, proposals, inference, training, evaluation."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import rcnn_common
from jaxdet import evaluate
from jaxdet import parallel
from jaxdet import summary
from jaxdet import train
from jaxdet.data import pipeline
from jaxdet.models import rcnn
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import roi_align as roi_ops
import model_testing

# Reference counts: detectron2's Mask R-CNN R50-FPN (80 classes) and SpineNet paper Table 6.
# The SpineNet reference code has 91 class logits (background included) and 91 x 4 box
# outputs; jaxdet's head has C + 1 logits and 4C deltas, so C = 90 stands for it.
REFERENCE_PARAMS = [
    ('maskrcnn_r50fpn', '', 80, 44.2e6),
    ('maskrcnn_spinenet49', 'model=49', 90, 40.8e6),
    ('maskrcnn_spinenet49', 'model=49S', 90, 13.9e6),
    ('maskrcnn_spinenet49', 'model=96', 90, 55.2e6),
]


@pytest.mark.parametrize('name,arg,num_classes,expected', REFERENCE_PARAMS)
def test_parameter_count_matches_reference(name, arg, num_classes, expected):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  config.model.num_classes = num_classes
  config.data.image_size = 128  # Counts do not depend on the input size.
  count = summary.summarize(config, with_flops=False)['params']
  assert abs(count - expected) / expected < 0.02, count


def test_fpn_maxpool_top_level_subsamples_p5():
  from jaxdet.models.necks import fpn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # C5 is 3 x 3, so P6 is ceil(3 / 2) = 2 cells a side.
  features = {l: jnp.asarray(rng.normal(size=(1, 96 // 2**l, 96 // 2**l, 4)), jnp.float32)
              for l in (2, 3, 4, 5)}
  neck = fpn.FPN(min_level=2, max_level=6, num_filters=8, use_norm=False,
                 extra_levels='maxpool')
  variables = neck.init(jax.random.key(0), features, train=False)
  out = neck.apply(variables, features, train=False)
  assert sorted(variables['params']) == [f'{k}{l}' for k in ('lateral', 'output')
                                         for l in (2, 3, 4, 5)]
  assert out[6].shape == (1, 2, 2, 8)
  np.testing.assert_array_equal(out[6], out[5][:, ::2, ::2])


def _np_iou(a, b):
  """IoU matrix of corner boxes a [N, 4], b [M, 4], straight from the definition."""
  a = np.asarray(a, np.float64)[:, None]
  b = np.asarray(b, np.float64)[None]
  iw = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
  ih = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]))
  inter = iw * ih
  union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
           + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _np_nms(boxes, scores, groups, thr):
  """Greedy NMS per group; indices in descending score order."""
  order = np.argsort(-scores, kind='stable')
  keep = []
  for i in order:
    if all(groups[k] != groups[i] or _np_iou(boxes[i:i + 1], boxes[k:k + 1])[0, 0] <= thr
           for k in keep):
      keep.append(i)
  return keep


def _model_cfg(num_classes=3):
  m = rcnn_common.rcnn_model(with_masks=True, num_classes=num_classes)
  return m


def _gt(boxes, classes, crowd=None, n=8):
  b = np.zeros((n, 4), np.float32)
  c = np.full((n,), -1, np.int32)
  k = np.zeros((n,), bool)
  b[:len(boxes)] = np.reshape(boxes, (-1, 4))
  c[:len(classes)] = classes
  if crowd is not None:
    k[:len(crowd)] = crowd
  return jnp.asarray(b), jnp.asarray(c), jnp.asarray(k)


ANCHORS = rcnn.anchors_by_level((128, 128), _model_cfg())
FLAT_ANCHORS = np.concatenate([ANCHORS[l].reshape(-1, 4) for l in sorted(ANCHORS)])


@pytest.mark.parametrize('case', ['objects', 'empty', 'crowd_only'])
def test_rpn_sampling_counts_and_fractions(case):
  cfg = _model_cfg()
  if case == 'objects':
    gt = _gt([[10, 12, 60, 70], [64, 64, 120, 100], [30, 80, 46, 96]], [0, 1, 2])
  elif case == 'empty':
    gt = _gt([], [])
  else:
    gt = _gt([[0, 0, 80, 80]], [1], crowd=[True])
  index, label, targets = jax.jit(lambda *a: rcnn.rpn_targets(*a, cfg))(
      jax.random.key(3), jnp.asarray(FLAT_ANCHORS), *gt)
  index, label, targets = map(np.asarray, (index, label, targets))
  assert index.shape == (256,) and label.shape == (256,)
  boxes, classes, crowd = map(np.asarray, gt)
  real = (classes >= 0) & ~crowd
  iou = _np_iou(FLAT_ANCHORS, boxes[real]) if real.any() else np.zeros((len(FLAT_ANCHORS), 0))
  best = iou.max(1) if real.any() else np.zeros(len(FLAT_ANCHORS))
  forced = np.zeros(len(FLAT_ANCHORS), bool)
  if real.any():
    # Anchors tied for a ground truth's best IoU are all forced; which ties survive float32
    # rounding depends on the arithmetic, so the reference allows 1e-6.
    forced = (iou >= iou.max(0, keepdims=True) - 1e-6).any(1)
  pos = index[label == 1]
  neg = index[label == 0]
  # Fewer positives than half the sample: every anchor at IoU >= 0.7 is drawn, and only
  # those or forced ones; negatives fill the rest (thousands of background anchors).
  assert len(pos) < 128
  assert set(np.flatnonzero(best >= 0.7)) <= set(pos.tolist())
  assert np.all((best[pos] >= 0.7) | forced[pos])
  assert len(neg) == 256 - len(pos)
  assert len(set(index.tolist())) == 256
  assert np.all(best[neg] < 0.3)
  if real.any():
    # Low-quality matches: every object has a positive anchor.
    assert set(iou[pos].argmax(1).tolist()) == set(range(real.sum()))
  if case != 'objects':
    assert len(pos) == 0
  if case == 'crowd_only':
    # Anchors on the crowd region are neither objects nor background.
    crowd_iou = _np_iou(FLAT_ANCHORS[neg], boxes[:1])[:, 0]
    assert np.all(crowd_iou < 0.3)
  if len(pos):
    # Targets decode back to each positive's ground truth.
    decoded = np.asarray(box_ops.decode_boxes(targets[label == 1], FLAT_ANCHORS[pos]))
    matched = boxes[real][iou[pos].argmax(1)]
    np.testing.assert_allclose(decoded, matched, atol=1e-3)


def _random_proposals(rng, gt_boxes, count):
  """Jittered copies of the ground truth plus background boxes, [count, 4]."""
  out = []
  for _ in range(count):
    if gt_boxes and rng.random() < 0.5:
      g = np.asarray(gt_boxes[rng.integers(len(gt_boxes))], np.float64)
      w, h = g[2] - g[0], g[3] - g[1]
      out.append(g + rng.normal(scale=0.12, size=4) * [w, h, w, h])
    else:
      x, y = rng.uniform(0, 100, 2)
      out.append([x, y, x + rng.uniform(4, 28), y + rng.uniform(4, 28)])
  return np.asarray(out, np.float32)


@pytest.mark.parametrize('case', ['objects', 'empty', 'crowd_only', 'no_proposals'])
def test_roi_sampling_counts_fractions_and_targets(case):
  cfg = _model_cfg(num_classes=3)
  rng = np.random.default_rng(0)
  gt_list, classes, crowd = {
      'objects': ([[10, 12, 60, 70], [64, 64, 120, 100]], [2, 0], None),
      'empty': ([], [], None),
      'crowd_only': ([[0, 0, 90, 90]], [1], [True]),
      'no_proposals': ([[10, 12, 60, 70], [64, 64, 120, 100]], [2, 0], None),
  }[case]
  proposals = _random_proposals(rng, gt_list, 1000)
  valid = np.ones(1000, bool)
  if case == 'no_proposals':
    valid[:] = False
  gt = _gt(gt_list, classes, crowd)
  rois, cls, targets, matched = map(np.asarray, jax.jit(lambda *a: rcnn.sample_rois(*a, cfg))(
      jax.random.key(0), jnp.asarray(proposals), jnp.asarray(valid), *gt))
  assert rois.shape == (512, 4) and cls.shape == (512,)
  boxes = np.asarray(gt[0])
  gt_classes = np.asarray(gt[1])
  real = (gt_classes >= 0) & ~np.asarray(gt[2])
  # Candidates: valid proposals plus the (non-crowd) ground truth.
  candidates = np.concatenate([proposals[valid], boxes[real]])
  iou = _np_iou(candidates, boxes[real]) if real.any() else np.zeros((len(candidates), 0))
  best = iou.max(1) if real.any() else np.zeros(len(candidates))
  num_fg = int((best >= 0.5).sum())
  # Non-positive candidates on a crowd region are ignored, the rest is background.
  crowd_boxes = boxes[(gt_classes >= 0) & np.asarray(gt[2])]
  on_crowd = (_np_iou(candidates, crowd_boxes).max(1) >= 0.5 if len(crowd_boxes)
              else np.zeros(len(candidates), bool))
  num_bg = int(((best < 0.5) & ~on_crowd).sum())
  fg = (cls >= 0) & (cls < 3)
  bg = cls == 3
  assert fg.sum() == min(num_fg, 128)
  assert bg.sum() == min(512 - fg.sum(), num_bg)
  assert np.all(cls[~fg & ~bg] == -1)
  roi_iou = _np_iou(rois, boxes[real]) if real.any() else np.zeros((512, 0))
  if real.any():
    assert np.all(roi_iou[fg].max(1) >= 0.5)
    np.testing.assert_array_equal(cls[fg], gt_classes[real][roi_iou[fg].argmax(1)])
    decoded = np.asarray(box_ops.decode_boxes(targets[fg], rois[fg], rcnn.ROI_BOX_WEIGHTS))
    np.testing.assert_allclose(decoded, boxes[matched[fg]], atol=1e-3)
  if (bg.any()) and real.any():
    assert np.all(roi_iou[bg].max(1) < 0.5)
  if case == 'empty':
    assert fg.sum() == 0 and bg.sum() == 512
  if case == 'crowd_only':
    assert fg.sum() == 0 and 0 < bg.sum() and on_crowd.sum() > 0
  if case == 'crowd_only':
    assert np.all(_np_iou(rois[bg], boxes[:1])[:, 0] < 0.5)
  if case == 'no_proposals':
    # Only the appended ground truth is left: exactly one positive per object, on its box.
    assert fg.sum() == 2 and bg.sum() == 0
    np.testing.assert_allclose(np.sort(rois[fg], 0), np.sort(boxes[:2], 0))
    np.testing.assert_allclose(targets[fg], 0.0, atol=1e-5)


def test_generate_proposals_matches_numpy_reference():
  rng = np.random.default_rng(1)
  anchors = [rng.uniform(0, 50, (40, 2)), rng.uniform(0, 50, (12, 2))]
  anchors = [np.concatenate([a, a + rng.uniform(5, 40, a.shape)], 1).astype(np.float32)
             for a in anchors]
  obj = [rng.normal(size=(2, len(a))).astype(np.float32) for a in anchors]
  deltas = [rng.normal(scale=0.3, size=(2, len(a), 4)).astype(np.float32) for a in anchors]
  extent = np.array([[60.0, 70.0], [64.0, 48.0]], np.float32)
  boxes, scores, valid = map(np.asarray, jax.jit(lambda o, d, e: rcnn.generate_proposals(
      o, d, anchors, e, pre_nms_top_k=20, post_nms_top_k=30, nms_iou=0.7, min_size=1.0))(
          obj, deltas, jnp.asarray(extent)))
  for b in range(2):
    cand_boxes, cand_scores, cand_level = [], [], []
    for level, (o, d, a) in enumerate(zip(obj, deltas, anchors)):
      top = np.argsort(-o[b], kind='stable')[:20]
      dec = np.array(box_ops.decode_boxes(d[b, top], a[top]))
      dec[:, 0::2] = dec[:, 0::2].clip(0, extent[b, 1])
      dec[:, 1::2] = dec[:, 1::2].clip(0, extent[b, 0])
      ok = ((dec[:, 2] - dec[:, 0]) > 1.0) & ((dec[:, 3] - dec[:, 1]) > 1.0)
      cand_boxes.append(dec[ok])
      cand_scores.append(o[b, top][ok])
      cand_level.append(np.full(ok.sum(), level))
    cb, cs, cl = map(np.concatenate, (cand_boxes, cand_scores, cand_level))
    keep = _np_nms(cb, cs, cl, 0.7)[:30]
    assert valid[b].sum() == len(keep)
    np.testing.assert_allclose(boxes[b, :len(keep)], cb[keep], atol=1e-4)
    np.testing.assert_allclose(scores[b, :len(keep)], cs[keep], atol=1e-6)
    assert np.all(boxes[b, len(keep):] == 0) and not valid[b, len(keep):].any()


def test_detect_per_class_nms_and_threshold():
  num_classes = 3
  proposals = np.array([[[10, 10, 50, 50], [12, 12, 52, 52], [11, 9, 49, 51],
                         [60, 60, 90, 90], [0, 0, 0, 0]]], np.float32)
  valid = np.array([[True, True, True, True, False]])
  logits = np.full((1, 5, num_classes + 1), -10.0, np.float32)
  logits[0, 0, 1] = 5.0        # class 1, the best
  logits[0, 1, 1] = 4.0        # class 1 duplicate of RoI 0: suppressed
  logits[0, 2, 2] = 4.5        # class 2 on the same spot: kept (per-class NMS)
  logits[0, 3, [0, 3]] = [0.0, 3.2]  # class 0 at ~0.04 < 0.05: dropped
  logits[0, 4, 0] = 9.0        # an invalid proposal: never detected
  deltas = np.zeros((1, 5, 4 * num_classes), np.float32)
  pp = ml_collections.ConfigDict(dict(pre_nms_top_k=15, score_threshold=0.05, nms_iou=0.5,
                                      max_detections=4))
  boxes, scores, classes, num = map(np.asarray, jax.jit(
      lambda *a: rcnn.detect(*a, pp))(logits, deltas, proposals, valid,
                                     np.array([[100.0, 100.0]], np.float32)))
  probs = np.asarray(jax.nn.softmax(logits[0], -1))
  assert num[0] == 2
  np.testing.assert_array_equal(classes[0], [1, 2, -1, -1])
  np.testing.assert_allclose(scores[0, :2], [probs[0, 1], probs[2, 2]], rtol=1e-5)
  np.testing.assert_allclose(boxes[0, :2], proposals[0, [0, 2]], atol=1e-4)


@pytest.mark.parametrize('kind', ['roi_pool', 'spp'])
def test_quantised_poolers_read_each_roi_from_its_level(kind):
  rng = np.random.default_rng(0)
  features = {l: jnp.asarray(rng.normal(size=(1, 32 // 2**l, 32 // 2**l, 2)), jnp.float32)
              for l in (2, 3)}
  rois = jnp.asarray([[[2, 2, 8, 7], [0, 0, 31, 30], [5, 10, 30, 25]]], jnp.float32)
  pooler = _model_cfg().pooler
  pooler.type = kind
  pooler.spp_levels = (1, 3)  # Two pyramid levels keep the compile short.
  pooler.canonical_size = 16  # So that these small boxes spread over the levels.
  out = np.asarray(jax.jit(lambda f, r: rcnn.pool_rois(f, r, pooler, min_level=2,
                                                       max_level=3))(features, rois))
  levels = np.asarray(roi_ops.assign_levels(rois, canonical_size=16, min_level=2,
                                            max_level=3))[0]
  assert len(set(levels.tolist())) > 1
  for r, level in enumerate(levels):
    if kind == 'roi_pool':
      ref = roi_ops.roi_pool(features[level], rois, output_size=7, spatial_scale=2.0**-level)
    else:
      ref = roi_ops.spatial_pyramid_pool(features[level], rois, levels=(1, 3),
                                         spatial_scale=2.0**-level)
    np.testing.assert_allclose(out[0, r], np.asarray(ref)[0, r], rtol=1e-6)


def _tiny_config(data_dir):
  c = importlib.import_module('configs.maskrcnn_r50fpn').get_config('runlocal')
  c.data.data_dir = data_dir
  c.global_batch_size = 4
  c.eval_batch_size = 8
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'cosine'
  c.num_train_steps = 100
  return c


def test_tiny_mask_rcnn_trains_compiles_once_and_evaluates(tmp_path):
  c = _tiny_config(str(tmp_path / 'tfds'))
  module, model, tx, schedule, mesh = train.build(c)
  # Real variables without compiling Flax's init (slow on CPU); BN at identity.
  shapes = jax.eval_shape(lambda: train.init_variables(model, c, jax.random.key(0)))
  variables = model_testing.random_variables(shapes)
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}
  replicated = parallel.replicated(mesh)
  state = jax.device_put(state, replicated)
  quick = {'xla_backend_optimization_level': 0}
  step = jax.jit(train.make_train_step(model, module, c, tx, schedule, jax.random.key(1)),
                 in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=quick)
  batch = next(pipeline.train_iterator(c.data, batch_size=4, seed=0))
  assert batch['masks'].shape[1:] == (c.data.max_instances, 28, 28)
  losses, mask_losses = [], []
  for _ in range(8):
    state, metrics = step(state, parallel.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
    mask_losses.append(float(metrics['mask_loss']))
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
  assert mask_losses[-1] < mask_losses[0], mask_losses
  # A batch without objects (and one with only crowd regions) reuses the executable.
  empty = dict(batch, classes=np.full_like(batch['classes'], -1),
               boxes=np.zeros_like(batch['boxes']))
  crowd = dict(batch, is_crowd=batch['classes'] >= 0)
  for other in (empty, crowd):
    state, metrics = step(state, parallel.global_batch(other, mesh))
    assert np.isfinite(float(metrics['loss']))
  assert step._cache_size() == 1

  # Inference and COCO evaluation of boxes and masks, through evaluate's loop.
  def predict(variables, b):
    outputs = model.apply(variables, b['image'], train=False, targets=b)
    return module.postprocess(outputs, b, c)

  predict = jax.jit(predict, in_shardings=(None, parallel.batch_sharding(mesh)),
                    compiler_options=quick)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  metrics = evaluate._evaluate(c, predict, variables, mesh, None)  # pylint: disable=protected-access
  assert metrics['eval/images'] == c.data.num_eval_images
  for key in ('bbox/AP', 'bbox/AP50', 'segm/AP', 'segm/AP50'):
    assert key in metrics and 0.0 <= metrics[key] <= 1.0, metrics
  detections = jax.device_get(predict(variables, parallel.global_batch(
      next(pipeline.eval_iterator(c.data, batch_size=8)), mesh)))
  k = c.model.postprocess.max_detections
  assert detections['boxes'].shape == (8, k, 4) and detections['masks'].shape == (8, k, 28, 28)
  assert np.all((detections['masks'] >= 0) & (detections['masks'] <= 1))
  assert np.all(detections['num'] <= k)


def test_image_extent_prefers_the_pipelines_valid_size():
  batch = {'orig_size': np.array([[100, 50]], np.int32),
           'scale': np.array([[0.64, 0.64]], np.float32),
           'offset': np.array([[0, 0]], np.float32)}
  np.testing.assert_allclose(rcnn.image_extent(batch, (128, 128), 1), [[64, 32]])
  batch['valid_size'] = np.array([[40, 300]], np.float32)
  np.testing.assert_allclose(rcnn.image_extent(batch, (128, 128), 1), [[40, 128]])
  np.testing.assert_allclose(rcnn.image_extent(None, (64, 96), 2), [[64, 96]] * 2)
