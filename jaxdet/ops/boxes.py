"""Box arithmetic: conversions, IoU / GIoU matrices, clipping and the box coder.

The one internal box convention of jaxdet: a box is float32 corners
`(x1, y1, x2, y2)` in continuous pixel coordinates, where pixel (i, j) (row i,
column j) covers `[j, j + 1) x [i, i + 1)`. A box covering exactly pixel (0, 0)
is `(0, 0, 1, 1)`; width is `x2 - x1` with no legacy "+1". Padding boxes are
all zeros and have area 0. Other formats (`cxcywh`, COCO's `xywh`) appear only
at the borders (matchers of set-prediction models, COCO json), through the
converters below.

Every function here is a pure jax.numpy function: jittable, vmappable, and
computed in float32 whatever the input dtype.
"""

import math

import jax.numpy as jnp

# Widths and heights are clamped at this value before divisions and logs, so
# that zero-size padding boxes encode to large but finite deltas.
_EPS = 1e-6


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def area(boxes):
  """Box areas, with negative widths / heights clamped at 0.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2).

  Returns:
    [...] float32 areas.
  """
  boxes = _f32(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def _safe_div(num, den):
  """num / den where den > 0, and 0 elsewhere (NaN-free in value and gradient)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _overlap_terms(a, b):
  """Intersection, union and enclosing-box area of broadcast box pairs.

  Args:
    a: [..., 4] (x1, y1, x2, y2), broadcastable against `b`.
    b: [..., 4] (x1, y1, x2, y2).

  Returns:
    (inter, union, enclose), each [...] float32 after broadcasting.
  """
  a, b = _f32(a), _f32(b)
  lo = jnp.maximum(a[..., :2], b[..., :2])
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(hi - lo, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  enc_wh = jnp.maximum(
      jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0)
  enclose = enc_wh[..., 0] * enc_wh[..., 1]
  return inter, union, enclose


def _iou_from_terms(inter, union):
  return _safe_div(inter, union)


def _giou_from_terms(inter, union, enclose):
  # GIoU (Rezatofighi et al., CVPR 2019, Alg. 1): IoU - |C \ (A u B)| / |C|.
  # When the enclosing box C has zero area both boxes are degenerate: the
  # penalty is taken as 0 (and IoU is 0), instead of 0 / 0.
  return _iou_from_terms(inter, union) - _safe_div(enclose - union, enclose)


def elementwise_iou(a, b):
  """IoU of corresponding boxes.

  Args:
    a: [..., 4] (x1, y1, x2, y2), broadcastable against `b`.
    b: [..., 4] (x1, y1, x2, y2).

  Returns:
    [...] float32 IoU in [0, 1]; 0 where the union is empty.
  """
  inter, union, _ = _overlap_terms(a, b)
  return _iou_from_terms(inter, union)


def elementwise_giou(a, b):
  """Generalized IoU of corresponding boxes.

  Args:
    a: [..., 4] (x1, y1, x2, y2), broadcastable against `b`.
    b: [..., 4] (x1, y1, x2, y2).

  Returns:
    [...] float32 GIoU in [-1, 1]; 0 for two degenerate boxes whose enclosing
    box is empty (e.g. two identical points).
  """
  return _giou_from_terms(*_overlap_terms(a, b))


def pairwise_iou(a, b):
  """IoU matrix between two sets of boxes.

  Args:
    a: [..., N, 4] (x1, y1, x2, y2).
    b: [..., M, 4] (x1, y1, x2, y2); leading dims broadcast against `a`'s.

  Returns:
    [..., N, M] float32 IoU; 0 where the union is 0 (zero padding boxes give
    0, not NaN).
  """
  inter, union, _ = _overlap_terms(
      _f32(a)[..., :, None, :], _f32(b)[..., None, :, :])
  return _iou_from_terms(inter, union)


def pairwise_giou(a, b):
  """Generalized-IoU matrix between two sets of boxes.

  Args:
    a: [..., N, 4] (x1, y1, x2, y2).
    b: [..., M, 4] (x1, y1, x2, y2); leading dims broadcast against `a`'s.

  Returns:
    [..., N, M] float32 GIoU in [-1, 1], NaN-free for degenerate boxes.
  """
  return _giou_from_terms(*_overlap_terms(
      _f32(a)[..., :, None, :], _f32(b)[..., None, :, :]))


def xyxy_to_cxcywh(boxes):
  """(x1, y1, x2, y2) -> (cx, cy, w, h).

  Args:
    boxes: [..., 4] corners.

  Returns:
    [..., 4] float32 centre and size.
  """
  boxes = _f32(boxes)
  lo, hi = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([(lo + hi) * 0.5, hi - lo], axis=-1)


def cxcywh_to_xyxy(boxes):
  """(cx, cy, w, h) -> (x1, y1, x2, y2).

  Args:
    boxes: [..., 4] centre and size.

  Returns:
    [..., 4] float32 corners.
  """
  boxes = _f32(boxes)
  c, half = boxes[..., :2], boxes[..., 2:] * 0.5
  return jnp.concatenate([c - half, c + half], axis=-1)


def xyxy_to_xywh(boxes):
  """(x1, y1, x2, y2) -> COCO's (x, y, w, h) with (x, y) the top-left corner.

  Args:
    boxes: [..., 4] corners.

  Returns:
    [..., 4] float32 COCO boxes.
  """
  boxes = _f32(boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def clip_boxes(boxes, height, width):
  """Clips boxes to the image rectangle [0, width] x [0, height].

  Args:
    boxes: [..., 4] (x1, y1, x2, y2).
    height: scalar or array broadcastable against `boxes[..., 0]` (e.g. [B, 1]
      for boxes [B, K, 4]).
    width: same as `height`.

  Returns:
    [..., 4] float32 clipped boxes.
  """
  boxes = _f32(boxes)
  h, w = _f32(height), _f32(width)
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def to_original_pixels(boxes, batch):
  """Input-pixel boxes -> original-image pixels, clipped to the original image.

  The pipeline's convention (DESIGN.md data contract): input = original * scale - offset.

  Args:
    boxes: [B, K, 4] (x1, y1, x2, y2) input pixels.
    batch: dict with 'scale' [B, 2] (sy, sx), 'offset' [B, 2] (oy, ox) and 'orig_size'
      [B, 2] (height, width).

  Returns:
    [B, K, 4] float32 original-image pixels.
  """
  boxes = _f32(boxes)
  sy, sx = batch['scale'][:, 0, None], batch['scale'][:, 1, None]
  oy, ox = batch['offset'][:, 0, None], batch['offset'][:, 1, None]
  out = jnp.stack([(boxes[..., 0] + ox) / sx, (boxes[..., 1] + oy) / sy,
                   (boxes[..., 2] + ox) / sx, (boxes[..., 3] + oy) / sy], axis=-1)
  h = batch['orig_size'][:, 0, None].astype(jnp.float32)
  w = batch['orig_size'][:, 1, None].astype(jnp.float32)
  return clip_boxes(out, h, w)


def encode_boxes(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
  """Encodes boxes as regression deltas relative to anchors (R-CNN coder).

  dx = wx * (cx - cxa) / wa, dy = wy * (cy - cya) / ha,
  dw = ww * log(w / wa),     dh = wh * log(h / ha)
  (Girshick et al., R-CNN appendix C), in the corner convention without the
  legacy "+1". RetinaNet uses weights (1, 1, 1, 1); the Fast R-CNN box head
  uses (10, 10, 5, 5).

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) targets; zero-size padding boxes give
      large but finite deltas (sizes are clamped at a small epsilon).
    anchors: [..., 4] (x1, y1, x2, y2), broadcastable against `boxes`.
    weights: (wx, wy, ww, wh) multipliers.

  Returns:
    [..., 4] float32 deltas (dx, dy, dw, dh).
  """
  boxes, anchors = _f32(boxes), _f32(anchors)
  wx, wy, ww, wh = weights
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], _EPS)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], _EPS)
  cx = (boxes[..., 0] + boxes[..., 2]) * 0.5
  cy = (boxes[..., 1] + boxes[..., 3]) * 0.5
  wa = jnp.maximum(anchors[..., 2] - anchors[..., 0], _EPS)
  ha = jnp.maximum(anchors[..., 3] - anchors[..., 1], _EPS)
  cxa = (anchors[..., 0] + anchors[..., 2]) * 0.5
  cya = (anchors[..., 1] + anchors[..., 3]) * 0.5
  return jnp.stack([
      wx * (cx - cxa) / wa,
      wy * (cy - cya) / ha,
      ww * jnp.log(w / wa),
      wh * jnp.log(h / ha),
  ], axis=-1)


def decode_boxes(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0),
                 scale_clip=math.log(1000.0 / 16)):
  """Inverts `encode_boxes`.

  dw and dh (after dividing by their weights) are clamped from above at
  `scale_clip` before the exp, as the Fast R-CNN coder does with log(1000/16),
  so an untrained head cannot produce inf-sized boxes.

  Args:
    deltas: [..., 4] (dx, dy, dw, dh).
    anchors: [..., 4] (x1, y1, x2, y2), broadcastable against `deltas`.
    weights: (wx, wy, ww, wh) used when encoding.
    scale_clip: upper bound on dw / ww and dh / wh.

  Returns:
    [..., 4] float32 boxes (x1, y1, x2, y2).
  """
  deltas, anchors = _f32(deltas), _f32(anchors)
  wx, wy, ww, wh = weights
  wa = anchors[..., 2] - anchors[..., 0]
  ha = anchors[..., 3] - anchors[..., 1]
  cxa = (anchors[..., 0] + anchors[..., 2]) * 0.5
  cya = (anchors[..., 1] + anchors[..., 3]) * 0.5
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clip)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clip)
  cx = dx * wa + cxa
  cy = dy * ha + cya
  half_w = 0.5 * jnp.exp(dw) * wa
  half_h = 0.5 * jnp.exp(dh) * ha
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
