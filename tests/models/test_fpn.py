"""Tests for jaxdet/models/necks/fpn.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.necks import fpn
import model_testing


def _shapes(model, features):
  return jax.eval_shape(lambda f: model.init(jax.random.key(0), f, train=False), features)


def _conv(x, kernel, bias, stride):
  """NumPy conv with symmetric (k-1)//2 padding. x: [B, H, W, Cin]; kernel: [k, k, Cin, Cout]."""
  k = kernel.shape[0]
  before = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)))
  out_h = (xp.shape[1] - k) // stride + 1
  out_w = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, di:di + stride * out_h:stride, dj:dj + stride * out_w:stride]
      out += patch @ kernel[di, dj]
  return out + bias


def _reference_fpn(params, features, min_level, max_level):
  """The TPU FPN recomputed in NumPy (no BN)."""
  top = max(features)
  conv = lambda name, x, s: _conv(x, np.asarray(params[name]['kernel'], np.float64),
                                  np.asarray(params[name]['bias']), s)
  lateral = {l: conv(f'lateral{l}', features[l], 1) for l in range(min_level, top + 1)}
  merged = {top: lateral[top]}
  for l in range(top - 1, min_level - 1, -1):
    up = merged[l + 1].repeat(2, axis=1).repeat(2, axis=2)
    h, w = lateral[l].shape[1:3]
    merged[l] = up[:, :h, :w] + lateral[l]
  out = {l: conv(f'output{l}', merged[l], 1) for l in range(min_level, top + 1)}
  for l in range(top + 1, max_level + 1):
    x = out[l - 1] if l == top + 1 else np.maximum(out[l - 1], 0.0)
    out[l] = conv(f'extra{l}', x, 2)
  return out


def _features(sizes, channels, seed=1):
  rng = np.random.default_rng(seed)
  return {l: rng.normal(size=(2, h, w, c)).astype(np.float32)
          for (l, (h, w)), c in zip(sizes.items(), channels)}


@pytest.mark.parametrize('sizes', [
    {3: (8, 12), 4: (4, 6), 5: (2, 3)},
    # Odd sizes from ceil-mode strides: the upsampled map is cropped.
    {3: (5, 7), 4: (3, 4), 5: (2, 2)},
])
def test_matches_numpy_reference(sizes):
  features = _features(sizes, (3, 5, 6))
  model = fpn.FPN(num_filters=4, use_norm=False)
  variables = model_testing.random_variables(_shapes(model, features))
  out = model.apply(variables, features, train=False)
  expected = _reference_fpn(variables['params'], features, 3, 7)
  assert sorted(out) == [3, 4, 5, 6, 7]
  for l in range(3, 8):
    np.testing.assert_allclose(out[l], expected[l], rtol=1e-4, atol=1e-4)


def test_norm_follows_all_convs():
  """BN comes after every level is computed: P6/P7 read the pre-BN P5/P6."""
  features = _features({3: (8, 8), 4: (4, 4), 5: (2, 2)}, (3, 5, 6))
  plain = fpn.FPN(num_filters=4, use_norm=False)
  normed = fpn.FPN(num_filters=4, use_norm=True, norm_epsilon=1e-3)
  variables = model_testing.random_variables(_shapes(normed, features))
  out = normed.apply(variables, features, train=False)
  ref = plain.apply({'params': {k: v for k, v in variables['params'].items()
                                if not k.startswith('bn')}}, features, train=False)
  # With identity statistics BN divides by sqrt(1 + eps) and nothing else.
  for l in range(3, 8):
    np.testing.assert_allclose(out[l], ref[l] / np.sqrt(1.0 + 1e-3), rtol=1e-5, atol=1e-5)


def test_r50_param_count_and_shapes():
  features = {l: jax.ShapeDtypeStruct((2, 640 // 2**l, 640 // 2**l, c), jnp.float32)
              for l, c in ((2, 256), (3, 512), (4, 1024), (5, 2048))}
  model = fpn.build(ml_collections.ConfigDict(dict(name='fpn')), 'float32')
  shapes = _shapes(model, features)
  laterals = (512 + 1024 + 2048) * 256 + 3 * 256         # 1x1 convs with bias
  outputs = 3 * (9 * 256 * 256 + 256)                     # P3-P5 3x3 convs
  extras = 2 * (9 * 256 * 256 + 256)                      # P6, P7 3x3/2 convs
  norms = 5 * 2 * 256                                     # BN scale + bias per level
  expected = laterals + outputs + extras + norms
  assert expected == 3_871_232
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == expected
  out = jax.eval_shape(lambda v, f: model.apply(v, f, train=False), shapes, features)
  assert {l: o.shape for l, o in out.items()} == {
      l: (2, 640 // 2**l, 640 // 2**l, 256) for l in range(3, 8)}


def test_missing_level_and_unknown_key():
  features = _features({4: (4, 4), 5: (2, 2)}, (5, 6))
  with pytest.raises(ValueError, match='levels 3..5'):
    _shapes(fpn.FPN(), features)
  with pytest.raises(ValueError, match="'num_channels'"):
    fpn.build(ml_collections.ConfigDict(dict(name='fpn', num_channels=128)), 'float32')
