"""Tests for jaxdet.ops.matching.argmax_match."""

import functools

import jax
import numpy as np
import pytest

from jaxdet.ops import matching


def _ref_match(sim, valid, pos, neg, low_quality, ignore=None):
  """Loop-form reference of the documented semantics."""
  n, m = sim.shape
  ignore = np.zeros(m, bool) if ignore is None else ignore
  usable = [j for j in range(m) if valid[j] and not ignore[j]]
  crowd = [j for j in range(m) if valid[j] and ignore[j]]
  matched = np.zeros(n, np.int32)
  labels = np.zeros(n, np.int32)
  for i in range(n):
    best, arg = -np.inf, 0
    for j in usable:
      if sim[i, j] > best:
        best, arg = sim[i, j], j
    matched[i] = arg
    if best >= pos:
      labels[i] = 1
    elif best >= neg or any(sim[i, j] >= neg for j in crowd):
      labels[i] = -1
  if low_quality:
    forced_by = [[] for _ in range(n)]
    for j in usable:
      col_best = max(sim[i, j] for i in range(n))
      if col_best <= 0:
        continue
      for i in range(n):
        if sim[i, j] == col_best:
          forced_by[i].append(j)
    for i in range(n):
      if forced_by[i]:
        labels[i] = 1
        matched[i] = max(forced_by[i], key=lambda j: (sim[i, j], -j))
  return matched, labels


def _match(sim, valid, pos, neg, low_quality, ignore=None):
  fn = jax.jit(functools.partial(
      matching.argmax_match, positive_threshold=pos, negative_threshold=neg,
      allow_low_quality=low_quality))
  matched, labels = fn(sim, valid, gt_ignore=ignore)
  assert matched.dtype == np.int32 and labels.dtype == np.int32
  return np.asarray(matched), np.asarray(labels)


def test_hand_case_thresholds_and_band():
  sim = np.array([
      [0.8, 0.1],   # positive for gt 0
      [0.5, 0.6],   # ignore band for gt 1 (0.4 <= 0.6 < 0.7)
      [0.2, 0.3],   # negative
      [0.1, 0.75],  # positive for gt 1
  ], np.float32)
  valid = np.array([True, True])
  matched, labels = _match(sim, valid, 0.7, 0.4, False)
  np.testing.assert_array_equal(labels, [1, -1, 0, 1])
  np.testing.assert_array_equal(matched, [0, 1, 1, 1])
  # The threshold itself is positive (>=); below negative_threshold is negative.
  matched, labels = _match(sim, valid, 0.75, 0.3, False)
  np.testing.assert_array_equal(labels, [1, -1, -1, 1])


def test_low_quality_forcing_with_ties():
  sim = np.array([
      [0.3, 0.0, 0.0],
      [0.3, 0.1, 0.0],  # tie for gt 0's best; gt 1's best (0.1) too
      [0.1, 0.05, 0.0],
  ], np.float32)
  valid = np.array([True, True, True])  # gt 2 has no overlap: not forced
  _, labels = _match(sim, valid, 0.5, 0.4, False)
  np.testing.assert_array_equal(labels, [0, 0, 0])
  matched, labels = _match(sim, valid, 0.5, 0.4, True)
  np.testing.assert_array_equal(labels, [1, 1, 0])
  np.testing.assert_array_equal(matched[:2], [0, 0])  # 0.3 > 0.1 for anchor 1


def test_forcing_reassigns_to_forcing_gt():
  # Anchor 0 is positive for gt 0 by threshold but is gt 1's only overlap;
  # gt 0 has a better anchor (1), so anchor 0 moves to gt 1.
  sim = np.array([[0.6, 0.3], [0.9, 0.0]], np.float32)
  matched, labels = _match(sim, np.array([True, True]), 0.5, 0.5, True)
  np.testing.assert_array_equal(labels, [1, 1])
  np.testing.assert_array_equal(matched, [1, 0])


def test_padding_and_crowd():
  sim = np.array([
      [0.9, 0.0, 0.0],   # would match the padding gt 0 -> must not
      [0.0, 0.8, 0.6],   # positive for gt 1 despite crowd overlap
      [0.0, 0.2, 0.7],   # only on the crowd -> ignore
      [0.0, 0.1, 0.2],   # negative
  ], np.float32)
  valid = np.array([False, True, True])
  crowd = np.array([True, False, True])  # padding gt 0 flagged crowd: no effect
  matched, labels = _match(sim, valid, 0.5, 0.4, True, crowd)
  np.testing.assert_array_equal(labels, [0, 1, -1, 0])
  assert matched[1] == 1
  ref = _ref_match(sim, valid, 0.5, 0.4, True, crowd)
  np.testing.assert_array_equal(labels, ref[1])


def test_zero_valid_gts_all_negative():
  sim = np.random.default_rng(0).uniform(0, 1, (10, 4)).astype(np.float32)
  matched, labels = _match(sim, np.zeros(4, bool), 0.5, 0.4, True)
  np.testing.assert_array_equal(labels, 0)
  np.testing.assert_array_equal(matched, 0)
  matched, labels = matching.argmax_match(
      np.zeros((5, 0), np.float32), np.zeros(0, bool), positive_threshold=0.5,
      negative_threshold=0.5)
  assert matched.shape == (5,) and np.all(np.asarray(labels) == 0)


@pytest.mark.parametrize('low_quality', [False, True])
@pytest.mark.parametrize('thresholds', [(0.5, 0.5), (0.7, 0.3)])
def test_random_against_reference(low_quality, thresholds):
  rng = np.random.default_rng(1)
  for _ in range(4):
    # Quantised similarities make ties (and forced-tie sets) common.
    sim = (rng.integers(0, 11, (40, 7)) / 10).astype(np.float32)
    sim[rng.random(sim.shape) < 0.5] = 0
    valid = rng.random(7) < 0.8
    crowd = rng.random(7) < 0.2
    got = _match(sim, valid, *thresholds, low_quality, crowd)
    ref = _ref_match(sim, valid, *thresholds, low_quality, crowd)
    np.testing.assert_array_equal(got[1], ref[1])
    pos = ref[1] == 1
    np.testing.assert_array_equal(got[0][pos], ref[0][pos])


def test_under_vmap():
  rng = np.random.default_rng(2)
  sims = (rng.integers(0, 11, (3, 30, 5)) / 10).astype(np.float32)
  valid = rng.random((3, 5)) < 0.7
  valid[1] = False  # one image without objects
  crowd = rng.random((3, 5)) < 0.2
  fn = jax.jit(jax.vmap(functools.partial(
      matching.argmax_match, positive_threshold=0.5, negative_threshold=0.4)))
  matched, labels = fn(sims, valid, gt_ignore=crowd)
  assert matched.shape == (3, 30) and labels.shape == (3, 30)
  for b in range(3):
    ref = _ref_match(sims[b], valid[b], 0.5, 0.4, True, crowd[b])
    np.testing.assert_array_equal(labels[b], ref[1])
    np.testing.assert_array_equal(np.asarray(matched[b])[ref[1] == 1], ref[0][ref[1] == 1])
  assert np.all(np.asarray(labels[1]) == 0)
