"""Faster R-CNN (Ren et al. 2015) and Mask R-CNN (He et al. 2017), with static shapes.

images -> backbone -> neck -> RPN on every level -> proposals -> RoI pooling -> box head
(-> mask head). The family's ideas, each one piece here:

  * R-CNN (Girshick et al. 2014): classify regions and regress their boxes with the
    class-specific coder of weights (10, 10, 5, 5) (`ops/boxes.py`).
  * SPP-net (He et al. 2014) and Fast R-CNN (Girshick 2015): pool every region from one
    shared feature map; the pooler is chosen by `model.pooler.type`: 'spp' (pyramid
    {1, 2, 3, 6}, 50 bins), 'roi_pool' (quantised max bins) or 'roi_align'.
  * Faster R-CNN: a region proposal network (3x3 conv + objectness + deltas) on P2-P6 with
    anchors 32-512 x ratios (0.5, 1, 2), matched at 0.7 / 0.3 with low-quality matches.
  * Mask R-CNN: RoIAlign (aligned=True, as detectron2's ROIAlignV2) from the FPN level
    k = floor(4 + log2(sqrt(wh) / 224)), and a mask head of 4 convs, a 2x deconvolution
    and a 28x28 class-specific sigmoid, trained on the positive RoIs.

Everything keeps one shape inside jit: proposals are a fixed number per image with a
validity mask (per-level top-k, decode, clip, drop empty boxes, NMS 0.7 per level, top-k
over levels), the samplers return fixed-size selections (256 anchors at half positives,
512 RoIs at a quarter positives, IoU >= 0.5, ground truth appended to the proposals,
crowd regions never positive), and inference returns `max_detections` slots with a count.
Proposals are not back-propagated into, as detectron2.

Training randomness (the samplers) comes from the 'sampling' rng stream, so two-stage
targets are built inside `Model.__call__` (DESIGN.md); `loss` and `postprocess` stay pure.
Default hyperparameters are detectron2's R50-FPN (`../shared/reference/rcnn_family.md`
section 3) and live in `configs/rcnn_common.py`.
"""

import math
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.models import layers
from jaxdet.models import necks
from jaxdet.ops import anchors as anchor_ops
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import masks as mask_ops
from jaxdet.ops import matching
from jaxdet.ops import nms as nms_ops
from jaxdet.ops import roi_align as roi_ops
from jaxdet.ops import sampling

# Fast R-CNN's box coder weights; the RPN uses (1, 1, 1, 1) (detectron2 defaults).
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# dw / dh are clamped here before exp when decoding, so an untrained head stays finite.
SCALE_CLAMP = math.log(1000.0 / 16)


# ----------------------------------------------------------------------------- heads


class RPNHead(nn.Module):
  """Faster R-CNN's RPN: 3x3 conv(s) + ReLU, then 1x1 objectness and box deltas.

  Weights are shared over levels (detectron2 `StandardRPNHead`); with `use_norm` every
  conv is followed by a BatchNorm of its own per level (the SpineNet TPU configs'
  `rpn_head.use_batch_norm`), as feature statistics differ by level.
  """
  num_anchors: int = 3
  num_convs: int = 1
  num_filters: int = 256
  use_norm: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[int, jax.Array], *, train: bool):
    """features: {l: [B, H_l, W_l, C]}.

    Returns ({l: [B, H_l*W_l*A]} objectness logits, {l: [B, H_l*W_l*A, 4]} deltas), in the
    order of `anchors[l].reshape(-1, 4)`.
    """
    init = nn.initializers.normal(stddev=0.01)  # detectron2 StandardRPNHead.
    act = layers.activation(self.activation)
    convs = [nn.Conv(self.num_filters, (3, 3), padding='SAME', kernel_init=init,
                     use_bias=not self.use_norm, dtype=self.dtype, name=f'conv{i}')
             for i in range(self.num_convs)]
    objectness = nn.Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype,
                         name='objectness')
    deltas = nn.Conv(4 * self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype,
                     name='deltas')
    obj_out, box_out = {}, {}
    for level in sorted(features):
      x = features[level]
      for i, conv in enumerate(convs):
        x = conv(x)
        if self.use_norm:
          x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                                name=f'norm{i}_l{level}')(x)
        x = act(x)
      b = x.shape[0]
      obj_out[level] = objectness(x).reshape(b, -1).astype(jnp.float32)  # [B, H*W*A]
      box_out[level] = deltas(x).reshape(b, -1, 4).astype(jnp.float32)   # [B, H*W*A, 4]
    return obj_out, box_out


