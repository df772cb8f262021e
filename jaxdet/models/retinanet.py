"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017).

images -> backbone -> (neck) -> shared class/box towers on P3..P7 -> per-anchor logits and box
deltas. Target assignment, the focal/Huber loss and post-processing are the pure functions
`loss` and `postprocess` below. The defaults are the SpineNet paper's RetinaNet: focal
gamma 1.5, Huber delta 0.1 with weight 50, 9 anchors per location, per-level BatchNorm in
the head, pre-NMS top-k 5000, score 0.05, NMS 0.5, 100 detections
(`../shared/reference/spinenet.md` sections 3.3-3.4 of the project's design notes).
"""

import math
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdet import losses
from jaxdet.ops import anchors as anchor_ops
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import matching
from jaxdet.ops import nms as nms_ops
from jaxdet.models import backbones
from jaxdet.models import layers
from jaxdet.models import necks


def num_anchors_per_location(model_cfg) -> int:
  return model_cfg.anchor.num_scales * len(model_cfg.anchor.aspect_ratios)


class RetinaNetHead(nn.Module):
  """Class and box towers shared over levels, BatchNorm per level.

  The TPU reference shares conv weights across levels but keeps one BatchNorm per level
  (`level_specific_norm`), because feature statistics differ by level.
  """
  num_classes: int
  num_anchors: int = 9
  num_convs: int = 4
  num_filters: int = 256
  level_specific_norm: bool = True
  prior_prob: float = 0.01
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[int, jnp.ndarray], *, train: bool):
    """features: level -> [B, H_l, W_l, C]. Returns ({level: [B, H_l*W_l*A, K]}, {level: [..., 4]})."""
    act = layers.activation(self.activation)
    tower_init = nn.initializers.normal(stddev=0.01)
    pred_init = nn.initializers.normal(stddev=1e-5)
    bias_prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)

    def tower(prefix):
      convs = [nn.Conv(self.num_filters, (3, 3), padding='SAME', kernel_init=tower_init,
                       dtype=self.dtype, name=f'{prefix}_conv{i}')
               for i in range(self.num_convs)]
      def norm(i, level):
        suffix = f'_l{level}' if self.level_specific_norm else ''
        return nn.BatchNorm(use_running_average=not train, momentum=self.norm_momentum,
                            epsilon=self.norm_epsilon, dtype=self.dtype,
                            name=f'{prefix}_norm{i}{suffix}')
      return convs, norm

    cls_convs, cls_norm = tower('class')
    box_convs, box_norm = tower('box')
    cls_pred = nn.Conv(self.num_anchors * self.num_classes, (3, 3), padding='SAME',
                       kernel_init=pred_init,
                       bias_init=nn.initializers.constant(bias_prior),
                       dtype=self.dtype, name='class_predict')
    box_pred = nn.Conv(self.num_anchors * 4, (3, 3), padding='SAME', kernel_init=pred_init,
                       dtype=self.dtype, name='box_predict')

    class_out, box_out = {}, {}
    for level in sorted(features):
      x = features[level]
      batch = x.shape[0]
      y = x
      for i, conv in enumerate(cls_convs):
        y = act(cls_norm(i, level)(conv(y)))
      # [B, H, W, A*K] -> [B, H*W*A, K], the order of anchors[level].reshape(-1, 4).
      class_out[level] = cls_pred(y).reshape(batch, -1, self.num_classes)
      y = x
      for i, conv in enumerate(box_convs):
        y = act(box_norm(i, level)(conv(y)))
      box_out[level] = box_pred(y).reshape(batch, -1, 4)
    return class_out, box_out


class Model(nn.Module):
  """RetinaNet: backbone -> neck -> head. `config` is the experiment config."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images, *, train: bool, targets=None) -> Dict[str, jnp.ndarray]:
    """images: [B, H, W, 3] normalised. Returns raw outputs in float32:

    cls_logits: [B, total_anchors, num_classes]
    box_deltas: [B, total_anchors, 4] (dx, dy, dw, dh) relative to the anchors.
    Anchors are in level order min_level..max_level (see `anchors_for`).
    """
    del targets  # One-stage: assignment happens in `loss`.
    cfg = self.config.model
    dtype = jnp.dtype(self.config.dtype)
    features = backbones.build(cfg, dtype)(images.astype(dtype), train=train)
    neck = necks.build(cfg, dtype)
    if neck is not None:
      features = neck(features, train=train)
    features = {l: features[l] for l in range(cfg.min_level, cfg.max_level + 1)}
    head = RetinaNetHead(
        num_classes=cfg.num_classes,
        num_anchors=num_anchors_per_location(cfg),
        activation=cfg.get('activation', 'relu'),
        norm_momentum=self.config.norm.momentum,
        norm_epsilon=self.config.norm.epsilon,
        dtype=dtype,
        **cfg.head.to_dict(),
        name='head')
    class_out, box_out = head(features, train=train)
    levels = sorted(class_out)
    return {
        'cls_logits': jnp.concatenate([class_out[l] for l in levels], 1).astype(jnp.float32),
        'box_deltas': jnp.concatenate([box_out[l] for l in levels], 1).astype(jnp.float32),
    }


def anchors_by_level(image_shape, model_cfg):
  """Static anchors per level, {level: [H_l, W_l, A, 4]} input pixels, for an [H, W] canvas."""
  return anchor_ops.generate_anchors(
      tuple(image_shape), min_level=model_cfg.min_level, max_level=model_cfg.max_level,
      num_scales=model_cfg.anchor.num_scales,
      aspect_ratios=tuple(model_cfg.anchor.aspect_ratios),
      anchor_size=model_cfg.anchor.anchor_size)


def anchors_for(image_shape, model_cfg) -> np.ndarray:
  """Static anchors [total_anchors, 4] (x1, y1, x2, y2) input pixels, in the outputs' order."""
  return anchor_ops.flatten_anchors(anchors_by_level(image_shape, model_cfg))


def assign_targets(anchors, gt_boxes, gt_classes, gt_crowd, model_cfg):
  """Anchor labels for one image.

  anchors: [A, 4]; gt_boxes: [N, 4] input pixels; gt_classes: [N] (-1 padding);
  gt_crowd: [N] bool. Returns (labels [A] int32 in {1, 0, -1}, class_ids [A] int32,
  box_targets [A, 4] encoded deltas).
  """
  gt_valid = gt_classes >= 0
  iou = box_ops.pairwise_iou(anchors, gt_boxes)  # [A, N]
  matched, labels = matching.argmax_match(
      iou, gt_valid,
      positive_threshold=model_cfg.matcher.positive_threshold,
      negative_threshold=model_cfg.matcher.negative_threshold,
      allow_low_quality=model_cfg.matcher.allow_low_quality,
      gt_ignore=gt_crowd & gt_valid)
  class_ids = jnp.where(labels == 1, gt_classes[matched], -1)
  box_targets = box_ops.encode_boxes(gt_boxes[matched], anchors)
  return labels, class_ids, box_targets


def loss(outputs, batch, config):
  """Focal classification loss + Huber box loss, normalised by the positive count.

  Both are divided by (number of positive anchors in the global batch + 1), the box loss
  also by 4 (coordinates), as the TPU RetinaNet; the box loss is weighted by `box_weight`.
  Returns (scalar loss, metrics dict).
  """
  cfg = config.model
  cls_logits, box_deltas = outputs['cls_logits'], outputs['box_deltas']
  anchors = jnp.asarray(anchors_for(batch['image'].shape[1:3], cfg))
  labels, class_ids, box_targets = jax.vmap(
      assign_targets, in_axes=(None, 0, 0, 0, None))(
          anchors, batch['boxes'], batch['classes'], batch['is_crowd'], cfg)
  positive = (labels == 1).astype(jnp.float32)                        # [B, A]
  not_ignored = (labels != -1).astype(jnp.float32)                    # [B, A]
  num_positives = positive.sum()
  normalizer = num_positives + 1.0

  onehot = jax.nn.one_hot(class_ids, cfg.num_classes, dtype=jnp.float32)  # -1 -> zeros
  focal = losses.sigmoid_focal_loss(cls_logits, onehot, alpha=cfg.loss.focal_alpha,
                                    gamma=cfg.loss.focal_gamma)
  cls_loss = (focal.sum(-1) * not_ignored).sum() / normalizer
  huber = losses.huber_loss(box_deltas, box_targets, delta=cfg.loss.huber_delta)
  box_loss = (huber.sum(-1) * positive).sum() / (4.0 * normalizer)
  total = cls_loss + cfg.loss.box_weight * box_loss
  return total, {'cls_loss': cls_loss, 'box_loss': box_loss,
                 'num_positives': num_positives / labels.shape[0]}


def postprocess(outputs, batch, config):
  """Per-level top-k, decode, score threshold, class-aware NMS, top `max_detections`.

  Returns boxes [B, K, 4] (original-image pixels), scores [B, K], classes [B, K] int32,
  num [B] int32 (valid detections, the rest are padding with score 0 and class -1).
  """
  cfg = config.model
  pp = cfg.postprocess
  image_shape = batch['image'].shape[1:3]
  by_level = anchors_by_level(image_shape, cfg)
  sizes = anchor_ops.level_sizes(by_level)
  anchors = jnp.asarray(anchor_ops.flatten_anchors(by_level))
  scores = jax.nn.sigmoid(outputs['cls_logits'])               # [B, A, C]
  deltas = outputs['box_deltas']
  batch_size, _, num_classes = scores.shape

  cand_scores, cand_anchor, cand_class = [], [], []
  start = 0
  for size in sizes:
    level_scores = scores[:, start:start + size].reshape(batch_size, -1)  # [B, size*C]
    k = min(pp.pre_nms_top_k, level_scores.shape[1])
    top, idx = jax.lax.top_k(level_scores, k)
    cand_scores.append(top)
    cand_anchor.append(idx // num_classes + start)
    cand_class.append(idx % num_classes)
    start += size
  cand_scores = jnp.concatenate(cand_scores, 1)
  cand_anchor = jnp.concatenate(cand_anchor, 1)
  cand_class = jnp.concatenate(cand_class, 1)
  if cand_scores.shape[1] > pp.pre_nms_top_k:
    cand_scores, keep = jax.lax.top_k(cand_scores, pp.pre_nms_top_k)
    cand_anchor = jnp.take_along_axis(cand_anchor, keep, 1)
    cand_class = jnp.take_along_axis(cand_class, keep, 1)

  cand_deltas = jnp.take_along_axis(deltas, cand_anchor[..., None], 1)   # [B, K', 4]
  cand_boxes = box_ops.decode_boxes(cand_deltas, anchors[cand_anchor])
  cand_boxes = box_ops.clip_boxes(cand_boxes, float(image_shape[0]), float(image_shape[1]))
  valid = cand_scores > pp.score_threshold
  keep, num = nms_ops.batched_nms(
      cand_boxes, cand_scores, None if pp.class_agnostic else cand_class,
      iou_threshold=pp.nms_iou, max_output=pp.max_detections, valid=valid)
  is_valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  det_boxes = jnp.take_along_axis(cand_boxes, safe[..., None], 1)
  det_scores = jnp.where(is_valid, jnp.take_along_axis(cand_scores, safe, 1), 0.0)
  det_classes = jnp.where(is_valid, jnp.take_along_axis(cand_class, safe, 1), -1)
  det_boxes = jnp.where(is_valid[..., None], box_ops.to_original_pixels(det_boxes, batch), 0.0)
  return {'boxes': det_boxes, 'scores': det_scores, 'classes': det_classes.astype(jnp.int32),
          'num': num.astype(jnp.int32)}
