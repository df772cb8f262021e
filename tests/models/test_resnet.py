"""Tests for jaxdet/models/backbones/resnet.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.backbones import resnet
import model_testing


def _init_shapes(model, size=64):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


# torchvision.models.resnet{depth}() parameter totals minus the ImageNet fc
# layer (512*1000 + 1000 for basic blocks, 2048*1000 + 1000 for bottlenecks).
# Both count conv kernels and BN scale/bias (torchvision convs have no bias).
@pytest.mark.parametrize('depth, expected', [
    (18, 11_689_512 - 513_000),
    (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000),
    (101, 44_549_160 - 2_049_000),
    (152, 60_192_808 - 2_049_000),
])
def test_param_count_matches_torchvision(depth, expected):
  shapes = _init_shapes(resnet.ResNet(depth=depth))
  assert model_testing.num_params(shapes['params']) == expected
  if depth == 50:
    assert expected == 23_508_032


def test_r50_levels_and_channels():
  model = resnet.ResNet(depth=50)
  variables = _init_shapes(model)
  images = jax.ShapeDtypeStruct((2, 640, 384, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert {l: o.shape for l, o in out.items()} == {
      2: (2, 160, 96, 256), 3: (2, 80, 48, 512), 4: (2, 40, 24, 1024), 5: (2, 20, 12, 2048)}


def test_parameter_names_follow_torchvision_layout():
  params = _init_shapes(resnet.ResNet(depth=50))['params']
  blocks = [k for k in params if k.startswith('stage')]
  assert len(blocks) == 3 + 4 + 6 + 3
  assert 'stem' in params and set(params['stem']) == {'conv', 'bn'}
  assert params['stem']['conv']['kernel'].shape == (7, 7, 3, 64)
  # Only the first block of each stage has a projection (torchvision `downsample`).
  with_shortcut = sorted(k for k in blocks if 'shortcut' in params[k])
  assert with_shortcut == ['stage2_block0', 'stage3_block0', 'stage4_block0', 'stage5_block0']
  block = params['stage3_block1']
  assert block['conv1']['conv']['kernel'].shape == (1, 1, 512, 128)
  assert block['conv2']['conv']['kernel'].shape == (3, 3, 128, 128)
  assert block['conv3']['conv']['kernel'].shape == (1, 1, 128, 512)


def test_build_from_config_and_dtype():
  cfg = ml_collections.ConfigDict(dict(name='resnet', depth=18, width=8))
  model = resnet.build(cfg, 'bfloat16')
  variables = _init_shapes(model)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), train=False), variables)
  assert {l: o.shape[-1] for l, o in out.items()} == {2: 8, 3: 16, 4: 32, 5: 64}
  assert all(o.dtype == jnp.bfloat16 for o in out.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  cfg.stochastic_depth = 0.1
  with pytest.raises(ValueError, match='stochastic_depth_rate'):
    resnet.build(cfg, 'float32')


def test_tiny_forward():
  model = resnet.ResNet(depth=50, width=4, stochastic_depth_rate=0.5)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model_testing.random_variables(_init_shapes(model))

  def forward(variables, images, key):
    eval_out = model.apply(variables, images, train=False)
    train_out, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                     rngs={'drop_path': key})
    return eval_out, train_out, updates

  forward = model_testing.compile_quickly(jax.jit(forward).lower(variables, images, jax.random.key(0)))
  eval_out, train_out, updates = forward(variables, images, jax.random.key(2))
  for l in range(2, 6):
    assert eval_out[l].shape == (2, 64 // 2**l, 64 // 2**l, 4 * 4 * 2**(l - 2))
    assert np.all(np.isfinite(eval_out[l])) and np.all(np.isfinite(train_out[l]))
    # Every block ends in a ReLU.
    assert np.min(eval_out[l]) >= 0.0
  # Train mode normalizes with batch statistics and updates the moving averages.
  assert not np.allclose(eval_out[5], train_out[5])
  old = variables['batch_stats']['stage2_block0']['conv1']['bn']['mean']
  new = updates['batch_stats']['stage2_block0']['conv1']['bn']['mean']
  assert not np.allclose(old, new)
  # Stochastic depth is random in train mode only.
  _, train_out2, _ = forward(variables, images, jax.random.key(3))
  assert not np.allclose(train_out[5], train_out2[5])
  eval_out2, _, _ = forward(variables, images, jax.random.key(3))
  np.testing.assert_array_equal(eval_out[5], eval_out2[5])


def test_dropblock_on_levels_4_and_5_only_in_training():
  # Protocol A's DropBlock: the blocks of levels 4 and 5 drop squares in training; levels
  # 2 and 3 and the whole eval pass are untouched, and keep_prob 1.0 is the plain ResNet.
  images = jax.random.normal(jax.random.key(0), (2, 128, 128, 3))
  plain = resnet.ResNet(depth=18, width=8)
  dropped = resnet.ResNet(depth=18, width=8, dropblock_keep_prob=0.7, dropblock_size=3)
  variables = plain.init(jax.random.key(1), images, train=False)
  rngs = {'dropblock': jax.random.key(2)}
  run = lambda m, train: m.apply(variables, images, train=train, rngs=rngs,
                                 mutable=['batch_stats'])[0]
  want, got = run(plain, True), run(dropped, True)
  for level in (2, 3):
    np.testing.assert_array_equal(got[level], want[level])
  for level in (4, 5):
    assert not np.allclose(got[level], want[level])
  # Whole squares of level 4's last block output are zero in some channel.
  assert np.mean(np.asarray(got[4]) == 0) > np.mean(np.asarray(want[4]) == 0)
  for level, x in dropped.apply(variables, images, train=False).items():
    np.testing.assert_array_equal(x, plain.apply(variables, images, train=False)[level])