class BoxHead(nn.Module):
  """Fast R-CNN box head: [convs +] FCs, then class logits and class-specific deltas.

  detectron2's FPN head is 2 FCs x 1024 (`num_convs=0, num_fcs=2`); the SpineNet TPU
  configs use 4 convs + 1 FC with BatchNorm (`num_convs=4, num_fcs=1, use_norm=True`).
  Logits have C + 1 entries, background last (detectron2); deltas have 4 per foreground
  class.
  """
  num_classes: int = 80
  num_convs: int = 0
  conv_filters: int = 256
  num_fcs: int = 2
  fc_dims: int = 1024
  use_norm: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled, *, train: bool):
    """pooled: [B, R, S, S, C] (RoIAlign / RoIPool) or [B, R, D] (SPP).

    Returns (logits [B, R, C+1], deltas [B, R, 4C]) in float32.
    """
    act = layers.activation(self.activation)
    b, r = pooled.shape[:2]
    x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
    if self.num_convs and x.ndim != 4:
      raise ValueError('box_head.num_convs > 0 needs spatial RoI features; the SPP pooler '
                       'gives vectors (use num_convs=0).')
    for i in range(self.num_convs):
      x = layers.ConvNormAct(self.conv_filters, 3, use_norm=self.use_norm,
                             activation=self.activation, norm_momentum=self.norm_momentum,
                             norm_epsilon=self.norm_epsilon, dtype=self.dtype,
                             name=f'conv{i}')(x, train=train)
    x = x.reshape(b * r, -1)  # [B*R, S*S*C]
    for i in range(self.num_fcs):
      x = nn.Dense(self.fc_dims, use_bias=not self.use_norm,
                   kernel_init=nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform'),
                   dtype=self.dtype, name=f'fc{i}')(x)
      if self.use_norm:
        x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                              name=f'fc{i}_norm')(x)
      x = act(x)
    # detectron2 FastRCNNOutputLayers: N(0, 0.01) logits, N(0, 0.001) deltas.
    logits = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01),
                      dtype=self.dtype, name='class_logits')(x)
    deltas = nn.Dense(4 * self.num_classes, kernel_init=nn.initializers.normal(0.001),
                      dtype=self.dtype, name='box_deltas')(x)
    return (logits.reshape(b, r, -1).astype(jnp.float32),
            deltas.reshape(b, r, -1).astype(jnp.float32))


class MaskHead(nn.Module):
  """Mask R-CNN's FCN mask head: convs, a 2x2/2 deconvolution, per-class 1x1 logits."""
  num_classes: int = 80
  num_convs: int = 4
  num_filters: int = 256
  use_norm: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled, classes, *, train: bool):
    """pooled: [B, R, S, S, C] RoIAlign features; classes: [B, R] int (clipped to 0..C-1).

    Returns [B, R, 2S, 2S] float32 mask logits of each RoI's own class.
    """
    b, r, s = pooled.shape[:3]
    x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = layers.ConvNormAct(self.num_filters, 3, use_norm=self.use_norm,
                             activation=self.activation, norm_momentum=self.norm_momentum,
                             norm_epsilon=self.norm_epsilon, dtype=self.dtype,
                             name=f'conv{i}')(x, train=train)
    x = nn.ConvTranspose(self.num_filters, (2, 2), strides=(2, 2), padding='VALID',
                         use_bias=not self.use_norm, kernel_init=layers.conv_kernel_init,
                         dtype=self.dtype, name='deconv')(x)
    if self.use_norm:
      x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                            name='deconv_norm')(x)
    x = layers.activation(self.activation)(x)
    # detectron2 MaskRCNNConvUpsampleHead: predictor N(0, 0.001).
    logits = nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.001),
                     dtype=self.dtype, name='mask_logits')(x)  # [B*R, 2S, 2S, C]
    logits = logits.reshape(b, r, 2 * s, 2 * s, self.num_classes)
    cls = jnp.clip(classes, 0, self.num_classes - 1)
    picked = jnp.take_along_axis(logits, cls[:, :, None, None, None], axis=-1)[..., 0]
    return picked.astype(jnp.float32)  # [B, R, 2S, 2S]


