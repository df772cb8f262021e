"""Tests for jaxdet.ops.sampling: counts, fractions, uniformity, Libra quotas, SNIP."""

import jax
import numpy as np
import pytest

from jaxdet.ops import sampling


def _labels(pos, neg, ignore=0, n=None, seed=0):
  """Shuffled labels with the given numbers of 1 / 0 / -1, padded with -1 to n."""
  labels = np.array([1] * pos + [0] * neg + [-1] * ignore, np.int32)
  np.random.default_rng(seed).shuffle(labels)
  if n is not None:
    labels = np.concatenate([labels, np.full(n - len(labels), -1, np.int32)])
  return labels


_STATIC = ('num_samples', 'positive_fraction', 'num_bins', 'floor_threshold', 'floor_fraction')
_sample = jax.jit(sampling.sample_fixed, static_argnames=_STATIC[:2])
_iou_balanced = jax.jit(sampling.iou_balanced_negatives, static_argnames=_STATIC)


def _check_output(labels, out, want_pos, want_neg, s):
  indices, sampled, valid = (np.asarray(x) for x in out)
  assert indices.shape == sampled.shape == valid.shape == (s,)
  assert indices.dtype == np.int32 and sampled.dtype == np.int32 and valid.dtype == bool
  assert (sampled[valid] == labels[indices[valid]]).all()
  assert (sampled == 1).sum() == want_pos
  assert (sampled == 0).sum() == want_neg
  assert valid.sum() == want_pos + want_neg
  # Positives first, then negatives, then unfilled slots (label -1, index 0).
  assert (valid == (np.arange(s) < want_pos + want_neg)).all()
  assert (sampled[:want_pos] == 1).all()
  assert (sampled[~valid] == -1).all() and (indices[~valid] == 0).all()
  assert len(set(indices[valid].tolist())) == valid.sum()  # no duplicates


@pytest.mark.parametrize('pos,neg,ignore,n,s,fraction,want_pos,want_neg', [
    (1000, 5000, 300, None, 256, 0.5, 128, 128),  # many positives: capped at half
    (10, 5000, 0, None, 256, 0.5, 10, 246),  # few positives: negatives fill up
    (0, 3000, 50, None, 512, 0.25, 0, 512),  # image without objects
    (7, 20, 100, None, 256, 0.5, 7, 20),  # too few of both: unfilled slots
    (0, 0, 400, None, 256, 0.5, 0, 0),  # only ignored anchors (crowd regions)
    (0, 0, 0, 300, 256, 0.5, 0, 0),  # all padding
    (30, 10, 0, 50, 256, 0.25, 30, 10),  # fewer candidates than slots
    (200, 1000, 0, None, 512, 0.25, 128, 384),  # RoI head: 25% positives
    (300, 50, 0, None, 256, 0.5, 128, 50),  # negatives run short: not refilled
])
def test_sample_fixed_counts(pos, neg, ignore, n, s, fraction, want_pos, want_neg):
  labels = _labels(pos, neg, ignore, n)
  out = _sample(jax.random.key(1), labels, num_samples=s, positive_fraction=fraction)
  _check_output(labels, out, want_pos, want_neg, s)


def test_sample_fixed_is_uniform():
  # 4 positives from 20, 6 negatives from 30, over 4000 keys: each candidate is drawn
  # with probability 1/5 (4/20, 6/30).
  labels = _labels(20, 30, 10, seed=3)
  keys = jax.random.split(jax.random.key(7), 4000)
  fn = jax.jit(jax.vmap(lambda k: sampling.sample_fixed(
      k, labels, num_samples=10, positive_fraction=0.4)))
  indices, sampled, valid = (np.asarray(x) for x in fn(keys))
  assert valid.all()
  counts = np.bincount(indices.ravel(), minlength=labels.size)
  drawn = counts[labels >= 0] / 4000.0
  # Binomial(4000, 0.2): sd 0.0063; 5 sd bounds.
  np.testing.assert_allclose(drawn, 0.2, atol=0.032)
  assert (counts[labels < 0] == 0).all()
  # Pairs are uniform too: a positive pair appears together with prob (4*3)/(20*19).
  pos = np.flatnonzero(labels == 1)[:2]
  together = np.mean([(pos[0] in row) and (pos[1] in row) for row in indices])
  np.testing.assert_allclose(together, 12 / 380, atol=0.015)


