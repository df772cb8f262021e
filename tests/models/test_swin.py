"""Tests for jaxdet/models/backbones/swin.py: window attention against its naive form,
the bias index against a brute-force construction, padding, parameter counts, the PyTorch
key mapping, and a tiny RetinaNet-Swin that learns."""

import importlib
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdet import parallel
from jaxdet import summary
from jaxdet import train
from jaxdet.data import pipeline
from jaxdet.models import retinanet
from jaxdet.models.backbones import swin
import model_testing
import tiny

TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))


def _init_shapes(model, size=64):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def _random_params(shapes, seed=0, std=0.3):
  """Every parameter random (LayerNorm scales around 1), so that no mapping hides behind
  a constant initialisation."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    value = rng.normal(size=s.shape) * std
    if path[-1].key == 'scale':
      value = 1.0 + value
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------- window ops


def brute_force_index(m):
  index = np.zeros((m * m, m * m), np.int64)
  for p in range(m * m):
    for q in range(m * m):
      dh = p // m - q // m
      dw = p % m - q % m
      index[p, q] = (dh + m - 1) * (2 * m - 1) + (dw + m - 1)
  return index


@pytest.mark.parametrize('m', [1, 2, 3, 7])
def test_relative_position_index_matches_brute_force(m):
  index = swin.relative_position_index(m)
  np.testing.assert_array_equal(index, brute_force_index(m))
  # Every offset of the (2M-1)^2 table is used; the diagonal is offset (0, 0).
  assert set(index.ravel().tolist()) == set(range((2 * m - 1)**2))
  assert np.all(np.diag(index) == (m - 1) * (2 * m - 1) + (m - 1))


def test_window_partition_order_and_inverse():
  x = np.arange(2 * 6 * 9 * 1).reshape(2, 6, 9, 1)
  windows = swin.window_partition(x, 3)                         # [2 * 2 * 3, 9, 1]
  assert windows.shape == (12, 9, 1)
  # Window 4 of image 1 is row 1, column 1 of its 2 x 3 grid; tokens row-major inside.
  np.testing.assert_array_equal(windows[6 + 4, :, 0], x[1, 3:6, 3:6, 0].ravel())
  np.testing.assert_array_equal(swin.window_merge(windows, 3, 6, 9), x)


def naive_window_attention(x, params, num_heads, m, shift):
  """Full attention over the (zero-padded) map where token pairs attend only inside one
  window of the paper's shifted partition: windows displaced by `shift` from the regular
  grid, i.e. along an axis token i is in window floor((i - s) / M). The bias is looked up
  from the tokens' offsets in the map."""
  b, h, w, c = x.shape
  hp, wp = -(-h // m) * m, -(-w // m) * m
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing='ij')
  rows, cols = rows.ravel(), cols.ravel()                       # [T] with T = Hp * Wp
  group = ((rows - shift[0]) // m) * 10_000 + (cols - shift[1]) // m
  allowed = group[:, None] == group[None, :]                    # [T, T]
  table = np.asarray(params['relative_position_bias_table'], np.float64)
  offset = ((rows[:, None] - rows[None, :] + m - 1) * (2 * m - 1)
            + (cols[:, None] - cols[None, :] + m - 1))
  bias = table[np.where(allowed, offset, 0)]                    # [T, T, heads]
  wqkv = np.asarray(params['qkv']['kernel'], np.float64)
  bqkv = np.asarray(params['qkv']['bias'], np.float64)
  d = c // num_heads
  out = np.zeros((b, hp * wp, c))
  for i in range(b):
    tokens = x[i].reshape(-1, c)
    qkv = (tokens @ wqkv + bqkv).reshape(-1, 3, num_heads, d)
    for hd in range(num_heads):
      q, k, v = qkv[:, 0, hd], qkv[:, 1, hd], qkv[:, 2, hd]
      logits = q @ k.T / np.sqrt(d) + bias[:, :, hd]
      logits = np.where(allowed, logits, -np.inf)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[i, :, hd * d:(hd + 1) * d] = weights @ v
  out = out @ np.asarray(params['proj']['kernel']) + np.asarray(params['proj']['bias'])
  return out.reshape(b, hp, wp, c)[:, :h, :w]


@pytest.mark.parametrize('h, w, m, shift', [
    (8, 12, 4, (2, 2)),   # shifted windows, no padding
    (8, 8, 4, (0, 0)),    # regular windows
    (6, 10, 4, (2, 2)),   # padded to 8 x 12, then shifted
    (9, 9, 3, (1, 1)),    # odd window
    (8, 4, 4, (2, 0)),    # shift along one axis only
])
def test_shifted_window_attention_equals_naive_masked_attention(h, w, m, shift):
  heads, c = 2, 8
  module = swin.WindowAttention(num_heads=heads, window_size=m)
  x = jax.random.normal(jax.random.key(1), (2, h, w, c))
  params = _random_params(jax.eval_shape(lambda: module.init(jax.random.key(0), x, shift)),
                          std=0.5)['params']
  out = jax.jit(lambda p, x: module.apply({'params': p}, x, shift))(params, x)
  expected = naive_window_attention(np.asarray(x), params, heads, m, shift)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_shift_mask_separates_wrapped_regions():
  mask = swin.shifted_window_mask(8, 8, 4, 2, 2)                 # 2 x 2 windows of 16 tokens
  assert mask.shape == (4, 16, 16)
  assert set(np.unique(mask).tolist()) == {0.0, swin.MASK_VALUE}
  regions = [len({tuple(row) for row in (window == 0)}) for window in mask]
  # Only the windows on the last row / column hold tokens rolled in from the other side.
  assert regions == [1, 2, 2, 4]


def test_merge_patches_order_and_odd_sizes():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  out = np.asarray(swin.merge_patches(x))
  assert out.shape == (2, 3, 3, 12)
  padded = np.pad(np.asarray(x), ((0, 0), (0, 1), (0, 0), (0, 0)))
  # The reference's x0, x1, x2, x3: (row, col) offsets (0,0), (1,0), (0,1), (1,1).
  for k, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
    for i in range(3):
      for j in range(3):
        np.testing.assert_array_equal(out[:, i, j, 3 * k:3 * k + 3],
                                      padded[:, 2 * i + dy, 2 * j + dx])


# ----------------------------------------------------------------------------- the network


def closed_form_count(c, depths, heads, m=7, num_classes=0):
  """Parameters of the reference Swin, counted from its layer list."""
  total = 3 * 16 * c + c + 2 * c                                 # patch conv + LayerNorm
  for i, (depth, nh) in enumerate(zip(depths, heads)):
    d = c * 2**i
    block = (2 * d + 3 * d * d + 3 * d + (2 * m - 1)**2 * nh + d * d + d   # norm1, attn
             + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d)                    # norm2, mlp
    total += depth * block
    if i < 3:
      total += 2 * 4 * d + 4 * d * 2 * d                         # merging norm + reduction
    if not num_classes:
      total += 2 * d                                             # norm{i}
  if num_classes:
    total += 2 * 8 * c + 8 * c * num_classes + num_classes       # final norm + head
  return total


# Paper / README ImageNet-1K classifiers (reference section 2.1) and timm's exact counts.
@pytest.mark.parametrize('variant, paper, exact', [
    ('T', 28e6, 28_288_354), ('S', 50e6, 49_606_258), ('B', 88e6, 87_768_224)])
def test_classifier_parameter_counts_match_the_paper(variant, paper, exact):
  spec = swin.SWIN_VARIANTS[variant]
  shapes = jax.eval_shape(lambda: swin.SwinTransformer(variant=variant, num_classes=1000).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  count = model_testing.num_params(shapes['params'])
  assert count == closed_form_count(spec['embed_dim'], spec['depths'], spec['num_heads'],
                                    num_classes=1000) == exact
  assert abs(count - paper) / paper < 0.02


def test_detection_backbone_levels_and_names():
  model = swin.SwinTransformer(variant='T')
  variables = _init_shapes(model, 224)
  assert model_testing.num_params(variables['params']) == closed_form_count(
      96, (2, 2, 6, 2), (3, 6, 12, 24)) == 27_520_698
  params = variables['params']
  assert sorted(params) == ['layers_0', 'layers_1', 'layers_2', 'layers_3', 'norm0',
                            'norm1', 'norm2', 'norm3', 'patch_embed']
  assert 'downsample' not in params['layers_3']
  block = params['layers_2']['blocks_5']
  assert block['attn']['relative_position_bias_table'].shape == (169, 12)
  assert block['attn']['qkv']['kernel'].shape == (384, 1152)
  assert params['layers_1']['downsample']['reduction'] == {
      'kernel': jax.ShapeDtypeStruct((768, 384), jnp.float32)}
  images = jax.ShapeDtypeStruct((2, 225, 300, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert {l: o.shape for l, o in out.items()} == {
      2: (2, 57, 75, 96), 3: (2, 29, 38, 192), 4: (2, 15, 19, 384), 5: (2, 8, 10, 768)}


def test_build_from_config_and_dtype():
  cfg = ml_collections.ConfigDict(dict(name='swin', variant='T', **TINY))
  model = swin.build(cfg, 'bfloat16')
  variables = _init_shapes(model)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), train=False),
                       variables)
  assert {l: o.shape[-1] for l, o in out.items()} == {2: 8, 3: 16, 4: 32, 5: 64}
  assert all(o.dtype == jnp.bfloat16 for o in out.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  cfg.stochastic_depth_rate = 0.1
  with pytest.raises(ValueError, match='drop_path_rate'):
    swin.build(cfg, 'float32')
  with pytest.raises(ValueError, match='variant'):
    _init_shapes(swin.SwinTransformer(variant='XL'))


def test_padding_of_sizes_not_divisible_by_patch_or_window():
  model = swin.SwinTransformer(window_size=7, drop_path_rate=0.0, embed_dim=8,
                               depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2))
  variables = _random_params(_init_shapes(model), std=0.2)
  apply = lambda v, x: model.apply(v, x, train=False, capture_intermediates=True)
  run = lambda x: model_testing.compile_quickly(jax.jit(apply).lower(variables, x))(
      variables, x)
  image = jax.random.normal(jax.random.key(0), (1, 30, 30, 3))
  # 30 px -> 8 tokens (padded), then 4, 2, 1: none a multiple of the window, 1 is odd.
  out, state = run(image)
  assert {l: o.shape[1:3] for l, o in out.items()} == {2: (8, 8), 3: (4, 4), 4: (2, 2),
                                                       5: (1, 1)}
  assert all(np.all(np.isfinite(o)) for o in out.values())
  # The patch embedding pads right and bottom with zeros: the same image already padded
  # gives identical features at every level.
  padded = jnp.pad(image, ((0, 0), (0, 2), (0, 2), (0, 0)))
  out_padded, _ = run(padded)
  for l in out:
    np.testing.assert_allclose(out[l], out_padded[l], rtol=1e-5, atol=1e-5)
  # The conv is the reference's patchify: 4x4 blocks times the kernel.
  proj = state['intermediates']['patch_embed']['proj']['__call__'][0]
  kernel = np.asarray(variables['params']['patch_embed']['proj']['kernel'])   # [4, 4, 3, C]
  patches = np.asarray(padded)[0].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4)
  expected = np.einsum('yxhwc,hwco->yxo', patches, kernel) + np.asarray(
      variables['params']['patch_embed']['proj']['bias'])
  np.testing.assert_allclose(proj[0], expected, rtol=1e-4, atol=1e-5)
  # An odd map is padded before merging: 7 tokens -> 4 -> 2 -> 1.
  out = jax.eval_shape(lambda x: model.apply(variables, x, train=False),
                       jax.ShapeDtypeStruct((2, 28, 52, 3), jnp.float32))
  assert {l: o.shape[1:3] for l, o in out.items()} == {2: (7, 13), 3: (4, 7), 4: (2, 4),
                                                       5: (1, 2)}