# ----------------------------------------------------------------------------- anchors, RPN


def anchors_by_level(image_shape, model_cfg):
  """{l: [H_l, W_l, A, 4]} input-pixel anchors of the RPN levels (sizes 32..512 on P2..P6)."""
  return anchor_ops.generate_anchors(
      tuple(image_shape), min_level=model_cfg.min_level, max_level=model_cfg.max_level,
      num_scales=model_cfg.anchor.num_scales,
      aspect_ratios=tuple(model_cfg.anchor.aspect_ratios),
      anchor_size=model_cfg.anchor.anchor_size)


def image_extent(targets, image_shape, batch_size):
  """[B, 2] float32 (height, width) of each image's content in input pixels.

  input = original * scale - offset (DESIGN.md), so the content ends at
  orig_size * scale - offset, within the padded canvas; the pipeline's `valid_size` says
  so directly (and also after a crop window, where the formula overestimates). Without a batch (a bare forward
  pass) the canvas is used.
  """
  canvas = jnp.asarray(image_shape, jnp.float32)[None]
  if targets is not None and 'valid_size' in targets:
    return jnp.clip(jnp.asarray(targets['valid_size'], jnp.float32), 0.0, canvas)
  if targets is None or 'orig_size' not in targets:
    return jnp.broadcast_to(canvas, (batch_size, 2))
  content = (jnp.asarray(targets['orig_size'], jnp.float32) * targets['scale']
             - targets['offset'])
  return jnp.clip(content, 0.0, canvas)


def rpn_targets(key, anchors, gt_boxes, gt_classes, gt_crowd, model_cfg):
  """Labels and sampled anchors of one image for the RPN loss.

  Args:
    key: PRNG key of the sampler.
    anchors: [A, 4] input pixels.
    gt_boxes: [N, 4] input pixels; gt_classes: [N] (-1 padding); gt_crowd: [N] bool.
    model_cfg: config.model (rpn.* thresholds and sampler sizes).

  Returns:
    index [S] int32 sampled anchors, label [S] int32 (1 object, 0 background, -1 unfilled
    slot), box_targets [S, 4] encoded (1, 1, 1, 1) deltas of the matched ground truth.
  """
  rpn = model_cfg.rpn
  gt_valid = gt_classes >= 0
  iou = box_ops.pairwise_iou(anchors, gt_boxes)  # [A, N]
  matched, labels = matching.argmax_match(
      iou, gt_valid, positive_threshold=rpn.positive_threshold,
      negative_threshold=rpn.negative_threshold, allow_low_quality=rpn.allow_low_quality,
      gt_ignore=gt_crowd & gt_valid)
  index, label, valid = sampling.sample_fixed(
      key, labels, num_samples=rpn.batch_size_per_image,
      positive_fraction=rpn.positive_fraction)
  label = jnp.where(valid, label, -1)
  box_targets = box_ops.encode_boxes(gt_boxes[matched[index]], anchors[index],
                                     RPN_BOX_WEIGHTS)
  return index, label, box_targets


