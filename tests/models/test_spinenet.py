"""Tests for jaxdet/models/backbones/spinenet.py."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.backbones import spinenet
import model_testing


@functools.lru_cache
def _shapes_of(model_id):
  """Variable shapes of a default SpineNet (they do not depend on the image size)."""
  return _init_shapes(spinenet.SpineNet(model_id=model_id), size=640)


def _init_shapes(model, size=256):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


# Backbone parameters (conv kernels + BN scale/bias) at 640x640. With the
# RetinaNet head of the paper (4 shared 3x3 convs per branch with per-level BN,
# 9 anchors, 91 classes; 128 filters for 49S, 256 for 49/96/143, 7 x 512 for
# 190) the totals are 11.27M / 28.54M / 42.97M / 66.96M / 163.64M against the
# paper's 12.0M / 28.5M / 43.0M / 66.9M / 163.6M (see spinenet.py on 49S).
@pytest.mark.parametrize('model_id, expected', [
    ('49S', 9_089_215),
    ('49', 21_831_488),
    ('96', 36_262_976),
    ('143', 60_247_616),
    ('190', 126_587_664),
])
def test_param_counts(model_id, expected):
  assert model_testing.num_params(_shapes_of(model_id)['params']) == expected


def test_levels_and_channels():
  model = spinenet.SpineNet(model_id='49')
  variables = _shapes_of('49')
  images = jax.ShapeDtypeStruct((2, 640, 384, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert {l: o.shape for l, o in out.items()} == {
      l: (2, 640 // 2**l, 384 // 2**l, 256) for l in range(3, 8)}


def test_architecture_follows_spec():
  params = _shapes_of('96')['params']
  # Stem: the 7x7 conv keeps 64 channels; two L2 bottleneck groups of width 64.
  assert params['stem']['conv']['kernel'].shape == (7, 7, 3, 64)
  for g in range(2):
    assert set(params[f'stem_group{g}']) == {'block0', 'block1'}  # block_repeats = 2
  # Only the first stem block changes the channel count (64 -> 256).
  assert 'shortcut' in params['stem_group0']['block0']
  assert 'shortcut' not in params['stem_group1']['block0']
  for i, spec in enumerate(spinenet.SPINENET_BLOCK_SPECS):
    width = spinenet.FILTER_SIZE_MAP[spec.level]
    group = params[f'group{i}']
    assert 'shortcut' not in group['block0']
    last = 'conv3' if spec.block_fn == 'bottleneck' else 'conv2'
    expansion = 4 if spec.block_fn == 'bottleneck' else 1
    assert group['block1'][last]['conv']['kernel'].shape[-1] == expansion * width
  # Spec 1 is an L4 residual block fed by the L2 stem: 1x1 to int(0.5 * 256 / 4),
  # a 3x3/2 conv (then a max-pool), and a 1x1 to the block's 256 input channels.
  resample = params['resample1_0']
  assert resample['reduce']['conv']['kernel'].shape == (1, 1, 256, 32)
  assert resample['down']['conv']['kernel'].shape == (3, 3, 32, 32)
  assert resample['expand']['conv']['kernel'].shape == (1, 1, 32, 256)
  # Spec 11 (L3 output) upsamples from the L5 block 10: no 'down' conv.
  assert set(params['resample11_1']) == {'reduce', 'expand'}
  assert params['endpoint3']['conv']['kernel'].shape == (1, 1, 512, 256)


def test_specs_from_lists_and_config():
  as_lists = [[s.level, s.block_fn, list(s.input_offsets), s.is_output]
              for s in spinenet.SPINENET_BLOCK_SPECS]
  cfg = ml_collections.ConfigDict(dict(name='spinenet', model_id='49S', block_specs=as_lists))
  model = spinenet.build(cfg, 'bfloat16')
  assert model.dtype == jnp.bfloat16
  assert model_testing.num_params(_init_shapes(model)) == model_testing.num_params(_shapes_of('49S'))
  cfg.filter_scale = 0.5
  with pytest.raises(ValueError, match="'filter_scale'.*filter_size_scale"):
    spinenet.build(cfg, 'float32')


def test_input_size_must_divide_128():
  model = spinenet.SpineNet(filter_size_scale=0.25, endpoints_num_filters=16)
  _init_shapes(model, size=128)
  with pytest.raises(ValueError, match='divisible by 2\\*\\*7 = 128.*192x128'):
    images = jax.ShapeDtypeStruct((1, 192, 128, 3), jnp.float32)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def test_levels_without_output_blocks_are_rejected():
  # Mask R-CNN's default levels 2..6: the specs have no L2 output block.
  with pytest.raises(ValueError, match='output levels \\[3, 4, 5, 6, 7\\]'):
    _init_shapes(spinenet.SpineNet(min_level=2, max_level=6))


def test_tiny_forward_backward():
  model = spinenet.SpineNet(filter_size_scale=0.25, endpoints_num_filters=16,
                            stochastic_depth_rate=0.2)
  images = jax.random.normal(jax.random.key(0), (2, 128, 128, 3))
  variables = model_testing.random_variables(_init_shapes(model, size=128))

  def loss_fn(params, batch_stats, key):
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                               train=True, mutable=['batch_stats'], rngs={'drop_path': key})
    loss = sum(jnp.mean(jnp.square(o)) for o in out.values())
    return loss, (out, updates['batch_stats'])

  step = model_testing.compile_quickly(jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
      variables['params'], variables['batch_stats'], jax.random.key(1)))

  (loss, (out, stats)), grads = step(variables['params'], variables['batch_stats'],
                                     jax.random.key(1))
  assert {l: o.shape for l, o in out.items()} == {
      l: (2, 128 // 2**l, 128 // 2**l, 16) for l in range(3, 8)}
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Gradients reach the stem and the dangling block 11 (group 9), which feeds
  # the L5 output only through the unresampled sum.
  assert np.any(grads['stem']['conv']['kernel'] != 0)
  assert np.any(grads['group9']['block0']['conv1']['conv']['kernel'] != 0)
  old_mean = variables['batch_stats']['stem']['bn']['mean']
  assert not np.allclose(stats['stem']['bn']['mean'], old_mean)
  # Stochastic depth makes the training forward depend on the 'drop_path' key.
  (loss2, _), _ = step(variables['params'], variables['batch_stats'], jax.random.key(2))
  assert loss != loss2