def test_remat_gives_the_same_values_and_gradients_and_drop_path_is_random():
  stage = lambda remat: swin.SwinStage(num_heads=2, drop_paths=(0.3, 0.3), window_size=4,
                                       downsample=True, remat=remat)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  variables = _random_params(jax.eval_shape(
      lambda: stage(False).init(jax.random.key(0), x, train=False)), std=0.2)
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(
      lambda: stage(True).init(jax.random.key(0), x, train=False)))

  def loss(remat, variables, key):
    out, down = stage(remat).apply(variables, x, train=True, rngs={'drop_path': key})
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(down))

  def both(variables, key):
    return (jax.value_and_grad(lambda v: loss(False, v, key))(variables),
            jax.value_and_grad(lambda v: loss(True, v, key))(variables))

  both = model_testing.compile_quickly(jax.jit(both).lower(variables, jax.random.key(0)))
  (v1, g1), (v2, g2) = both(variables, jax.random.key(3))
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  # Recomputation may fuse differently: equal up to float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g2)
  (v3, _), _ = both(variables, jax.random.key(4))
  assert not np.isclose(v1, v3)   # stochastic depth draws from the 'drop_path' stream
  # The whole network takes the option with unchanged parameter names.
  plain, remat = (_init_shapes(swin.SwinTransformer(remat=r, **TINY)) for r in (False, True))
  assert jax.tree.structure(plain) == jax.tree.structure(remat)