def generate_proposals(objectness, deltas, anchors, extent, *, pre_nms_top_k,
                       post_nms_top_k, nms_iou, min_size):
  """Faster R-CNN proposals with a fixed count per image (detectron2 `find_top_rpn_proposals`).

  Per level: the top `pre_nms_top_k` anchors by objectness are decoded, clipped to the
  image and those not wider and taller than `min_size` dropped; NMS at `nms_iou` runs per
  level (the level is the NMS "class"); the best `post_nms_top_k` survivors over all levels
  are kept, in descending score order.

  Args:
    objectness: list over levels of [B, n_l] logits.
    deltas: list over levels of [B, n_l, 4].
    anchors: list over levels of [n_l, 4] input pixels.
    extent: [B, 2] (height, width) image content in input pixels (clip bounds).
    pre_nms_top_k, post_nms_top_k: static counts; nms_iou: float; min_size: pixels.

  Returns:
    boxes [B, P, 4] input pixels (zeros where invalid), scores [B, P] logits (-inf where
    invalid), valid [B, P] bool, P = post_nms_top_k.
  """
  cand_boxes, cand_scores, cand_level = [], [], []
  for level, (obj, delta, anc) in enumerate(zip(objectness, deltas, anchors)):
    score, idx = nms_ops.top_k(obj, pre_nms_top_k)  # [B, k], padded with -inf / -1
    safe = jnp.maximum(idx, 0)
    d = jnp.take_along_axis(delta, safe[..., None], axis=1)  # [B, k, 4]
    boxes = box_ops.decode_boxes(d, jnp.asarray(anc)[safe], RPN_BOX_WEIGHTS, SCALE_CLAMP)
    boxes = box_ops.clip_boxes(boxes, extent[:, 0, None], extent[:, 1, None])
    cand_boxes.append(boxes)
    cand_scores.append(score)
    cand_level.append(jnp.full(score.shape, level, jnp.int32))
  boxes = jnp.concatenate(cand_boxes, 1)    # [B, K, 4]
  scores = jnp.concatenate(cand_scores, 1)  # [B, K]
  levels = jnp.concatenate(cand_level, 1)   # [B, K]
  width = boxes[..., 2] - boxes[..., 0]
  height = boxes[..., 3] - boxes[..., 1]
  valid = (width > min_size) & (height > min_size) & jnp.isfinite(scores)
  keep, _ = nms_ops.batched_nms(boxes, scores, levels, iou_threshold=nms_iou,
                                max_output=post_nms_top_k, valid=valid)
  ok = keep >= 0
  safe = jnp.maximum(keep, 0)
  boxes = jnp.where(ok[..., None], jnp.take_along_axis(boxes, safe[..., None], 1), 0.0)
  scores = jnp.where(ok, jnp.take_along_axis(scores, safe, 1), -jnp.inf)
  return boxes, scores, ok


# ----------------------------------------------------------------------------- RoI heads


def sample_rois(key, proposals, proposal_valid, gt_boxes, gt_classes, gt_crowd, model_cfg):
  """Fast R-CNN training RoIs of one image (detectron2 `label_and_sample_proposals`).

  Ground truth (not crowd) is appended to the proposals; each RoI takes the class of its
  best-overlapping ground truth at IoU >= fg_iou and background below; RoIs overlapping a
  crowd region by >= fg_iou that match nothing are ignored, so crowds are never positive
  and never background; a fixed-size sample at `positive_fraction` is drawn.

  Args:
    key: PRNG key.
    proposals: [P, 4] input pixels; proposal_valid: [P] bool.
    gt_boxes: [N, 4]; gt_classes: [N] (-1 padding); gt_crowd: [N] bool.
    model_cfg: config.model (roi_sampler.*, num_classes).

  Returns:
    rois [S, 4], classes [S] int32 (0..C-1 object, C background, -1 unfilled slot),
    box_targets [S, 4] (10, 10, 5, 5) deltas, matched [S] int32 ground-truth index.
  """
  cfg = model_cfg.roi_sampler
  gt_valid = gt_classes >= 0
  boxes, valid = proposals, proposal_valid
  if cfg.add_gt_as_proposals:
    boxes = jnp.concatenate([proposals, gt_boxes], 0)  # [P+N, 4]
    valid = jnp.concatenate([proposal_valid, gt_valid & ~gt_crowd], 0)
  iou = box_ops.pairwise_iou(boxes, gt_boxes)  # [P+N, N]
  matched, labels = matching.argmax_match(
      iou, gt_valid, positive_threshold=cfg.fg_iou_threshold,
      negative_threshold=cfg.fg_iou_threshold, allow_low_quality=False,
      gt_ignore=gt_crowd & gt_valid)
  labels = jnp.where(valid, labels, matching.IGNORE)
  index, label, ok = sampling.sample_fixed(
      key, labels, num_samples=cfg.num_samples, positive_fraction=cfg.positive_fraction)
  ok = ok & (label >= 0)
  rois = boxes[index]
  matched = matched[index]
  classes = jnp.where(label == 1, gt_classes[matched], model_cfg.num_classes)
  classes = jnp.where(ok, classes, -1).astype(jnp.int32)
  box_targets = box_ops.encode_boxes(gt_boxes[matched], rois, ROI_BOX_WEIGHTS)
  return rois, classes, box_targets, matched.astype(jnp.int32)


