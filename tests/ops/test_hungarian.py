"""Tests for jaxdet.ops.hungarian: DETR's matching cost and both solvers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxdet.ops import hungarian

_detr_cost = jax.jit(hungarian.detr_cost,
                     static_argnames=('class_weight', 'l1_weight', 'giou_weight'))

SOLVERS = {
    'scipy': hungarian.linear_sum_assignment_scipy,
    'jax': hungarian.linear_sum_assignment_jax,
}


def _optimum(cost, valid):
  """Reference optimum over the valid columns of one [Q, N] cost (float64)."""
  sub = np.asarray(cost, np.float64)[:, np.asarray(valid, bool)]
  r, c = scipy.optimize.linear_sum_assignment(sub)
  return sub[r, c].sum()


def _brute_force(cost, valid):
  """Optimum by enumerating all injections of valid columns into rows."""
  sub = np.asarray(cost, np.float64)[:, np.asarray(valid, bool)]
  q, n = sub.shape
  return min(sum(sub[r, j] for j, r in enumerate(rows))
             for rows in itertools.permutations(range(q), n))


def _check(cost, valid, out):
  """Asserts that a solver output is a valid and optimal matching."""
  pred_idx, gt_idx, matched = (np.asarray(x) for x in out)
  cost, valid = np.asarray(cost), np.asarray(valid, bool)
  b, q, n = cost.shape
  assert pred_idx.shape == gt_idx.shape == matched.shape == (b, n)
  assert pred_idx.dtype == np.int32 and matched.dtype == bool
  np.testing.assert_array_equal(matched, valid)
  np.testing.assert_array_equal(gt_idx, np.broadcast_to(np.arange(n), (b, n)))
  for i in range(b):
    assert np.all((pred_idx[i] >= 0) & (pred_idx[i] < q))
    assert len(set(pred_idx[i].tolist())) == n  # distinct queries
    got = np.asarray(cost[i], np.float64)[pred_idx[i], gt_idx[i]][valid[i]].sum()
    want = _optimum(cost[i], valid[i])
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (i, got, want)


def _random_problem(rng, b, q, n, kind):
  if kind == 'normal':
    cost = rng.normal(size=(b, q, n))
  elif kind == 'integer':
    cost = rng.integers(0, 100, size=(b, q, n))
  elif kind == 'ties':
    cost = rng.integers(0, 3, size=(b, q, n))
  elif kind == 'equal':
    cost = np.full((b, q, n), 1.5)
  else:
    raise ValueError(kind)
  valid = rng.random((b, n)) < 0.7
  valid[0] = True  # one fully valid image
  if b > 1:
    valid[1] = False  # and one without targets
  return cost.astype(np.float32), valid


@pytest.mark.parametrize('solver', sorted(SOLVERS))
@pytest.mark.parametrize('q,n,kind', [
    (1, 1, 'normal'),
    (5, 5, 'normal'),
    (9, 4, 'normal'),
    (9, 4, 'integer'),
    (9, 4, 'ties'),
    (9, 4, 'equal'),
    (6, 0, 'normal'),
])
def test_solvers_reach_optimum_batched_under_jit(solver, q, n, kind):
  rng = np.random.default_rng(q * 100 + n + len(kind))
  cost, valid = _random_problem(rng, 4, q, n, kind)
  out = jax.jit(SOLVERS[solver])(cost, valid)
  _check(cost, valid, out)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_solvers_match_brute_force(solver):
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(4, 9, 4)).astype(np.float32)
  valid = rng.random((4, 4)) < 0.8
  pred_idx, gt_idx, matched = jax.jit(SOLVERS[solver])(cost, valid)
  for i in range(4):
    got = cost[i][np.asarray(pred_idx[i]), np.asarray(gt_idx[i])]
    got = got[np.asarray(matched[i])].astype(np.float64).sum()
    np.testing.assert_allclose(got, _brute_force(cost[i], valid[i]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_solvers_under_vmap_of_jit(solver):
  rng = np.random.default_rng(1)
  cost, valid = _random_problem(rng, 3, 7, 4, 'normal')
  out = jax.jit(jax.vmap(SOLVERS[solver]))(cost, valid)  # per-image [Q, N]
  _check(cost, valid, out)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_solvers_survive_non_finite_costs(solver):
  rng = np.random.default_rng(2)
  cost, valid = _random_problem(rng, 4, 9, 4, 'normal')
  cost[0, 0, :] = np.nan  # a diverged query: must be avoided
  cost[0, 1, 1] = np.inf
  cost[2] = np.nan  # an all-NaN image must terminate
  pred_idx, _, matched = jax.jit(SOLVERS[solver])(cost, valid)
  pred_idx = np.asarray(pred_idx)
  for i in range(4):
    assert len(set(pred_idx[i].tolist())) == 4
  # Image 0 has finite alternatives for every target: the NaN row and the
  # inf entry are not used, and the rest is optimal.
  assert 0 not in pred_idx[0].tolist()
  assert pred_idx[0, 1] != 1
  finite = cost[0].copy()
  finite[~np.isfinite(finite)] = 1e3
  got = finite[pred_idx[0], np.arange(4)].sum()
  np.testing.assert_allclose(got, _optimum(finite, valid[0]), rtol=1e-5)
  np.testing.assert_array_equal(matched, valid)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_more_targets_than_queries_raises(solver):
  with pytest.raises(ValueError, match='Q >= N'):
    SOLVERS[solver](jnp.zeros((1, 2, 3)), jnp.ones((1, 3), bool))


def test_scipy_solver_passes_gradients_around_the_callback():
  rng = np.random.default_rng(3)
  cost = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  valid = jnp.ones((2, 3), bool)

  def loss(c):
    pred_idx, gt_idx, _ = hungarian.linear_sum_assignment_scipy(c, valid)
    return sum(c[b, pred_idx[b], gt_idx[b]].sum() for b in range(2))

  g = jax.jit(jax.grad(loss))(cost)
  # d(sum of matched costs)/d(cost) is the 0/1 assignment matrix.
  assert float(g.sum()) == 6.0
  assert set(np.unique(np.asarray(g)).tolist()) <= {0.0, 1.0}


def _np_giou(a, b):
  """GIoU of two (cx, cy, w, h) boxes, written out in numpy."""
  a = np.array([a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2,
                a[1] + a[3] / 2])
  b = np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2,
                b[1] + b[3] / 2])
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
           - inter)
  enclose = ((max(a[2], b[2]) - min(a[0], b[0]))
             * (max(a[3], b[3]) - min(a[1], b[1])))
  return inter / union - (enclose - union) / enclose


def test_detr_cost_closed_form():
  # Uniform logits over C + 1 = 4 classes: p = 1/4 for every class.
  logits = jnp.zeros((2, 4))
  box = jnp.array([0.5, 0.5, 0.2, 0.4])
  pred_boxes = jnp.stack([box, jnp.array([0.25, 0.25, 0.1, 0.1])])
  gt_boxes = box[None]
  cost = _detr_cost(logits, pred_boxes, jnp.array([2]), gt_boxes,
                             jnp.array([True]))
  assert cost.shape == (2, 1) and cost.dtype == jnp.float32
  # Identical boxes: L1 = 0, GIoU = 1  ->  1 * -0.25 + 5 * 0 + 2 * -1.
  np.testing.assert_allclose(cost[0, 0], -2.25, rtol=1e-6)
  # Disjoint boxes (0.2..0.3)^2 vs (0.4..0.6)x(0.3..0.7): L1 = .25+.25+.1+.3,
  # IoU = 0, enclosing box (0.2..0.6)x(0.2..0.7) of area 0.2, union 0.09:
  # GIoU = -(0.2 - 0.09) / 0.2 = -0.55.
  want = -0.25 + 5 * 0.9 + 2 * 0.55
  np.testing.assert_allclose(cost[1, 0], want, rtol=1e-5)
  # A known class probability: logits (log 3, 0, 0, 0) give p(0) = 1/2.
  logits = jnp.array([[np.log(3.0), 0.0, 0.0, 0.0]])
  cost = _detr_cost(logits, box[None], jnp.array([0]), gt_boxes,
                             jnp.array([True]), class_weight=2.0)
  np.testing.assert_allclose(cost[0, 0], 2.0 * -0.5 - 2.0, rtol=1e-6)


def test_detr_cost_against_numpy_reference():
  rng = np.random.default_rng(4)
  q, n, c = 5, 3, 6
  logits = rng.normal(size=(q, c + 1)).astype(np.float32)
  pred = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)),
                         rng.uniform(0.05, 0.4, (q, 2))], -1).astype(np.float32)
  gt = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)),
                       rng.uniform(0.05, 0.4, (n, 2))], -1).astype(np.float32)
  cls = rng.integers(0, c, n)
  valid = np.array([True, True, False])
  cost = np.asarray(_detr_cost(logits, pred, cls, gt, valid))
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for i in range(q):
    for j in range(2):
      want = (-prob[i, cls[j]] + 5 * np.abs(pred[i] - gt[j]).sum()
              - 2 * _np_giou(pred[i], gt[j]))
      np.testing.assert_allclose(cost[i, j], want, rtol=1e-5, atol=1e-5)
  # Padded target: the finite bound 1 + 4 * 5 + 2.
  np.testing.assert_array_equal(cost[:, 2], 23.0)


def test_detr_focal_cost_against_closed_form():
  """class_cost='focal': FL(p, 1) - FL(p, 0) at the target class, sigmoid p; padded
  targets get a bound above every finite cost."""
  rng = np.random.default_rng(6)
  q, n, c = 4, 3, 5
  logits = rng.normal(scale=2.0, size=(q, c + 1)).astype(np.float32)
  logits[0, 1] = -40.0                       # p ~ 4e-18: -log p is capped at -log 1e-8
  box = np.full((q, 4), 0.5, np.float32)
  cls = np.array([1, 3, 0])
  valid = np.array([True, True, False])
  cost = np.asarray(hungarian.detr_cost(logits, box, cls, box[:n], valid,
                                        class_weight=2.0, class_cost='focal'))
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  for i in range(q):
    for j in range(2):
      pj = p[i, cls[j]]
      pos = 0.25 * (1 - pj) ** 2 * min(-np.log(pj), -np.log(1e-8))
      neg = 0.75 * pj ** 2 * -np.log(1 - pj)
      want = 2.0 * (pos - neg) - 2.0              # identical boxes: L1 0, GIoU 1
      np.testing.assert_allclose(cost[i, j], want, rtol=1e-4, atol=1e-5)
  bound = 2.0 * 0.75 * -np.log(1e-8) + 4 * 5 + 2
  np.testing.assert_allclose(cost[:, 2], bound, rtol=1e-6)
  assert cost[:, :2].max() < bound
  with pytest.raises(ValueError, match='class_cost'):
    hungarian.detr_cost(logits, box, cls, box[:n], valid, class_cost='sigmoid')


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_nan_predictions_give_valid_assignment(solver):
  rng = np.random.default_rng(5)
  q, n, c = 6, 3, 4
  logits = rng.normal(size=(q, c + 1)).astype(np.float32)
  pred = rng.uniform(0.2, 0.6, (q, 4)).astype(np.float32)
  logits[1] = np.nan
  pred[3] = np.nan
  pred[4, 2] = np.inf
  gt = rng.uniform(0.2, 0.6, (n, 4)).astype(np.float32)
  valid = np.array([True, True, True])
  cost = _detr_cost(logits, pred, np.array([0, 1, 2]), gt, valid)
  assert np.all(np.isfinite(np.asarray(cost)))
  pred_idx, _, matched = jax.jit(SOLVERS[solver])(cost[None], valid[None])
  pred_idx = np.asarray(pred_idx[0])
  assert len(set(pred_idx.tolist())) == n and np.all(np.asarray(matched))
  # Three healthy queries remain, so the broken ones (1, 3, 4) are not used.
  assert not set(pred_idx.tolist()) & {1, 3, 4}