# ----------------------------------------------------------------------------- checkpoints


def official_state_dict(c, depths, heads, m, rng, level_norms=True):
  """The official detection backbone's state dict, key by key, with random values."""
  sd = {}

  def add(key, *shape):
    sd[key] = rng.normal(size=shape).astype(np.float32)

  add('patch_embed.proj.weight', c, 3, 4, 4)
  add('patch_embed.proj.bias', c)
  add('patch_embed.norm.weight', c)
  add('patch_embed.norm.bias', c)
  for i, (depth, nh) in enumerate(zip(depths, heads)):
    d = c * 2**i
    for j in range(depth):
      p = f'layers.{i}.blocks.{j}.'
      add(p + 'norm1.weight', d)
      add(p + 'norm1.bias', d)
      add(p + 'attn.relative_position_bias_table', (2 * m - 1)**2, nh)
      sd[p + 'attn.relative_position_index'] = brute_force_index(m)
      add(p + 'attn.qkv.weight', 3 * d, d)
      add(p + 'attn.qkv.bias', 3 * d)
      add(p + 'attn.proj.weight', d, d)
      add(p + 'attn.proj.bias', d)
      add(p + 'norm2.weight', d)
      add(p + 'norm2.bias', d)
      add(p + 'mlp.fc1.weight', 4 * d, d)
      add(p + 'mlp.fc1.bias', 4 * d)
      add(p + 'mlp.fc2.weight', d, 4 * d)
      add(p + 'mlp.fc2.bias', d)
    if i < 3:
      add(f'layers.{i}.downsample.norm.weight', 4 * d)
      add(f'layers.{i}.downsample.norm.bias', 4 * d)
      add(f'layers.{i}.downsample.reduction.weight', 2 * d, 4 * d)
    if level_norms:
      add(f'norm{i}.weight', d)
      add(f'norm{i}.bias', d)
  return sd


