"""Tests for jaxdet/convert.py: layouts, round trips through files and the CLI, errors."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdet import checkpoint
from jaxdet import convert
from jaxdet.models import layers
from jaxdet.models.backbones import hrnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_HRNET = ml_collections.ConfigDict(dict(
    name='hrnet', width=4, stem_width=8, stage1_width=4, num_modules=(1, 1, 1, 1), num_blocks=1))
TINY_RESNET = ml_collections.ConfigDict(dict(
    name='resnet', depth=50, width=4, norm_momentum=0.9, norm_epsilon=1e-5))


def _random_like(template, seed=0):
  rng = np.random.default_rng(seed)
  # Positive values everywhere keep BN variances valid.
  return jax.tree_util.tree_map(
      lambda s: rng.uniform(0.5, 1.5, size=s.shape).astype(np.float32), template)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_conv_and_batchnorm_layout_against_pytorch_semantics():
  """A torch (conv OIHW NCHW, BN running stats) computation in numpy equals the converted
  ConvNormAct."""
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)      # [O, I, kh, kw]
  bn = {k: rng.uniform(0.5, 1.5, 5).astype(np.float32)
        for k in ('weight', 'bias', 'running_mean', 'running_var')}
  x = rng.normal(size=(1, 3, 7, 6)).astype(np.float32)            # NCHW
  # torch Conv2d(3, 5, 3, stride=2, padding=1), eval-mode BatchNorm2d(eps=1e-5), ReLU.
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  conv = np.zeros((1, 5, 4, 3))
  for i in range(4):
    for j in range(3):
      conv[0, :, i, j] = np.einsum('oikl,ikl->o', weight, xp[0, :, 2 * i:2 * i + 3,
                                                               2 * j:2 * j + 3])
  want = (conv - bn['running_mean'][:, None, None]) / np.sqrt(
      bn['running_var'][:, None, None] + 1e-5) * bn['weight'][:, None, None] + bn['bias'][
          :, None, None]
  want = np.maximum(want, 0).transpose(0, 2, 3, 1)                  # NHWC

  module = layers.ConvNormAct(5, 3, 2, norm_momentum=0.9, norm_epsilon=1e-5)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 7, 6, 3)),
                                                train=False))
  sd = {'c.weight': weight, **{f'b.{k}': v for k, v in bn.items()}}
  variables = convert.from_torch_conv_norm(sd, template, lambda path: ('c', 'b'))
  got = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.allclose(convert.conv_to_torch(convert.conv_to_jax(weight)), weight)
  assert convert.linear_to_jax(np.zeros((4, 3))).shape == (3, 4)


def _torchvision_resnet50_keys():
  """torchvision resnet50().state_dict() keys without fc and num_batches_tracked."""
  keys = []
  conv_bn = lambda c, b: keys.extend([f'{c}.weight', f'{b}.weight', f'{b}.bias',
                                      f'{b}.running_mean', f'{b}.running_var'])
  conv_bn('conv1', 'bn1')
  for layer, blocks in enumerate((3, 4, 6, 3), start=1):
    for i in range(blocks):
      for k in (1, 2, 3):
        conv_bn(f'layer{layer}.{i}.conv{k}', f'layer{layer}.{i}.bn{k}')
    conv_bn(f'layer{layer}.0.downsample.0', f'layer{layer}.0.downsample.1')
  return keys


def test_torchvision_resnet50_names_and_shapes():
  template = convert.backbone_template(convert.default_backbone_config('torchvision_resnet'))
  fake = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), template)
  sd = convert.torchvision_resnet_to_torch(fake)
  assert set(sd) == set(_torchvision_resnet50_keys())
  assert sd['conv1.weight'].shape == (64, 3, 7, 7)
  assert sd['layer1.0.downsample.0.weight'].shape == (256, 64, 1, 1)
  assert sd['layer3.0.conv2.weight'].shape == (256, 256, 3, 3)  # the stride is on the 3x3
  assert sd['layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)
  assert sum(v.size for k, v in sd.items() if 'running' not in k) == 25_557_032 - 2_049_000


@pytest.mark.parametrize('arch, cfg', [('hrnet', TINY_HRNET),
                                       ('torchvision_resnet', TINY_RESNET)])
def test_round_trip_through_an_npz_file(tmp_path, arch, cfg):
  template = convert.backbone_template(cfg)
  variables = _random_like(template)
  to_torch = (hrnet.to_torch if arch == 'hrnet' else convert.torchvision_resnet_to_torch)
  sd = to_torch(variables)
  # What a real checkpoint also holds: BN counters and an ImageNet classifier.
  sd['bn1.num_batches_tracked'] = np.zeros((), np.int64)
  if arch == 'hrnet':
    sd['classifier.weight'] = np.zeros((1000, 2048), np.float32)
  else:
    sd['fc.weight'] = np.zeros((1000, 32), np.float32)
  np.savez(tmp_path / 'w.npz', **sd)
  out = convert.convert(arch, str(tmp_path / 'w.npz'), str(tmp_path / 'ckpt'),
                        backbone_config=cfg)
  _assert_trees_equal(out['params']['backbone'], variables['params'])
  _assert_trees_equal(out['batch_stats']['backbone'], variables['batch_stats'])
  # The backbone-only tree on disk.
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / 'ckpt'))
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, restored), out)


def test_strip_prefix_reads_the_backbone_of_a_detector_checkpoint(tmp_path):
  template = convert.backbone_template(TINY_HRNET)
  variables = _random_like(template, seed=3)
  sd = {f'backbone.{k}': v for k, v in hrnet.to_torch(variables).items()}
  sd['rpn_head.rpn_conv.weight'] = np.zeros((4, 4, 3, 3), np.float32)
  np.savez(tmp_path / 'det.npz', **sd)
  out = convert.convert('hrnet', str(tmp_path / 'det.npz'), backbone_config=TINY_HRNET,
                        strip_prefix='backbone.')
  _assert_trees_equal(out['params']['backbone'], variables['params'])
  with pytest.raises(convert.ConversionError, match='unexpected keys.*rpn_head.rpn_conv'):
    convert.convert('hrnet', str(tmp_path / 'det.npz'), backbone_config=TINY_HRNET)
  with pytest.raises(convert.ConversionError, match='starts with'):
    convert.convert('hrnet', str(tmp_path / 'det.npz'), backbone_config=TINY_HRNET,
                    strip_prefix='model.')


def test_errors_list_missing_unexpected_and_misshaped_keys():
  template = convert.backbone_template(TINY_RESNET)
  sd = convert.torchvision_resnet_to_torch(_random_like(template))
  del sd['layer2.0.downsample.1.running_var']
  del sd['layer4.2.bn3.weight']
  sd['layer5.0.conv1.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  sd['layer1.1.conv2.weight'] = np.zeros((4, 4, 5, 5), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.torchvision_resnet_from_torch(sd, template)
  msg = str(e.value)
  assert ('missing keys (2): layer2.0.downsample.1.running_var, layer4.2.bn3.weight') in msg
  assert 'unexpected keys (1): layer5.0.conv1.weight' in msg
  assert 'layer1.1.conv2.weight: checkpoint (4, 4, 5, 5) vs expected (4, 4, 3, 3)' in msg


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.npz'):
    convert.load_state_dict(str(tmp_path / 'nothere.npz'))
  (tmp_path / 'w.h5').write_bytes(b'x')
  with pytest.raises(ValueError, match='.pth, .safetensors or .npz'):
    convert.load_state_dict(str(tmp_path / 'w.h5'))
  with pytest.raises(ValueError, match='--from'):
    convert.backbone_module('vgg')
  with pytest.raises(ValueError, match='W18'):
    convert.default_backbone_config('hrnet', 'W48')
  np.savez(tmp_path / 'w.npz', a=np.zeros(1))
  with pytest.raises(ValueError, match="builds 'hrnet'"):
    convert.convert('torchvision_resnet', str(tmp_path / 'w.npz'), backbone_config=TINY_HRNET)


def test_pth_files_go_through_torch_load_weights_only(tmp_path):
  path = str(tmp_path / 'w.pth')
  if importlib.util.find_spec('torch') is None:
    open(path, 'wb').close()
    with pytest.raises(ImportError, match='needs PyTorch'):
      convert.load_state_dict(path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({'model': {'a.weight': torch.ones(2, 3), 'n': torch.tensor(3)}}, path)
  sd = convert.load_state_dict(path)
  np.testing.assert_array_equal(sd['a.weight'], np.ones((2, 3), np.float32))


def test_safetensors_files(tmp_path):
  if importlib.util.find_spec('safetensors') is None:
    (tmp_path / 'w.safetensors').write_bytes(b'')
    with pytest.raises(ImportError, match='safetensors'):
      convert.load_state_dict(str(tmp_path / 'w.safetensors'))
    return
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3)},
            str(tmp_path / 'w.safetensors'))
  sd = convert.load_state_dict(str(tmp_path / 'w.safetensors'))
  np.testing.assert_array_equal(sd['a.weight'], np.arange(6).reshape(2, 3))


def test_cli_writes_a_whole_detector_that_init_from_loads(tmp_path):
  """--config: the saved tree is the detector's, with the converted backbone in it."""
  import configs.retinanet_hrnet as cfg_module  # pylint: disable=g-import-not-at-top
  config = cfg_module.get_config('runlocal')
  template = convert.backbone_template(config.model.backbone)
  variables = _random_like(template, seed=5)
  np.savez(tmp_path / 'w.npz', **hrnet.to_torch(variables))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(
      [sys.executable, '-m', 'jaxdet.convert', '--from=hrnet', f'--src={tmp_path}/w.npz',
       f'--dst={tmp_path}/init', '--config=configs/retinanet_hrnet.py:runlocal'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'init_from=' in result.stdout

  from jaxdet import train  # pylint: disable=g-import-not-at-top
  model = importlib.import_module('jaxdet.models.retinanet').Model(config)
  abstract = jax.eval_shape(lambda: train.init_variables(model, config, jax.random.key(0)))
  abstract = {'params': abstract['params'], 'batch_stats': abstract['batch_stats']}
  loaded = checkpoint.import_params(str(tmp_path / 'init'), abstract)
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded['params']['backbone']),
                      variables['params'])
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded['batch_stats']['backbone']),
                      variables['batch_stats'])
  assert set(loaded['params']) == {'backbone', 'neck', 'head'}


def _transformer_round_trip(tmp_path, arch, cfg):
  module = importlib.import_module(f'jaxdet.models.backbones.{arch}')
  template = convert.backbone_template(cfg)
  variables = _random_like(template, seed=7)
  sd = module.to_torch(variables['params'] if arch == 'swin' else variables)
  np.savez(tmp_path / 'w.npz', **sd)
  out = convert.convert(arch, str(tmp_path / 'w.npz'), backbone_config=cfg)
  _assert_trees_equal(out['params']['backbone'], variables['params'])
  _assert_trees_equal(out['batch_stats']['backbone'], variables['batch_stats'])


def test_swin_round_trip(tmp_path):
  _transformer_round_trip(tmp_path, 'swin', ml_collections.ConfigDict(dict(
      name='swin', variant='T', embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
      window_size=3)))


def test_mpvit_round_trip(tmp_path):
  _transformer_round_trip(tmp_path, 'mpvit', ml_collections.ConfigDict(dict(
      name='mpvit', variant='T', num_path=(2, 3, 3, 2), num_layers=(1, 2, 1, 1),
      embed_dims=(8, 16, 16, 24), mlp_ratios=(2, 2, 2, 2), num_heads=(8, 8, 8, 8))))