def test_sample_fixed_key_dependence():
  labels = _labels(50, 500)
  a = _sample(jax.random.key(0), labels, num_samples=64, positive_fraction=0.5)[0]
  b = _sample(jax.random.key(0), labels, num_samples=64, positive_fraction=0.5)[0]
  c = _sample(jax.random.key(1), labels, num_samples=64, positive_fraction=0.5)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sample_fixed_vmap_matches_per_image():
  batch = np.stack([_labels(100, 800, n=1000), _labels(3, 40, 10, n=1000),
                    _labels(0, 0, 50, n=1000), _labels(0, 900, n=1000)])
  keys = jax.random.split(jax.random.key(5), 4)
  fn = lambda k, l: sampling.sample_fixed(k, l, num_samples=128, positive_fraction=0.25)
  got = jax.jit(jax.vmap(fn))(keys, batch)
  single = jax.jit(fn)
  for i, (want_pos, want_neg) in enumerate([(32, 96), (3, 40), (0, 0), (0, 128)]):
    one = single(keys[i], batch[i])
    for g, w in zip(got, one):
      np.testing.assert_array_equal(g[i], w)
    _check_output(batch[i], [g[i] for g in got], want_pos, want_neg, 128)


# ---------------------------------------------------------------------------
# Libra R-CNN


def _hist(values, edges):
  return np.histogram(values, bins=edges)[0]


def test_iou_balanced_negatives_takes_bin_quotas():
  # One positive (IoU 0.9 sets max_iou -> bins [0, .3), [.3, .6), [.6, .9)), 300 easy
  # negatives (IoU 0.05), 10 hard ones (IoU 0.4). S = 64, 1 positive, 63 negatives,
  # quota int(63 / 3) = 21 per bin: all 10 hard negatives are taken (random sampling would
  # take ~2), the rest are easy.
  labels = np.array([1] + [0] * 310, np.int32)
  overlaps = np.array([0.9] + [0.05] * 300 + [0.4] * 10, np.float32)
  fn = jax.jit(lambda k: sampling.iou_balanced_negatives(
      k, labels, overlaps, num_samples=64, positive_fraction=0.25))
  for seed in range(3):
    out = fn(jax.random.key(seed))
    _check_output(labels, out, 1, 63, 64)
    idx = np.asarray(out[0])[np.asarray(out[1]) == 0]
    assert (overlaps[idx] == 0.4).sum() == 10


def test_iou_balanced_negatives_quota_then_random_fill():
  # Bins with 300 and 50 negatives: each gives its quota of 21, the other 21 are drawn at
  # random from the 308 left (expected 21 * 29 / 308 ~ 2 more hard ones).
  labels = np.array([1] + [0] * 350, np.int32)
  overlaps = np.array([0.9] + [0.05] * 300 + [0.4] * 50, np.float32)
  fn = jax.jit(jax.vmap(lambda k: sampling.iou_balanced_negatives(
      k, labels, overlaps, num_samples=64, positive_fraction=0.25)))
  indices, sampled, valid = (np.asarray(x) for x in fn(jax.random.split(jax.random.key(0), 300)))
  hard = np.array([(overlaps[i[s == 0]] == 0.4).sum() for i, s in zip(indices, sampled)])
  assert hard.min() >= 21 and (hard <= 42).all()
  np.testing.assert_allclose(hard.mean(), 21 + 21 * 29 / 308, atol=0.4)
  # Random sampling for comparison takes 63 * 50 / 350 = 9 on average.
  rnd = jax.jit(jax.vmap(lambda k: sampling.sample_fixed(
      k, labels, num_samples=64, positive_fraction=0.25)))(jax.random.split(jax.random.key(0), 300))
  rnd_hard = np.mean([(overlaps[i[s == 0]] == 0.4).sum() for i, s in zip(*(np.asarray(x) for x in rnd[:2]))])
  np.testing.assert_allclose(rnd_hard, 9.0, atol=0.6)


def test_iou_balanced_negatives_floor_threshold_zero():
  # floor_threshold 0: IoU > 0 negatives (40 of them, fewer than the 63 needed) are all
  # taken, the other 23 come from the IoU == 0 floor set.
  labels = np.array([1] + [0] * 400, np.int32)
  overlaps = np.array([0.9] + [0.0] * 360 + list(np.linspace(0.01, 0.45, 40)), np.float32)
  out = _iou_balanced(jax.random.key(2), labels, overlaps, num_samples=64,
                      positive_fraction=0.25, floor_threshold=0.0)
  _check_output(labels, out, 1, 63, 64)
  neg = np.asarray(out[0])[np.asarray(out[1]) == 0]
  assert (overlaps[neg] > 0).sum() == 40


def test_iou_balanced_negatives_few_negatives_takes_all():
  labels = np.array([1] * 5 + [0] * 12 + [-1] * 30, np.int32)
  overlaps = np.linspace(0, 0.9, labels.size).astype(np.float32)
  out = _iou_balanced(jax.random.key(0), labels, overlaps, num_samples=64,
                      positive_fraction=0.25)
  _check_output(labels, out, 5, 12, 64)