@pytest.fixture(scope='module')
def tiny_template():
  model = swin.SwinTransformer(window_size=3, **TINY)
  return _init_shapes(model, 32)['params']


def _official_tiny(seed=0, **kw):
  return official_state_dict(8, (2, 2, 2, 2), (1, 1, 2, 2), 3, np.random.default_rng(seed),
                             **kw)


def test_from_torch_to_torch_round_trip(tiny_template):
  sd = _official_tiny()
  params = swin.from_torch(sd, tiny_template)
  assert jax.tree.structure(params) == jax.tree.structure(tiny_template)
  jax.tree.map(lambda p, t: (p.shape == t.shape) or pytest.fail(f'{p.shape} != {t.shape}'),
               params, tiny_template)
  # Layouts: Linear [out, in] -> [in, out]; Conv2d OIHW -> HWIO; LayerNorm weight -> scale.
  np.testing.assert_array_equal(params['layers_1']['blocks_0']['attn']['qkv']['kernel'],
                                sd['layers.1.blocks.0.attn.qkv.weight'].T)
  np.testing.assert_array_equal(params['layers_2']['downsample']['reduction']['kernel'],
                                sd['layers.2.downsample.reduction.weight'].T)
  np.testing.assert_array_equal(params['patch_embed']['proj']['kernel'][1, 2, 0, 5],
                                sd['patch_embed.proj.weight'][5, 0, 1, 2])
  np.testing.assert_array_equal(params['norm3']['scale'], sd['norm3.weight'])
  np.testing.assert_array_equal(
      params['layers_3']['blocks_1']['attn']['relative_position_bias_table'],
      sd['layers.3.blocks.1.attn.relative_position_bias_table'])
  back = swin.to_torch(params)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The tree is what the model applies.
  out = jax.eval_shape(lambda p, x: swin.SwinTransformer(window_size=3, **TINY).apply(
      {'params': p}, x, train=False), params, jnp.zeros((1, 32, 32, 3)))
  assert out[5].shape == (1, 1, 1, 64)


