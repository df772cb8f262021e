"""Elementwise detection losses in float32.

Every loss here returns one value per element (or per box); normalisation and
reduction (by the number of positives, by the number of boxes, over classes)
belong to the detector that calls them, where the paper says how.
"""

import jax
import jax.numpy as jnp

from jaxdet.ops import boxes as box_ops


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0):
  """Sigmoid focal loss (Lin et al., ICCV 2017, eq. 5), elementwise.

  FL = -alpha_t * (1 - p_t)**gamma * log(p_t), with p_t = p for targets 1 and
  1 - p for targets 0, alpha_t = alpha for targets 1 and 1 - alpha for 0.
  Both log(p_t) and (1 - p_t)**gamma are computed from log-sigmoids, so the
  value and gradient stay finite for any finite logit (and gamma = 0 gives
  the alpha-weighted cross entropy exactly).

  Args:
    logits: [...] float, pre-sigmoid scores.
    targets: [...] float in {0, 1} (one-hot classes; background all 0).
    alpha: weight of the positive class.
    gamma: focusing parameter.

  Returns:
    [...] float32 loss.
  """
  logits, targets = _f32(logits), _f32(targets)
  log_p = jax.nn.log_sigmoid(logits)  # log p
  log_not_p = jax.nn.log_sigmoid(-logits)  # log (1 - p)
  ce = -(targets * log_p + (1.0 - targets) * log_not_p)
  # log(1 - p_t): log(1 - p) for positives, log(p) for negatives.
  log_not_pt = targets * log_not_p + (1.0 - targets) * log_p
  modulator = jnp.exp(gamma * log_not_pt)
  alpha_t = targets * alpha + (1.0 - targets) * (1.0 - alpha)
  return alpha_t * modulator * ce


def huber_loss(pred, target, *, delta):
  """Huber loss as tf.keras.losses.Huber, elementwise.

  0.5 * x**2 where |x| <= delta, delta * (|x| - 0.5 * delta) elsewhere, with
  x = pred - target. SpineNet's RetinaNet uses delta = 0.1 on box deltas; TF
  Model Garden's Mask R-CNN uses 1/9 (RPN) and 1.0 (box head).

  Args:
    pred: [...] float.
    target: [...] float, broadcastable against `pred`.
    delta: positive float, the switch point.

  Returns:
    [...] float32 loss.
  """
  x = jnp.abs(_f32(pred) - _f32(target))
  quadratic = jnp.minimum(x, delta)
  # Writing it as quadratic part + linear remainder keeps the gradient
  # continuous and avoids a where() on the two branches.
  return 0.5 * quadratic ** 2 + delta * (x - quadratic)


def smooth_l1_loss(pred, target, *, beta):
  """Smooth-L1 loss as detectron2's `smooth_l1_loss`, elementwise.

  0.5 * x**2 / beta where |x| < beta, |x| - 0.5 * beta elsewhere: the Huber
  loss divided by beta. beta = 0 gives the L1 loss (Fast R-CNN uses beta = 1,
  detectron2's RetinaNet 0.1, mmdetection's 0.11).

  Args:
    pred: [...] float.
    target: [...] float, broadcastable against `pred`.
    beta: non-negative float (static).

  Returns:
    [...] float32 loss.
  """
  if beta < 1e-5:
    # The quadratic region vanishes; dividing by beta would be 0 / 0.
    return jnp.abs(_f32(pred) - _f32(target))
  return huber_loss(pred, target, delta=beta) / beta


def giou_loss(pred_boxes, target_boxes):
  """1 - GIoU (Rezatofighi et al., CVPR 2019), one value per box pair.

  Args:
    pred_boxes: [..., 4] (x1, y1, x2, y2).
    target_boxes: [..., 4] (x1, y1, x2, y2), broadcastable against
      `pred_boxes`.

  Returns:
    [...] float32 loss in [0, 2]; finite for degenerate boxes.
  """
  return 1.0 - box_ops.elementwise_giou(pred_boxes, target_boxes)


def sigmoid_cross_entropy(logits, targets):
  """Binary cross entropy on logits, elementwise.

  Uses max(x, 0) - x * t + log(1 + exp(-|x|)), finite for any finite logit.

  Args:
    logits: [...] float.
    targets: [...] float in [0, 1].

  Returns:
    [...] float32 loss.
  """
  logits, targets = _f32(logits), _f32(targets)
  return (jnp.maximum(logits, 0.0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def softmax_cross_entropy(logits, labels, weights=None):
  """Softmax cross entropy with integer labels, one value per example.

  Args:
    logits: [..., C] float.
    labels: [...] int class indices in [0, C); a negative label (padding,
      ignore) gives loss 0.
    weights: optional [...] float multiplier per example, e.g.
      `class_weights[labels]` for DETR's down-weighted no-object class.

  Returns:
    [...] float32 loss (weighted when `weights` is given).
  """
  logits = _f32(logits)
  labels = jnp.asarray(labels, jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(
      log_probs, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  loss = jnp.where(labels >= 0, -picked, 0.0)
  if weights is not None:
    loss = loss * _f32(weights)
  return loss