def pool_rois(features, rois, pooler, *, min_level, max_level):
  """RoI features with the configured pooler.

  'roi_align': multilevel RoIAlign (one gather over the stacked levels). 'roi_pool' and
  'spp': each RoI is pooled from its assigned level (the same FPN rule; a single level
  when min_level == max_level, as SPP-net / Fast R-CNN on one conv map); their bin
  windows are bounded by the level's size, which keeps them exact.

  Args:
    features: {l: [B, H_l, W_l, C]}.
    rois: [B, R, 4] input pixels.
    pooler: config dict (type, output_size, sampling_ratio, aligned, canonical_size,
      canonical_level, spp_levels).
    min_level, max_level: levels to pool from.

  Returns:
    [B, R, S, S, C] ('roi_align', 'roi_pool') or [B, R, sum(n^2) * C] ('spp').
  """
  rois = jax.lax.stop_gradient(rois)
  kind = pooler.type
  level_args = dict(canonical_size=pooler.canonical_size,
                    canonical_level=pooler.canonical_level)
  if kind == 'roi_align':
    return roi_ops.multilevel_roi_align(
        features, rois, output_size=pooler.output_size,
        sampling_ratio=pooler.sampling_ratio, aligned=pooler.aligned,
        min_level=min_level, max_level=max_level, **level_args)
  if kind not in ('roi_pool', 'spp'):
    raise ValueError(f"pooler.type={kind!r}; use 'roi_align', 'roi_pool' or 'spp'.")
  assigned = roi_ops.assign_levels(rois, min_level=min_level, max_level=max_level,
                                   **level_args)  # [B, R]
  out = None
  for level in range(min_level, max_level + 1):
    f = features[level]
    extent = max(f.shape[1], f.shape[2])
    if kind == 'roi_pool':
      s = pooler.output_size
      # A bin spans at most ceil((extent + 1) / S) + 1 cells (torchvision's bounds).
      p = roi_ops.roi_pool(f, rois, output_size=s, spatial_scale=2.0**-level,
                           max_bin_size=-(-(extent + 1) // s) + 1)
    else:
      # Level n's window is ceil(a / n) <= ceil(extent / n) cells.
      p = jnp.concatenate([
          roi_ops.spatial_pyramid_pool(f, rois, levels=(n,), spatial_scale=2.0**-level,
                                       max_bin_size=-(-extent // n) + 1)
          for n in pooler.spp_levels], axis=-1)
    chosen = (assigned == level).reshape(assigned.shape + (1,) * (p.ndim - 2))
    out = jnp.where(chosen, p, 0) if out is None else jnp.where(chosen, p, out)
  return out


def detect(logits, deltas, proposals, proposal_valid, extent, postprocess_cfg):
  """Fast R-CNN inference: class-specific boxes, score threshold, per-class NMS, top-K.

  Args:
    logits: [B, R, C+1] (background last); deltas: [B, R, 4C].
    proposals: [B, R, 4] input pixels; proposal_valid: [B, R] bool.
    extent: [B, 2] (height, width) clip bounds in input pixels.
    postprocess_cfg: score_threshold, nms_iou, max_detections, pre_nms_top_k (candidate
      (RoI, class) pairs kept by score before NMS).

  Returns:
    boxes [B, K, 4] input pixels, scores [B, K], classes [B, K] int32 (-1 padding),
    num [B] int32, K = max_detections.
  """
  pp = postprocess_cfg
  b, r, c1 = logits.shape
  c = c1 - 1
  probs = jax.nn.softmax(logits, axis=-1)[..., :c]  # [B, R, C]
  probs = jnp.where(proposal_valid[..., None], probs, 0.0)
  boxes = box_ops.decode_boxes(deltas.reshape(b, r, c, 4), proposals[:, :, None],
                               ROI_BOX_WEIGHTS, SCALE_CLAMP)  # [B, R, C, 4]
  boxes = box_ops.clip_boxes(boxes, extent[:, 0, None, None], extent[:, 1, None, None])
  scores = probs.reshape(b, r * c)
  boxes = boxes.reshape(b, r * c, 4)
  top, idx = nms_ops.top_k(scores, pp.pre_nms_top_k)  # [B, k]
  safe = jnp.maximum(idx, 0)
  cand = jnp.take_along_axis(boxes, safe[..., None], 1)
  cand_class = safe % c
  nonempty = (cand[..., 2] > cand[..., 0]) & (cand[..., 3] > cand[..., 1])
  valid = (idx >= 0) & (top > pp.score_threshold) & nonempty
  keep, num = nms_ops.batched_nms(cand, top, cand_class, iou_threshold=pp.nms_iou,
                                  max_output=pp.max_detections, valid=valid)
  ok = keep >= 0
  safe = jnp.maximum(keep, 0)
  det_boxes = jnp.where(ok[..., None], jnp.take_along_axis(cand, safe[..., None], 1), 0.0)
  det_scores = jnp.where(ok, jnp.take_along_axis(top, safe, 1), 0.0)
  det_classes = jnp.where(ok, jnp.take_along_axis(cand_class, safe, 1), -1)
  return det_boxes, det_scores, det_classes.astype(jnp.int32), num.astype(jnp.int32)


def select_positives(classes, num_classes, count):
  """The first `count` positive RoIs of each image (mask head training).

  Args:
    classes: [B, S] int32 from `sample_rois` (0..C-1 positive).
    num_classes: C.
    count: static number of slots (the sampler's maximum number of positives).

  Returns:
    index [B, count] int32 into S, valid [B, count] bool.
  """
  positive = (classes >= 0) & (classes < num_classes)
  # Stable sort puts positives first, in sampler order.
  order = jnp.argsort(~positive, axis=1, stable=True)[:, :count].astype(jnp.int32)
  return order, jnp.take_along_axis(positive, order, 1)


# ----------------------------------------------------------------------------- the model


class Model(nn.Module):
  """Faster / Mask R-CNN. `config` is the experiment config."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images, *, train: bool, targets=None) -> Dict[str, jax.Array]:
    """images: [B, H, W, 3] normalised; targets: the batch (ground truth read when train).

    Returns float32 raw outputs. Always: rpn_objectness [B, A_total], rpn_deltas
    [B, A_total, 4] (anchors in level order, `anchors_by_level`).
    train=True adds rpn_index/rpn_label/rpn_box_targets [B, 256(, 4)] (sampled anchors),
    roi_logits [B, S, C+1], roi_deltas [B, S, 4C], roi_classes, roi_box_targets, and with
    masks mask_logits [B, P, 28, 28], mask_rois [B, P, 4], mask_matched, mask_valid.
    train=False adds det_boxes [B, K, 4] input pixels, det_scores, det_classes, det_num
    and with masks det_masks [B, K, 28, 28] probabilities of the detected class.
    """
    cfg = self.config.model
    dtype = jnp.dtype(self.config.dtype)
    norm = dict(norm_momentum=self.config.norm.momentum,
                norm_epsilon=self.config.norm.epsilon, dtype=dtype)
    act = cfg.get('activation', 'relu')
    features = backbones.build(cfg, dtype)(images.astype(dtype), train=train)
    neck = necks.build(cfg, dtype)
    if neck is not None:
      features = neck(features, train=train)
    batch_size = images.shape[0]
    image_shape = images.shape[1:3]

    # ---- Region proposal network.
    by_level = anchors_by_level(image_shape, cfg)
    levels = sorted(by_level)
    num_anchors = cfg.anchor.num_scales * len(cfg.anchor.aspect_ratios)
    obj, deltas = RPNHead(num_anchors=num_anchors, activation=act, **norm,
                          **cfg.rpn.head.to_dict(), name='rpn')(
                              {l: features[l] for l in levels}, train=train)
    outputs = {'rpn_objectness': jnp.concatenate([obj[l] for l in levels], 1),
               'rpn_deltas': jnp.concatenate([deltas[l] for l in levels], 1)}
    extent = image_extent(targets, image_shape, batch_size)
    mode = 'train' if train else 'test'
    proposals, _, proposal_valid = generate_proposals(
        [jax.lax.stop_gradient(obj[l]) for l in levels],
        [jax.lax.stop_gradient(deltas[l]) for l in levels],
        [by_level[l].reshape(-1, 4) for l in levels], extent,
        pre_nms_top_k=cfg.rpn[f'pre_nms_top_k_{mode}'],
        post_nms_top_k=cfg.rpn[f'post_nms_top_k_{mode}'],
        nms_iou=cfg.rpn.nms_iou, min_size=cfg.rpn.min_size)

    # ---- RoI heads.
    pool_levels = dict(min_level=cfg.roi_min_level, max_level=cfg.roi_max_level)
    box_head = BoxHead(num_classes=cfg.num_classes, activation=act, **norm,
                       **cfg.box_head.to_dict(), name='box_head')
    with_masks = cfg.mask_head.enabled
    if with_masks:
      mask_head_cfg = {k: v for k, v in cfg.mask_head.to_dict().items()
                       if k not in ('enabled', 'pooler_size', 'sampling_ratio')}
      mask_head = MaskHead(num_classes=cfg.num_classes, activation=act, **norm,
                           **mask_head_cfg, name='mask_head')
      mask_pooler = ml_collections.ConfigDict(dict(
          cfg.pooler.to_dict(), type='roi_align', output_size=cfg.mask_head.pooler_size,
          sampling_ratio=cfg.mask_head.sampling_ratio))

    if train:
      if targets is None:
        raise ValueError('rcnn.Model(train=True) needs targets (the batch) for sampling.')
      key_rpn, key_roi = jax.random.split(self.make_rng('sampling'))
      gt = (targets['boxes'], targets['classes'], targets['is_crowd'])
      flat_anchors = jnp.asarray(anchor_ops.flatten_anchors(by_level))
      rpn_index, rpn_label, rpn_box = jax.vmap(
          rpn_targets, in_axes=(0, None, 0, 0, 0, None))(
              jax.random.split(key_rpn, batch_size), flat_anchors, *gt, cfg)
      rois, roi_classes, roi_box, roi_matched = jax.vmap(
          sample_rois, in_axes=(0, 0, 0, 0, 0, 0, None))(
              jax.random.split(key_roi, batch_size), proposals, proposal_valid, *gt, cfg)
      roi_logits, roi_deltas = box_head(pool_rois(features, rois, cfg.pooler, **pool_levels),
                                        train=train)
      outputs.update(rpn_index=rpn_index, rpn_label=rpn_label, rpn_box_targets=rpn_box,
                     roi_logits=roi_logits, roi_deltas=roi_deltas, roi_classes=roi_classes,
                     roi_box_targets=roi_box)
      if with_masks:
        count = int(cfg.roi_sampler.num_samples * cfg.roi_sampler.positive_fraction)
        pos, pos_valid = select_positives(roi_classes, cfg.num_classes, count)
        mask_rois = jnp.take_along_axis(rois, pos[..., None], 1)  # [B, P, 4]
        mask_classes = jnp.take_along_axis(roi_classes, pos, 1)
        pooled = pool_rois(features, mask_rois, mask_pooler, **pool_levels)
        outputs.update(
            mask_logits=mask_head(pooled, mask_classes, train=train), mask_rois=mask_rois,
            mask_matched=jnp.take_along_axis(roi_matched, pos, 1), mask_valid=pos_valid)
      return outputs

    roi_logits, roi_deltas = box_head(
        pool_rois(features, proposals, cfg.pooler, **pool_levels), train=train)
    det_boxes, det_scores, det_classes, det_num = detect(
        roi_logits, roi_deltas, proposals, proposal_valid, extent, cfg.postprocess)
    outputs.update(det_boxes=det_boxes, det_scores=det_scores, det_classes=det_classes,
                   det_num=det_num)
    if with_masks:
      pooled = pool_rois(features, det_boxes, mask_pooler, **pool_levels)
      outputs['det_masks'] = jax.nn.sigmoid(mask_head(pooled, det_classes, train=train))
    return outputs


# ----------------------------------------------------------------------------- loss


def loss(outputs, batch, config):
  """RPN + Fast R-CNN (+ mask) losses, detectron2's normalisation.

  RPN: sigmoid cross entropy over the sampled anchors and L1 (smooth-L1 beta 0) over the
  positive ones, both divided by 256 x images. Box head: softmax cross entropy averaged
  over the sampled RoIs; L1 on the deltas of the ground-truth class of positive RoIs,
  divided by the number of sampled RoIs. Mask: per-pixel sigmoid cross entropy of the
  ground-truth class, averaged over the positive RoIs' 28x28 pixels; targets are the
  box-relative instance masks resampled into each RoI and binarised at 0.5.

  Returns (scalar loss, metrics dict).
  """
  cfg = config.model
  f32 = jnp.float32

  # RPN.
  label = outputs['rpn_label']  # [B, S]
  index = outputs['rpn_index']
  logits = jnp.take_along_axis(outputs['rpn_objectness'], index, 1)
  deltas = jnp.take_along_axis(outputs['rpn_deltas'], index[..., None], 1)
  sampled = (label >= 0).astype(f32)
  positive = (label == 1).astype(f32)
  rpn_norm = float(cfg.rpn.batch_size_per_image * label.shape[0])
  rpn_cls = (losses.sigmoid_cross_entropy(logits, positive) * sampled).sum() / rpn_norm
  rpn_l1 = losses.smooth_l1_loss(deltas, outputs['rpn_box_targets'],
                                 beta=cfg.loss.rpn_smooth_l1_beta).sum(-1)
  rpn_box = (rpn_l1 * positive).sum() / rpn_norm

  # Box head.
  classes = outputs['roi_classes']  # [B, S], C background, -1 unfilled
  valid = (classes >= 0).astype(f32)
  num_rois = jnp.maximum(valid.sum(), 1.0)
  roi_cls = losses.softmax_cross_entropy(outputs['roi_logits'], classes).sum() / num_rois
  fg = (classes >= 0) & (classes < cfg.num_classes)
  b, s = classes.shape
  per_class = outputs['roi_deltas'].reshape(b, s, cfg.num_classes, 4)
  pred = jnp.take_along_axis(
      per_class, jnp.clip(classes, 0, cfg.num_classes - 1)[..., None, None], 2)[:, :, 0]
  roi_l1 = losses.smooth_l1_loss(pred, outputs['roi_box_targets'],
                                 beta=cfg.loss.roi_smooth_l1_beta).sum(-1)
  roi_box = (roi_l1 * fg).sum() / num_rois

  metrics = {'rpn_cls_loss': rpn_cls, 'rpn_box_loss': rpn_box, 'roi_cls_loss': roi_cls,
             'roi_box_loss': roi_box, 'num_fg_rois': fg.sum() / b,
             'num_rpn_positives': positive.sum() / b}
  total = rpn_cls + rpn_box + roi_cls + roi_box
  if cfg.mask_head.enabled:
    mask_logits = outputs['mask_logits']  # [B, P, M, M]
    targets = jax.vmap(lambda m, gb, r, i: mask_ops.mask_targets(
        m, gb, r, i, output_size=mask_logits.shape[-1]))(
            batch['masks'], batch['boxes'], outputs['mask_rois'], outputs['mask_matched'])
    mvalid = outputs['mask_valid'].astype(f32)
    bce = losses.sigmoid_cross_entropy(mask_logits, targets).mean((-2, -1))  # [B, P]
    mask = (bce * mvalid).sum() / jnp.maximum(mvalid.sum(), 1.0)
    metrics['mask_loss'] = mask
    total = total + mask
  return total, metrics


# ----------------------------------------------------------------------------- postprocess


def postprocess(outputs, batch, config):
  """Detections (DESIGN.md): boxes [B, K, 4] original-image pixels, scores [B, K], classes
  [B, K] int32 (-1 padding), num [B], and with a mask head masks [B, K, 28, 28] box-relative
  probabilities. NMS already ran inside the model (the mask head needs the final boxes)."""
  valid = outputs['det_classes'] >= 0
  boxes = box_ops.to_original_pixels(outputs['det_boxes'], batch)
  out = {'boxes': jnp.where(valid[..., None], boxes, 0.0),
         'scores': outputs['det_scores'], 'classes': outputs['det_classes'],
         'num': outputs['det_num']}
  if 'det_masks' in outputs:
    out['masks'] = jnp.where(valid[..., None, None], outputs['det_masks'], 0.0)
  return out

