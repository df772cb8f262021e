"""Hungarian (bipartite) matching for set-prediction detectors (DETR).

DETR (Carion et al., ECCV 2020, section 3.1) assigns each ground-truth object
exactly one of the Q predictions by solving a linear assignment problem over a
cost that mixes class probability, L1 box distance and generalized IoU. This
file holds the cost (`detr_cost`) and two solvers with one contract:

* `linear_sum_assignment_scipy`: SciPy's exact solver on the host, reached
  through `jax.pure_callback` (works under `jit` and `vmap`).
* `linear_sum_assignment_jax`: a pure-JAX Hungarian algorithm
  (`optax.assignment.hungarian_algorithm`), so that matching stays on the
  accelerator without a host round trip.

Shapes are static: ground truth is padded to N with a validity mask, Q >= N.
Both solvers return, for every target column n, the query matched to it; the
queries given to padded targets are distinct from all others but meaningless,
and flagged by `matched = False`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from jaxdet.ops import boxes as box_ops


# -log(1e-8): the focal cost's cap on -log p.
_FOCAL_LOG_CAP = 18.420680743952367


def detr_cost(pred_logits, pred_boxes, gt_classes, gt_boxes, gt_valid, *,
              class_weight=1.0, l1_weight=5.0, giou_weight=2.0, class_cost='softmax',
              focal_alpha=0.25, focal_gamma=2.0):
  """DETR's matching cost between the predictions and targets of one image.

  cost[q, n] = class_weight * (-p_q(c_n)) + l1_weight * |b_q - b_n|_1
               + giou_weight * (-GIoU(b_q, b_n)),
  with p_q the softmax over the C + 1 logits of query q, the L1 distance taken
  on normalised (cx, cy, w, h) and GIoU on the corresponding corners, as the
  reference DETR HungarianMatcher (defaults 1 / 5 / 2; DETR `main.py`).
  With class_cost='focal' the class term is Deformable DETR's focal cost on sigmoid
  probabilities p of the logits, FL(p, 1) - FL(p, 0) at the target's class, with
  FL(p, 1) = alpha (1 - p)^gamma (-log p) and FL(p, 0) = (1 - alpha) p^gamma (-log(1 - p)).

  Padded targets, and any entry that is NaN / +-inf (e.g. a diverged
  prediction), get the finite cost `class_weight + 4 * l1_weight +
  giou_weight` (the focal class term's bound in place of class_weight), which is not below any finite cost between boxes inside the
  unit square (the class term is <= 0, L1 <= 4, -GIoU <= 1), as Scenic's
  `compute_cost` does: the solvers never see NaN or inf.

  Args:
    pred_logits: [Q, C + 1] float class logits; the last index is "no object".
    pred_boxes: [Q, 4] (cx, cy, w, h) normalised by the image size.
    gt_classes: [N] int class ids in [0, C).
    gt_boxes: [N, 4] (cx, cy, w, h) normalised by the image size.
    gt_valid: [N] bool, False for padding.
    class_weight: weight of the class term.
    l1_weight: weight of the L1 box term.
    giou_weight: weight of the GIoU term.
    class_cost: 'softmax' (DETR) or 'focal' (with the sigmoid focal classification loss).
    focal_alpha, focal_gamma: the focal cost's alpha and gamma.

  Returns:
    [Q, N] float32 cost, finite everywhere.
  """
  pred_logits = jnp.asarray(pred_logits, jnp.float32)
  pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  num_classes = pred_logits.shape[-1]
  # Padded targets may carry any class id; clip so that the gather is defined.
  cls = jnp.clip(gt_classes, 0, num_classes - 1)
  if class_cost == 'softmax':
    prob = jax.nn.softmax(pred_logits, axis=-1)  # [Q, C + 1]
    cost_class = -jnp.take(prob, cls, axis=-1)  # [Q, N]
    class_bound = abs(class_weight)
  elif class_cost == 'focal':
    logits = jnp.take(pred_logits, cls, axis=-1)  # [Q, N]
    p = jax.nn.sigmoid(logits)
    # -log p and -log(1 - p) from log-sigmoids, capped at -log(1e-8) (Deformable DETR's eps).
    nlog_p = jnp.minimum(-jax.nn.log_sigmoid(logits), _FOCAL_LOG_CAP)
    nlog_not_p = jnp.minimum(-jax.nn.log_sigmoid(-logits), _FOCAL_LOG_CAP)
    pos = focal_alpha * (1 - p) ** focal_gamma * nlog_p
    neg = (1 - focal_alpha) * p ** focal_gamma * nlog_not_p
    cost_class = pos - neg
    class_bound = abs(class_weight) * max(focal_alpha, 1 - focal_alpha) * _FOCAL_LOG_CAP
  else:
    raise ValueError(f'class_cost={class_cost!r}; use "softmax" or "focal".')
  cost_l1 = jnp.abs(pred_boxes[:, None, :] - gt_boxes[None, :, :]).sum(-1)
  giou = box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes),
                               box_ops.cxcywh_to_xyxy(gt_boxes))  # [Q, N]
  cost = (class_weight * cost_class + l1_weight * cost_l1
          - giou_weight * giou)
  bound = class_bound + 4.0 * abs(l1_weight) + abs(giou_weight)
  ok = jnp.isfinite(cost) & jnp.asarray(gt_valid, bool)[None, :]
  return jnp.where(ok, cost, jnp.float32(bound))


def _sanitize(cost):
  """Replaces non-finite costs by finite ones, per matrix.

  NaN and +inf become worse than every finite entry of their matrix, -inf
  better than every one, with margins of the matrix's finite range so that
  the magnitudes (and float32 precision) stay those of the finite costs.
  Without this SciPy raises and the JAX solver may never terminate (an
  all-NaN matrix loops forever in optax's solver, optax issue #1179).

  Args:
    cost: [..., Q, N] float.

  Returns:
    [..., Q, N] float32, finite.
  """
  cost = jnp.asarray(cost, jnp.float32)
  finite = jnp.isfinite(cost)
  hi = jnp.max(jnp.where(finite, cost, -jnp.inf), axis=(-2, -1), keepdims=True,
               initial=-jnp.inf)
  lo = jnp.min(jnp.where(finite, cost, jnp.inf), axis=(-2, -1), keepdims=True,
               initial=jnp.inf)
  any_finite = jnp.isfinite(hi)
  hi = jnp.where(any_finite, hi, 0.0)
  lo = jnp.where(any_finite, lo, 0.0)
  span = hi - lo + 1.0
  return jnp.where(finite, cost,
                   jnp.where(cost == -jnp.inf, lo - span, hi + span))


def _check_shapes(cost, valid):
  if cost.ndim < 2:
    raise ValueError(f'cost must be [..., Q, N], got shape {cost.shape}.')
  q, n = cost.shape[-2:]
  if q < n:
    raise ValueError(
        f'Hungarian matching needs at least as many queries as targets '
        f'(Q >= N), got Q={q}, N={n}.')
  if valid.shape != cost.shape[:-2] + (n,):
    raise ValueError(f'valid must be {cost.shape[:-2] + (n,)}, got '
                     f'{valid.shape}.')


def _scipy_host(cost, valid):
  """Host side of `linear_sum_assignment_scipy` for any leading dims (numpy)."""
  cost = np.asarray(cost)
  valid = np.asarray(valid, bool)
  q, n = cost.shape[-2:]
  lead = cost.shape[:-2]
  cost = cost.reshape((-1, q, n)).astype(np.float64)
  valid = valid.reshape((-1, n))
  pred_idx = np.zeros(valid.shape, np.int32)
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    # Only real targets enter the solver (Scenic's "slicer" in cpu_matcher).
    rows, sel = scipy.optimize.linear_sum_assignment(cost[b][:, cols])
    pred_idx[b, cols[sel]] = rows
    # Padded targets take the unused queries in order, so that every row of
    # pred_idx holds distinct queries, as the JAX solver's does.
    pad = np.flatnonzero(~valid[b])
    unused = np.setdiff1d(np.arange(q), rows)
    pred_idx[b, pad] = unused[:len(pad)]
  return pred_idx.reshape(lead + (n,))


def _outputs(pred_idx, valid):
  n = valid.shape[-1]
  gt_idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), valid.shape)
  return pred_idx.astype(jnp.int32), gt_idx, valid


def linear_sum_assignment_scipy(cost, valid):
  """Minimum-cost matching of valid targets to queries, by SciPy on the host.

  Usable inside `jit`; under `vmap` the whole batch goes to the host in one
  callback. The result carries no gradient (matching is a constant of the
  loss, as DETR's `torch.no_grad` matcher).

  Args:
    cost: [B, Q, N] float (any leading dims work), Q >= N; non-finite entries
      are replaced by finite ones first.
    valid: [B, N] bool, False for padded targets.

  Returns:
    pred_idx: [B, N] int32, query matched to target n; distinct within an
      image, meaningless where `matched` is False.
    gt_idx: [B, N] int32, arange(N) (targets in order).
    matched: [B, N] bool, equal to `valid`.
  """
  cost = jax.lax.stop_gradient(_sanitize(cost))
  valid = jnp.asarray(valid, bool)
  _check_shapes(cost, valid)
  out = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  pred_idx = jax.pure_callback(_scipy_host, out, cost, valid,
                               vmap_method='broadcast_all')
  return _outputs(pred_idx, valid)


def _hungarian_one(cost, valid):
  """Pure-JAX matching of one [Q, N] cost; see `linear_sum_assignment_jax`."""
  q, n = cost.shape
  if n == 0:
    return jnp.zeros((0,), jnp.int32)
  # A column of one constant adds the same amount to every complete
  # assignment whichever query takes it, so giving padded targets a constant
  # column leaves the optimum over the real targets unchanged.
  cost = jnp.where(valid[None, :], cost, 0.0)
  rows, cols = optax.assignment.hungarian_algorithm(cost)  # each [N]
  return jnp.zeros((n,), jnp.int32).at[cols].set(rows.astype(jnp.int32))


def linear_sum_assignment_jax(cost, valid):
  """Minimum-cost matching of valid targets to queries, in pure JAX.

  Same contract as `linear_sum_assignment_scipy`, without a host round trip:
  optax's O(N^2 Q) Hungarian (Jonker-Volgenant style shortest augmenting
  paths, after Scenic's TPU matcher) per image, vmapped over the batch.

  Args:
    cost: [B, Q, N] float, Q >= N; non-finite entries are replaced by finite
      ones first.
    valid: [B, N] bool, False for padded targets.

  Returns:
    pred_idx: [B, N] int32, query matched to target n; distinct within an
      image, meaningless where `matched` is False.
    gt_idx: [B, N] int32, arange(N).
    matched: [B, N] bool, equal to `valid`.
  """
  cost = jax.lax.stop_gradient(_sanitize(cost))
  valid = jnp.asarray(valid, bool)
  _check_shapes(cost, valid)
  fn = _hungarian_one
  for _ in range(cost.ndim - 2):
    fn = jax.vmap(fn)
  pred_idx = fn(cost, valid)
  return _outputs(pred_idx, valid)