def test_instance_balanced_positives_caps_each_gt():
  # Ground truths with 100, 5 and 5 positives; 16 positive slots; per-gt quota
  # round(16 / 3) + 1 = 6: the sample is exactly 6 / 5 / 5 (random sampling: ~14.5 / 0.7 / 0.7).
  labels = np.array([1] * 110 + [0] * 500, np.int32)
  matched = np.array([0] * 100 + [1] * 5 + [2] * 5 + [0] * 500, np.int32)
  fn = jax.jit(lambda k: sampling.instance_balanced_positives(
      k, labels, matched, num_samples=64, positive_fraction=0.25))
  for seed in range(3):
    out = fn(jax.random.key(seed))
    _check_output(labels, out, 16, 48, 64)
    pos = np.asarray(out[0])[np.asarray(out[1]) == 1]
    np.testing.assert_array_equal(np.bincount(matched[pos], minlength=3), [6, 5, 5])


def test_instance_balanced_positives_rounds_half_to_even():
  # 4 ground truths x 20 positives, 10 slots: quota round(2.5) + 1 = 3 (Python's round),
  # 12 quota members cut to 10 at random: no ground truth gets more than 3.
  labels = np.array([1] * 80 + [0] * 100, np.int32)
  matched = np.array(list(np.repeat(np.arange(4), 20)) + [0] * 100, np.int32)
  fn = jax.jit(jax.vmap(lambda k: sampling.instance_balanced_positives(
      k, labels, matched, num_samples=20, positive_fraction=0.5)))
  indices, sampled, _ = (np.asarray(x) for x in fn(jax.random.split(jax.random.key(0), 200)))
  per_gt = np.stack([np.bincount(matched[i[s == 1]], minlength=4)
                     for i, s in zip(indices, sampled)])
  assert (per_gt.sum(1) == 10).all()
  assert per_gt.max() == 3 and per_gt.min() >= 1


def test_libra_sample_combines_both():
  labels = np.array([1] * 110 + [0] * 310, np.int32)
  matched = np.array([0] * 100 + [1] * 5 + [2] * 5 + [0] * 310, np.int32)
  overlaps = np.array([0.9] * 110 + [0.05] * 300 + [0.4] * 10, np.float32)
  out = jax.jit(lambda k: sampling.libra_sample(
      k, labels, overlaps, matched, num_samples=64, positive_fraction=0.25))(jax.random.key(4))
  _check_output(labels, out, 16, 48, 64)
  idx, lab = np.asarray(out[0]), np.asarray(out[1])
  np.testing.assert_array_equal(np.bincount(matched[idx[lab == 1]], minlength=3), [6, 5, 5])
  assert (overlaps[idx[lab == 0]] == 0.4).sum() == 10


# ---------------------------------------------------------------------------
# SNIP


def test_snip_valid_ranges():
  # sqrt areas 20, 40, 100, 160, 200.
  boxes = np.array([[0, 0, 20, 20], [10, 10, 50, 50], [0, 0, 50, 200], [0, 0, 160, 160],
                    [0, 0, 400, 100]], np.float32)
  np.testing.assert_array_equal(sampling.snip_valid(boxes, (40, 160)),
                                [False, True, True, True, False])
  np.testing.assert_array_equal(sampling.snip_valid(boxes, (-1, 80)),
                                [True, True, False, False, False])
  np.testing.assert_array_equal(sampling.snip_valid(boxes, (120, -1)),
                                [False, False, False, True, True])
  # Input pixels at scale 2 (sy = sx = 2): the same boxes are half as big in the original.
  np.testing.assert_array_equal(
      sampling.snip_valid(boxes, (40, 160), scale=np.array([2.0, 2.0])),
      [False, False, True, True, True])


def test_snip_anchor_labels_ignores_overlap_with_invalid_gt():
  labels = np.array([1, 1, 0, 0, -1], np.int32)
  iou = np.array([[0.8, 0.0], [0.5, 0.35], [0.1, 0.31], [0.0, 0.3], [0.0, 0.9]], np.float32)
  got = sampling.snip_anchor_labels(labels, iou, np.array([True, True]),
                                    np.array([True, False]))
  np.testing.assert_array_equal(got, [1, -1, -1, 0, -1])
  # A padding ground truth never ignores anything.
  got = sampling.snip_anchor_labels(labels, iou, np.array([True, False]),
                                    np.array([True, False]))
  np.testing.assert_array_equal(got, labels)