def test_from_torch_reads_timm_mmdetection_and_classification_layouts(tiny_template):
  sd = _official_tiny()
  expected = swin.from_torch(sd, tiny_template)
  same = lambda params: jax.tree.map(np.testing.assert_array_equal, params, expected)
  # timm: merging at the start of the next stage, no index buffers.
  timm = {}
  for key, value in sd.items():
    if key.endswith('relative_position_index'):
      continue
    if '.downsample.' in key:
      i = int(key.split('.')[1])
      key = key.replace(f'layers.{i}.', f'layers.{i + 1}.', 1)
    timm[key] = value
  same(swin.from_torch(timm, tiny_template))
  # A whole detector: the backbone part, DDP prefix included.
  det = {f'module.backbone.{k}': v for k, v in sd.items()}
  det['module.neck.lateral_convs.0.conv.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  same(swin.from_torch(det, tiny_template))
  # An ImageNet classifier: its head and final norm are dropped, norm{i} start at identity.
  cls = _official_tiny(level_norms=False)
  cls.update({'norm.weight': np.ones(64), 'norm.bias': np.zeros(64),
              'head.weight': np.ones((10, 64)), 'head.bias': np.zeros(10)})
  params = swin.from_torch(cls, tiny_template)
  for i in range(4):
    np.testing.assert_array_equal(params[f'norm{i}']['scale'], 1.0)
    np.testing.assert_array_equal(params[f'norm{i}']['bias'], 0.0)
  np.testing.assert_array_equal(params['layers_0']['blocks_1']['mlp']['fc1']['kernel'],
                                cls['layers.0.blocks.1.mlp.fc1.weight'].T)


def test_from_torch_lists_every_unmatched_missing_and_misshaped_key(tiny_template):
  sd = _official_tiny()
  sd['layers.0.blocks.0.attn.extra.weight'] = np.zeros((3, 3), np.float32)
  del sd['layers.1.blocks.1.mlp.fc2.bias']
  sd['layers.2.blocks.0.attn.qkv.weight'] = np.zeros((3 * 32, 31), np.float32)
  with pytest.raises(ValueError) as error:
    swin.from_torch(sd, tiny_template)
  message = str(error.value)
  assert 'layers.0.blocks.0.attn.extra.weight' in message
  assert 'layers.1.blocks.1.mlp.fc2.bias' in message
  assert 'layers.2.blocks.0.attn.qkv.weight: checkpoint (96, 31)' in message
  assert '1 checkpoint keys that match no parameter' in message
  # A checkpoint for another window size is refused by its index buffer and its tables.
  other = official_state_dict(8, (2, 2, 2, 2), (1, 1, 2, 2), 4, np.random.default_rng(0))
  with pytest.raises(ValueError, match='relative_position_bias_table'):
    swin.from_torch({k: v for k, v in other.items()
                     if not k.endswith('relative_position_index')}, tiny_template)
  bad_index = dict(_official_tiny())
  bad_index['layers.0.blocks.0.attn.relative_position_index'] = brute_force_index(3).T.copy() + 1
  with pytest.raises(ValueError, match='indexes its bias table differently'):
    swin.from_torch(bad_index, tiny_template)


# ----------------------------------------------------------------------------- detectors


def test_retinanet_swin_configs():
  config_module = importlib.import_module('configs.retinanet_swin')
  for variant in 'TSBL':
    c = config_module.get_config(f'variant={variant}')
    assert c.model.backbone.variant == variant
    assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay,
            c.global_batch_size) == ('adamw', 1e-4, 0.05, 16)
  c3 = config_module.get_config('variant=S,schedule=3x')
  assert c3.num_train_steps == round(36 * 118_287 / 16)
  np.testing.assert_allclose(c3.optimizer.decay_boundaries, (27 / 36, 33 / 36))
  with pytest.raises(ValueError, match='schedule'):
    config_module.get_config('schedule=2x')
  c = config_module.get_config('variant=T')
  c.data.image_size = 256   # counts do not depend on the input size
  counts = summary.summarize(c, with_flops=False)
  assert counts['modules']['backbone'] == 27_520_698
  # AdamW decays kernels only: norms and relative position tables are excluded.
  shapes = jax.eval_shape(lambda: train.init_variables(
      train.model_module(c).Model(c), c, jax.random.key(0)))['params']
  decayed = {parallel.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
             if train.is_kernel(p)}
  assert 'backbone/layers_0/blocks_0/attn/qkv/kernel' in decayed
  assert not any('relative_position_bias_table' in p or 'norm' in p.split('/')[-2]
                 for p in decayed)
  shapes_config = config_module.get_config('shapes')
  assert shapes_config.data.name == 'shapes'
  assert shapes_config.model.backbone.variant == 'T'
  assert 'depths' not in shapes_config.model.backbone   # Swin-T's depths, narrower


