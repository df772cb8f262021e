"""Tests for jaxdet.losses against closed-form values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _ref_focal(x, t, alpha, gamma):
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  p = _np_sigmoid(x)
  pt = np.where(t == 1, p, 1 - p)
  at = np.where(t == 1, alpha, 1 - alpha)
  return -at * (1 - pt)**gamma * np.log(pt)


def test_focal_matches_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, 200).astype(np.float32)
  t = (rng.random(200) < 0.3).astype(np.float32)
  for gamma in (0.0, 1.5, 2.0):
    np.testing.assert_allclose(losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma),
                               _ref_focal(x, t, 0.25, gamma), rtol=2e-5, atol=1e-7)


def test_focal_gamma0_is_weighted_bce():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 2, (4, 5)).astype(np.float32)
  t = (rng.random((4, 5)) < 0.5).astype(np.float32)
  bce = losses.sigmoid_cross_entropy(x, t)
  weights = np.where(t == 1, 0.25, 0.75)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=0.0),
                             weights * bce, rtol=1e-6)


def test_focal_hand_values_and_stability():
  # x = 0: p = 0.5; positive: 0.25 * 0.25 * log 2; negative: 0.75 * 0.25 * log 2.
  out = losses.sigmoid_focal_loss(np.zeros(2), np.array([1.0, 0.0]), alpha=0.25, gamma=2.0)
  np.testing.assert_allclose(out, [0.0625 * math.log(2), 0.1875 * math.log(2)], rtol=1e-6)
  # Large logits: a confident mistake costs alpha * |x|, a confident hit ~0.
  x = np.array([-200.0, 200.0, 200.0, -200.0], np.float32)
  t = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  out = np.asarray(losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=1.5))
  np.testing.assert_allclose(out[:2], [0.25 * 200, 0.75 * 200], rtol=1e-6)
  assert np.all(out[2:] < 1e-30)
  for gamma in (0.0, 1.5):
    grad = jax.jit(jax.grad(lambda z: losses.sigmoid_focal_loss(z, t, gamma=gamma).sum()))(x)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_huber():
  x = np.array([0.0, 0.05, -0.1, 0.3, -2.0], np.float32)
  want = [0.0, 0.5 * 0.05**2, 0.5 * 0.01, 0.1 * (0.3 - 0.05), 0.1 * (2.0 - 0.05)]
  np.testing.assert_allclose(losses.huber_loss(x, 0.0, delta=0.1), want, rtol=1e-6)
  np.testing.assert_allclose(losses.huber_loss(x + 1.0, np.ones(5), delta=0.1), want,
                             rtol=1e-5, atol=1e-8)
  grad = jax.jit(jax.grad(lambda z: losses.huber_loss(z, 0.0, delta=0.1).sum()))(x)
  np.testing.assert_allclose(grad, [0.0, 0.05, -0.1, 0.1, -0.1], rtol=1e-6)


def test_smooth_l1():
  x = np.array([0.0, 0.05, 0.5, -3.0], np.float32)
  want = [0.0, 0.5 * 0.05**2 / 0.11, 0.5 - 0.055, 3.0 - 0.055]
  np.testing.assert_allclose(losses.smooth_l1_loss(x, 0.0, beta=0.11), want, rtol=1e-5)
  np.testing.assert_allclose(losses.smooth_l1_loss(x, 0.0, beta=0.11),
                             losses.huber_loss(x, 0.0, delta=0.11) / 0.11, rtol=1e-6)
  np.testing.assert_allclose(losses.smooth_l1_loss(x, 0.0, beta=0.0), np.abs(x))


def test_giou_loss():
  pred = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]], np.float32)
  target = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [4, 4, 6, 6], [0, 0, 0, 0]], np.float32)
  want = [0.0, 1 - (1 / 7 - 2 / 9), 1 + 28 / 36, 1.0]
  out = jax.jit(losses.giou_loss)(pred, target)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda p: losses.giou_loss(p, target).sum()))(pred)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_sigmoid_cross_entropy():
  x = np.array([-3.0, 0.0, 2.0, 100.0, -100.0], np.float32)
  t = np.array([1.0, 0.0, 0.3, 0.0, 0.0], np.float32)
  p = _np_sigmoid(x.astype(np.float64))
  with np.errstate(divide='ignore', invalid='ignore'):
    want = -(t * np.log(p) + (1 - t) * np.log1p(-p))
  want[3] = 100.0  # p rounds to 1 in float64: the naive form gives inf
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(x, t), want, rtol=1e-6,
                             atol=1e-30)


@pytest.mark.parametrize('use_weights', [False, True])
def test_softmax_cross_entropy(use_weights):
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (2, 3, 5)).astype(np.float32)
  labels = np.array([[0, 4, -1], [2, 2, 1]], np.int32)
  weights = rng.random((2, 3)).astype(np.float32) if use_weights else None
  logits64 = logits.astype(np.float64)
  logp = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))
  want = np.zeros((2, 3))
  for i in range(2):
    for j in range(3):
      if labels[i, j] >= 0:
        want[i, j] = -logp[i, j, labels[i, j]]
  if use_weights:
    want *= weights
  out = jax.jit(losses.softmax_cross_entropy)(logits, labels, weights)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
  assert out[0, 2] == 0


def test_losses_are_float32_for_bf16_inputs():
  x = jnp.ones((3,), jnp.bfloat16)
  assert losses.sigmoid_focal_loss(x, x).dtype == jnp.float32
  assert losses.huber_loss(x, 0.0, delta=0.1).dtype == jnp.float32
  assert losses.sigmoid_cross_entropy(x, x).dtype == jnp.float32
