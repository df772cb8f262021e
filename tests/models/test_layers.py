"""Tests for jaxdet/models/layers.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

from jaxdet.models import layers


def test_activations_match_closed_forms():
  x = np.linspace(-4.0, 4.0, 101, dtype=np.float32)
  np.testing.assert_allclose(layers.activation('relu')(x), np.maximum(x, 0.0))
  np.testing.assert_allclose(layers.activation('swish')(x), x / (1.0 + np.exp(-x)),
                             rtol=1e-5, atol=1e-6)
  # The exact (erf) GELU, not the tanh approximation.
  np.testing.assert_allclose(layers.activation('gelu')(x),
                             0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0))),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layers.activation('identity')(x), x)
  with pytest.raises(ValueError, match='mish'):
    layers.activation('mish')


def _conv_output(padding, strides):
  """A 3x3 all-ones kernel on an all-ones 8x8 input counts the real pixels under it."""
  module = layers.ConvNormAct(1, 3, strides, padding=padding, use_norm=False, activation=None)
  x = jnp.ones((1, 8, 8, 1))
  params = {'params': {'conv': {'kernel': jnp.ones((3, 3, 1, 1)), 'bias': jnp.zeros((1,))}}}
  return np.asarray(module.apply(params, x, train=False))[0, :, :, 0]


def test_conv_padding_fixed_is_symmetric_and_same_is_not():
  fixed = _conv_output('FIXED', 2)
  same = _conv_output('SAME', 2)
  assert fixed.shape == same.shape == (4, 4)
  # FIXED pads one pixel on every side: the first window hangs over the top-left
  # border (2x2 real pixels), the last one ends inside the image.
  assert fixed[0, 0] == 4 and fixed[-1, -1] == 9
  # SAME pads (0, 1) for a stride-2 3x3 window on an even input.
  assert same[0, 0] == 9 and same[-1, -1] == 4
  # Stride 1 with an odd kernel: both pad symmetrically.
  np.testing.assert_array_equal(_conv_output('FIXED', 1), _conv_output('SAME', 1))


def test_conv_norm_act_has_no_bias_before_norm():
  module = layers.ConvNormAct(4, 3)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)), train=False))
  assert set(shapes['params']['conv']) == {'kernel'}
  assert set(shapes['params']['bn']) == {'scale', 'bias'}
  assert set(shapes['batch_stats']['bn']) == {'mean', 'var'}


def test_upsample_nearest():
  x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
  y = np.asarray(layers.upsample_nearest(x, 2))
  assert y.shape == (1, 4, 6, 1)
  rows, cols = np.meshgrid(np.arange(4), np.arange(6), indexing='ij')
  np.testing.assert_array_equal(y[0, :, :, 0], x[0, rows // 2, cols // 2, 0])


class TestStochasticDepth:

  def test_eval_and_zero_rate_are_identity(self):
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    np.testing.assert_array_equal(layers.StochasticDepth(0.5).apply({}, x, train=False), x)
    np.testing.assert_array_equal(layers.StochasticDepth(0.0).apply({}, x, train=True), x)

  def test_drop_rate_and_expectation(self):
    rate, n = 0.3, 20000
    x = jnp.ones((n, 2, 2, 3))
    y = np.asarray(layers.StochasticDepth(rate).apply(
        {}, x, train=True, rngs={'drop_path': jax.random.key(1)}))
    per_sample = y.reshape(n, -1)
    # The whole residual branch of a sample is dropped or kept together.
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    kept = per_sample[:, 0]
    assert set(np.unique(kept)) <= {0.0, np.float32(1.0 / (1.0 - rate))}
    # Binomial standard deviation is sqrt(0.21 / 20000) ~ 0.0032.
    assert abs(np.mean(kept == 0.0) - rate) < 0.015
    assert abs(np.mean(kept) - 1.0) < 0.025


class TestDropBlock:

  def test_eval_and_keep_prob_one_are_identity(self):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    np.testing.assert_array_equal(layers.DropBlock(0.8, 5).apply({}, x, train=False), x)
    np.testing.assert_array_equal(layers.DropBlock(1.0, 5).apply({}, x, train=True), x)

  def test_dropped_fraction(self):
    keep_prob, bs, size = 0.9, 5, 32
    x = jnp.ones((16, size, size, 8))
    y = np.asarray(layers.DropBlock(keep_prob, bs).apply(
        {}, x, train=True, rngs={'dropblock': jax.random.key(2)}))
    dropped = np.mean(y == 0.0)
    # Closed form: a pixel survives iff none of the n(pixel) valid seeds whose
    # block covers it fires, each with probability gamma.
    gamma = (1 - keep_prob) / bs**2 * size**2 / (size - bs + 1)**2
    seeds = np.zeros((size, size))
    seeds[bs // 2:size - (bs - 1) // 2, bs // 2:size - (bs - 1) // 2] = 1
    n = scipy.ndimage.uniform_filter(seeds, bs, mode='constant') * bs**2
    expected = np.mean(1.0 - (1.0 - gamma)**np.round(n))
    assert abs(dropped - expected) < 0.01
    # Overlapping blocks make the realized rate a bit below 1 - keep_prob.
    assert abs(dropped - (1.0 - keep_prob)) < 0.02
    # Renormalization by the kept fraction preserves the mean exactly here.
    np.testing.assert_allclose(np.mean(y), 1.0, rtol=1e-5)

  def test_blocks_are_contiguous_squares(self):
    bs = 5
    x = jnp.ones((4, 32, 32, 16))
    y = np.asarray(layers.DropBlock(0.97, bs).apply(
        {}, x, train=True, rngs={'dropblock': jax.random.key(3)}))
    masks = (y == 0.0).transpose(0, 3, 1, 2).reshape(-1, 32, 32)
    assert masks.sum() > 0
    square = np.ones((bs, bs), bool)
    for m in masks:
      # A union of bs x bs squares inside the map is unchanged by an opening
      # with a bs x bs square; isolated pixels or thin strips would vanish.
      np.testing.assert_array_equal(scipy.ndimage.binary_opening(m, square), m)

  def test_mean_preserved_and_traced_keep_prob(self):
    x = jax.random.uniform(jax.random.key(4), (8, 24, 24, 8), minval=0.5, maxval=1.5)
    module = layers.DropBlock(block_size=3)
    fn = jax.jit(lambda kp: module.apply(
        {}, x, train=True, keep_prob=kp, rngs={'dropblock': jax.random.key(5)}))
    y = np.asarray(fn(0.8))
    assert 0.15 < np.mean(y == 0.0) < 0.21
    np.testing.assert_allclose(np.mean(y), np.mean(x), rtol=0.02)
    # keep_prob 1 through the traced path draws no seeds.
    np.testing.assert_allclose(fn(1.0), x, rtol=1e-6)

  def test_scheduled_keep_prob_falls_linearly_and_counts_training_steps(self):
    # keep 0.8 reached over 4 training calls: dropped fractions ~0, 0.05, 0.1, 0.15, 0.2,
    # then 0.2; eval calls neither drop nor advance the schedule.
    x = jnp.ones((8, 32, 32, 8))
    module = layers.DropBlock(0.8, 3, warmup_steps=4)
    variables = module.init(jax.random.key(0), x, train=False)
    assert float(variables['batch_stats']['step']) == 0.0
    np.testing.assert_array_equal(module.apply(variables, x, train=False), x)
    fractions = []
    for i in range(6):
      y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropblock': jax.random.key(i)})
      variables = {**variables, **updates}
      fractions.append(np.mean(np.asarray(y) == 0.0))
    assert float(variables['batch_stats']['step']) == 6.0
    assert fractions[0] == 0.0
    want = [0.0, 0.05, 0.1, 0.15, 0.2, 0.2]
    np.testing.assert_allclose(fractions, want, atol=0.02)
    assert fractions[1] < fractions[2] < fractions[3] < fractions[4]


class _Toy(layers.ConvNormAct):
  pass


def test_build_module_validates_keys():
  cfg = ml_collections.ConfigDict(dict(name='toy', features=8, activation='swish'))
  module = layers.build_module(_Toy, cfg, 'bfloat16')
  assert module.features == 8 and module.activation == 'swish'
  assert module.dtype == jnp.bfloat16
  cfg.kernal_size = 3
  with pytest.raises(ValueError, match="'kernal_size'.*kernel_size"):
    layers.build_module(_Toy, cfg, 'float32')