def test_maskrcnn_swin_config_and_parameter_count():
  config_module = importlib.import_module('configs.maskrcnn_swin')
  c = config_module.get_config('variant=T,schedule=3x')
  assert (c.model.backbone.variant, c.model.backbone.drop_path_rate) == ('T', 0.2)
  assert c.num_train_steps == round(36 * 118_287 / 16)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
      'adamw', 1e-4, 0.05)
  assert config_module.get_config('variant=T').model.backbone.drop_path_rate == 0.1
  with pytest.raises(ValueError, match='variant'):
    config_module.get_config('variant=L')
  # Swin-Transformer-Object-Detection README: Mask R-CNN Swin-T 48M (reference 2.1).
  c.data.image_size = 256
  count = summary.summarize(c, with_flops=False)['params']
  assert abs(count - 48e6) / 48e6 < 0.02, count


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_retinanet_with_tiny_swin_loss_falls(data_dir):
  """A few AdamW steps on one shapes batch: the RetinaNet loss must fall through the
  backbone's gradients (drop-path on)."""
  c = tiny.tiny_config(data_dir)
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='swin', embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
      window_size=4, drop_path_rate=0.1))
  model = retinanet.Model(c)
  variables = model_testing.random_variables(
      jax.eval_shape(lambda: train.init_variables(model, c, jax.random.key(0))))
  # The head's prior-probability init, which random_variables does not know about.
  head = variables['params']['head']
  head['class_predict']['bias'] = jnp.full_like(head['class_predict']['bias'],
                                                -math.log(99.0))
  for name in ('class_predict', 'box_predict'):
    head[name]['kernel'] = head[name]['kernel'] * 0.01
  assert 'relative_position_bias_table' in variables['params']['backbone']['layers_0'][
      'blocks_0']['attn']
  tx = optax.adamw(2e-3, weight_decay=0.05)

  def step(params, batch_stats, opt_state, batch, key):
    def loss_fn(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats}, batch['image'], train=True,
          rngs={'drop_path': key}, mutable=['batch_stats'])
      return retinanet.loss(outputs, batch, c)[0], updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  batch = {k: jnp.asarray(v) for k, v in
           next(pipeline.train_iterator(c.data, batch_size=4, seed=0)).items()}
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  step = model_testing.compile_quickly(
      jax.jit(step).lower(params, batch_stats, opt_state, batch, jax.random.key(0)))
  losses = []
  for i in range(12):
    params, batch_stats, opt_state, loss, grads = step(params, batch_stats, opt_state, batch,
                                                       jax.random.key(i))
    losses.append(float(loss))
    if i == 0:
      table = grads['backbone']['layers_1']['blocks_0']['attn']['relative_position_bias_table']
      assert np.abs(np.asarray(table)).max() > 0   # the bias table is trained
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
