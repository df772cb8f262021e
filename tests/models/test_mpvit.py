"""Tests for jaxdet/models/backbones/mpvit.py.

The checkpoint tests build the official PyTorch key set independently of the module (from
the official module tree: names, torch layouts, shared-module aliases) and run a numpy
forward pass that reads that state dict directly, in NCHW / OIHW as PyTorch does.
"""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from jaxdet import parallel
from jaxdet import summary
from jaxdet import train
from jaxdet.data import pipeline
from jaxdet.models.backbones import mpvit
import model_testing
import tiny

# Tiny architecture for real forward passes: every structural feature of the full model
# (2 and 3 paths, stride-2 embeddings, 1-2 blocks, 8 heads split 2/3/3 for CRPE).
TINY = dict(variant='T', num_path=(2, 3, 3, 2), num_layers=(1, 2, 1, 1),
            embed_dims=(8, 16, 16, 24), mlp_ratios=(2, 2, 2, 2), num_heads=(8, 8, 8, 8))


def _init_shapes(model, size=64):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


@functools.lru_cache(maxsize=None)
def _classifier_shapes(variant):
  """Variables of the ImageNet classifier (shared by several tests: tracing takes seconds)."""
  return _init_shapes(mpvit.MPViT(variant=variant, num_classes=1000), size=32)


def _backbone_shapes(variant):
  """The detection backbone's variables: the classifier's without `cls_head`."""
  variables = _classifier_shapes(variant)
  params = {k: v for k, v in variables['params'].items() if k != 'cls_head'}
  return {'params': params, 'batch_stats': variables['batch_stats']}


# ----------------------------------------------------------------------------- attention


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_factorized_attention_matches_naive_form():
  rng = np.random.default_rng(0)
  b, n, h, ch = 2, 13, 3, 4
  q, k, v = (rng.normal(size=(b, n, h, ch)).astype(np.float32) for _ in range(3))
  got = np.asarray(mpvit.factorized_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  # Naive: per sample and head, softmax of K over the tokens (one per channel), the
  # explicit Ch x Ch matrix softmax(K)^T V, then every query times it, scaled.
  want = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      ks = _softmax(k[bi, :, hi].astype(np.float64), axis=0)          # [N, Ch]
      context = ks.T @ v[bi, :, hi]                                   # [Ch, Ch]
      for t in range(n):
        want[bi, t, hi] = ch ** -0.5 * (q[bi, t, hi] @ context)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Each softmax(K) column sums to one over tokens, so uniform values come back scaled:
  # with V = 1, output = Ch**-0.5 * sum_c q_c for every token.
  ones = np.asarray(mpvit.factorized_attention(jnp.asarray(q), jnp.asarray(k),
                                               jnp.ones_like(jnp.asarray(v))))
  np.testing.assert_allclose(ones, np.repeat(q.sum(-1, keepdims=True), ch, -1) * ch**-0.5,
                             rtol=1e-5, atol=1e-6)


def _np_depthwise(x, w, b):
  """x: [H, W, C], w: [k, k, C] -> zero-padded 'same' depthwise correlation + bias."""
  k = w.shape[0]
  p = k // 2
  xp = np.pad(x, ((p, p), (p, p), (0, 0)))
  out = np.zeros_like(x)
  for i in range(k):
    for j in range(k):
      out += xp[i:i + x.shape[0], j:j + x.shape[1]] * w[i, j]
  return out + b


def test_conv_relative_position_encoding():
  rng = np.random.default_rng(1)
  b, height, width, h, ch = 2, 6, 5, 8, 2
  n = height * width
  q = rng.normal(size=(b, n, h, ch)).astype(np.float32)
  v = rng.normal(size=(b, n, h, ch)).astype(np.float32)
  crpe = mpvit.ConvRelPosEnc()
  variables = crpe.init(jax.random.key(0), q, v, (height, width))
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                        variables['params'])
  # Windows 3 / 5 / 7 over 2 / 3 / 3 heads, one depthwise filter per value channel.
  assert {k: p['kernel'].shape for k, p in params.items()} == {
      'conv_list_0': (3, 3, 1, 2 * ch), 'conv_list_1': (5, 5, 1, 3 * ch),
      'conv_list_2': (7, 7, 1, 3 * ch)}
  apply = jax.jit(lambda q, v: crpe.apply({'params': params}, q, v, (height, width)))
  got = np.asarray(apply(q, v))
  assert got.shape == (b, n, h, ch)
  # Brute force: head-major value channels, each head group convolved with its window.
  want = np.zeros_like(q)
  bounds = [(0, 2), (2, 5), (5, 8)]
  for bi in range(b):
    img = v[bi].reshape(height, width, h * ch)
    for g, (h0, h1) in enumerate(bounds):
      p = params[f'conv_list_{g}']
      conv = _np_depthwise(img[..., h0 * ch:h1 * ch], np.asarray(p['kernel'])[:, :, 0],
                           np.asarray(p['bias']))
      want[bi, :, h0:h1] = q[bi, :, h0:h1] * conv.reshape(n, h1 - h0, ch)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Locality: a change of one value token reaches tokens within the window radius of the
  # head's group only (3x3 for heads 0-1, 7x7 for heads 5-7).
  v2 = v.copy()
  v2[:, 0] += 1.0  # token (0, 0)
  diff = np.abs(np.asarray(apply(q, v2)) - got)
  diff = diff.reshape(b, height, width, h, ch).max(axis=(0, 4))  # [H, W, h]
  assert np.all(diff[2:, :, :2] == 0) and np.all(diff[:, 2:, :2] == 0)
  assert np.all(diff[:2, :2, :2] > 0)
  assert np.all(diff[4:, :, 5:] == 0) and np.all(diff[:4, :4, 5:] > 0)


def test_crpe_rejects_a_window_that_does_not_cover_the_heads():
  q = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match='splits 8 heads, the attention has 4'):
    mpvit.ConvRelPosEnc().init(jax.random.key(0), q, q, (2, 2))


# ----------------------------------------------------------------------------- model


# The official constructors' docstrings (ImageNet classifiers, 1000 classes), and the
# paper's Table 1 in millions.
OFFICIAL_COUNTS = {'T': (5_843_736, 5.8), 'XS': (10_573_448, 10.5), 'S': (22_892_400, 22.8),
                   'B': (74_845_976, 74.8)}


@pytest.mark.parametrize('variant', sorted(OFFICIAL_COUNTS))
def test_param_count_matches_the_official_classifier(variant):
  count, paper_millions = OFFICIAL_COUNTS[variant]
  got = model_testing.num_params(_classifier_shapes(variant)['params'])
  assert got == count
  assert abs(got / 1e6 - paper_millions) / paper_millions < 0.02
  # The independent key list of the official module counts the same.
  keys = official_state_dict_shapes(variant, num_classes=1000)
  assert sum(int(np.prod(s)) for k, s in keys.items() if _is_parameter(k)) == count


# MPViT README (80 COCO classes). Its T rows (RetinaNet 17M, Mask R-CNN 28M) are about 2M
# above what the official MPViT-T's 5.8M backbone plus the detectron2 heads add up to, so
# only S is checked.
@pytest.mark.parametrize('name, expected', [('retinanet_mpvit', 32e6), ('maskrcnn_mpvit', 43e6)])
def test_detector_param_count_matches_the_readme(name, expected):
  config = importlib.import_module(f'configs.{name}').get_config('variant=S')
  config.data.image_size = 256  # Counts do not depend on the input size.
  count = summary.summarize(config, with_flops=False)['params']
  assert abs(count - expected) / expected < 0.02, count


def test_detection_levels_and_channels():
  model = mpvit.MPViT(variant='S')
  variables = _backbone_shapes('S')
  images = jax.ShapeDtypeStruct((2, 200, 328, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  # Strides 4..32 with ceil rounding; channels 128/216/288/288 (detectron2 MPViT-S).
  assert {l: o.shape for l, o in out.items()} == {
      2: (2, 50, 82, 128), 3: (2, 25, 41, 216), 4: (2, 13, 21, 288), 5: (2, 7, 11, 288)}


def test_build_from_config_and_errors():
  cfg = ml_collections.ConfigDict(dict(name='mpvit', **TINY))
  model = mpvit.build(cfg, 'bfloat16')
  variables = _init_shapes(model)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), train=False),
                       variables)
  assert {l: o.shape[-1] for l, o in out.items()} == {2: 16, 3: 16, 4: 24, 5: 24}
  assert all(o.dtype == jnp.bfloat16 for o in out.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  with pytest.raises(ValueError, match='variant must be one of'):
    _init_shapes(mpvit.MPViT(variant='M'))
  cfg.depth = 3
  with pytest.raises(ValueError, match='depth'):
    mpvit.build(cfg, 'float32')


def test_drop_path_rates_are_linear_over_all_blocks():
  rates = mpvit.drop_path_rates(0.3, (1, 3, 6, 3))
  assert [len(r) for r in rates] == [1, 3, 6, 3]
  np.testing.assert_allclose(sum(rates, []), np.linspace(0, 0.3, 13))
  assert mpvit.drop_path_rates(0.2, (1,)) == [[0.0]]


# ----------------------------------------------------------------------------- checkpoints


def _spec(variant, overrides=None):
  spec = dict(mpvit.MPVIT_VARIANTS[variant])
  spec.update({k: v for k, v in (overrides or {}).items() if k in spec})
  return spec


def official_state_dict_shapes(variant, num_classes=0, overrides=None):
  """The official module's state_dict keys -> torch shapes, written from its module tree."""
  s = _spec(variant, overrides)
  dims, out = s['embed_dims'], {}

  def bn(prefix, c):
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      out[prefix + leaf] = (c,)
    out[prefix + 'num_batches_tracked'] = ()

  def conv_bn(prefix, cin, cout, k):  # Conv2d_BN
    out[prefix + 'conv.weight'] = (cout, cin, k, k)
    bn(prefix + 'bn.', cout)

  conv_bn('stem.0.', 3, dims[0] // 2, 3)
  conv_bn('stem.1.', dims[0] // 2, dims[0], 3)
  for st in range(4):
    d, paths = dims[st], s['num_path'][st]
    for p in range(paths):
      pre = f'patch_embed_stages.{st}.patch_embeds.{p}.patch_conv.'
      out[pre + 'dwconv.weight'] = (d, 1, 3, 3)
      out[pre + 'pwconv.weight'] = (d, d, 1, 1)
      bn(pre + 'bn.', d)
    ch = d // s['num_heads'][st]
    shared = {'cpe.proj.weight': (d, 1, 3, 3), 'cpe.proj.bias': (d,)}
    for i, (k, heads) in enumerate(mpvit.CRPE_WINDOW):
      shared[f'crpe.conv_list.{i}.weight'] = (heads * ch, 1, k, k)
      shared[f'crpe.conv_list.{i}.bias'] = (heads * ch,)
    stage = f'mhca_stages.{st}.'
    for p in range(paths):
      enc = f'{stage}mhca_blks.{p}.'
      out.update({enc + k: v for k, v in shared.items()})
      for layer in range(s['num_layers'][st]):
        blk = f'{enc}MHCA_layers.{layer}.'
        # A shared module is listed under each name that registers it.
        out.update({blk + k: v for k, v in shared.items()})
        out.update({blk + 'factoratt_crpe.' + k: v for k, v in shared.items()
                    if k.startswith('crpe')})
        hidden = d * s['mlp_ratios'][st]
        for name, shape in (('factoratt_crpe.qkv', (3 * d, d)), ('factoratt_crpe.proj', (d, d)),
                            ('mlp.fc1', (hidden, d)), ('mlp.fc2', (d, hidden))):
          out[f'{blk}{name}.weight'] = shape
          out[f'{blk}{name}.bias'] = shape[:1]
        for name in ('norm1', 'norm2'):
          out[f'{blk}{name}.weight'] = out[f'{blk}{name}.bias'] = (d,)
    conv_bn(stage + 'InvRes.conv1.', d, d, 1)
    out[stage + 'InvRes.dwconv.weight'] = (d, 1, 3, 3)
    bn(stage + 'InvRes.norm.', d)
    conv_bn(stage + 'InvRes.conv2.', d, d, 1)
    conv_bn(stage + 'aggregate.', d * (paths + 1), dims[min(st + 1, 3)], 1)
  if num_classes:
    out['cls_head.cls.weight'] = (num_classes, dims[3])
    out['cls_head.cls.bias'] = (num_classes,)
  return out


def _is_alias(key):
  return 'MHCA_layers' in key and ('.cpe.' in key or '.crpe.' in key)


def _is_parameter(key):
  return not _is_alias(key) and not key.endswith(('running_mean', 'running_var',
                                                  'num_batches_tracked'))


def random_state_dict(shapes, seed=0):
  """Random official weights; aliases copy their encoder's module as in PyTorch."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in shapes.items():
    if _is_alias(key):
      continue
    if key.endswith('num_batches_tracked'):
      sd[key] = np.zeros((), np.int64)
    elif key.endswith('running_var'):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif key.endswith('weight') and len(shape) > 1:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
    elif key.endswith('weight'):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.normal(size=shape)).astype(np.float32)
  for key in shapes:
    if _is_alias(key):
      encoder, _, rest = key.partition('MHCA_layers.')
      rest = rest.split('.', 1)[1].removeprefix('factoratt_crpe.')
      sd[key] = sd[encoder + rest]
  return sd


def test_round_trip_official_keys_for_full_size_variants():
  for variant in ('T', 'B'):
    template = _classifier_shapes(variant)
    shapes = official_state_dict_shapes(variant, num_classes=1000)
    # Exactly the official key set, in torch layout, from the jaxdet tree alone.
    exported = mpvit.to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))
    assert {k: tuple(v.shape) for k, v in exported.items()} == shapes
  template = _classifier_shapes('T')
  sd = random_state_dict(official_state_dict_shapes('T', num_classes=1000))
  variables = mpvit.from_torch(sd, template)
  assert jax.tree.structure(variables) == jax.tree.structure(template)
  blk = variables['params']['mhca_stages_2']['mhca_blks_1']['MHCA_layers_3']
  np.testing.assert_array_equal(
      blk['factoratt_crpe']['qkv']['kernel'],
      sd['mhca_stages.2.mhca_blks.1.MHCA_layers.3.factoratt_crpe.qkv.weight'].T)
  np.testing.assert_array_equal(
      variables['batch_stats']['stem_1']['bn']['var'], sd['stem.1.bn.running_var'])
  back = mpvit.to_torch(variables)
  assert set(back) == set(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_from_torch_errors_list_every_bad_key():
  template = _init_shapes(mpvit.MPViT(**TINY))
  sd = random_state_dict(official_state_dict_shapes('T', overrides=TINY))
  sd['stem.0.conv.extra'] = np.zeros(3, np.float32)
  sd['mhca_stages.0.aggregate.conv.weight'] = np.zeros((16, 24, 1, 2), np.float32)
  del sd['stem.1.bn.running_var']
  alias = 'mhca_stages.1.mhca_blks.2.MHCA_layers.1.factoratt_crpe.crpe.conv_list.2.bias'
  sd[alias] = sd[alias] + 1.0
  with pytest.raises(ValueError) as error:
    mpvit.from_torch(sd, template)
  message = str(error.value)
  assert '1 unmatched checkpoint keys' in message and 'stem.0.conv.extra (3,)' in message
  assert 'mhca_stages.0.aggregate.conv.weight: checkpoint (1, 2, 24, 16)' in message
  assert 'model (1, 1, 24, 16)' in message
  assert 'batch_stats/stem_1/bn/var (8,) (torch stem.1.bn.running_var)' in message
  assert f'{alias} differs from mhca_stages.1.mhca_blks.2.crpe.conv_list.2.bias' in message


def test_from_torch_prefix_classifier_and_params_only():
  template = _init_shapes(mpvit.MPViT(**TINY))
  sd = random_state_dict(official_state_dict_shapes('T', num_classes=10, overrides=TINY))
  # An ImageNet checkpoint initializes the detection backbone without its classifier...
  variables = mpvit.from_torch(sd, template)
  assert 'cls_head' not in variables['params']
  # ...unless asked to keep every key.
  with pytest.raises(ValueError, match='cls_head.cls.weight'):
    mpvit.from_torch(sd, template, drop_classifier=False)
  # detectron2 checkpoints nest the backbone; other keys are not the backbone's.
  nested = {'backbone.bottom_up.backbone.' + k: v for k, v in sd.items()}
  nested['backbone.fpn_lateral3.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  again = mpvit.from_torch(nested, template, prefix='backbone.bottom_up.backbone.')
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  # A params-only template cannot hold the BatchNorm statistics: the error says so.
  with pytest.raises(ValueError, match="pass the variables"):
    mpvit.from_torch(sd, template['params'])
  no_stats = {k: v for k, v in sd.items() if 'running' not in k}
  params = mpvit.from_torch(no_stats, template['params'])
  jax.tree.map(np.testing.assert_array_equal, params, variables['params'])


# ----------------------------------------------------------------------------- numpy forward


def _conv(x, w, b=None, stride=1):
  """PyTorch Conv2d: x [B, C, H, W], w [O, C/g, k, k], padding k//2, groups from shapes."""
  bsz, c, height, width = x.shape
  o, cg, k, _ = w.shape
  g = c // cg
  p = k // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  ho, wo = (height + 2 * p - k) // stride + 1, (width + 2 * p - k) // stride + 1
  out = np.zeros((bsz, g, o // g, ho, wo))
  wg = w.reshape(g, o // g, cg, k, k)
  for i in range(k):
    for j in range(k):
      patch = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
      out += np.einsum('bgchw,goc->bgohw', patch.reshape(bsz, g, cg, ho, wo), wg[..., i, j])
  out = out.reshape(bsz, o, ho, wo)
  return out if b is None else out + b[None, :, None, None]


def _bn(x, sd, pre):
  scale = sd[pre + 'weight'] / np.sqrt(sd[pre + 'running_var'] + 1e-5)
  return (x - sd[pre + 'running_mean'][None, :, None, None]) * scale[None, :, None, None] + \
      sd[pre + 'bias'][None, :, None, None]


def _hswish(x):
  return x * np.clip(x + 3, 0, 6) / 6


def _ln(x, sd, pre):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * sd[pre + 'weight'] + sd[pre + 'bias']


def _linear(x, sd, pre):
  return x @ sd[pre + 'weight'].T + sd[pre + 'bias']


def _conv_bn(x, sd, pre, stride=1, act=True):
  y = _bn(_conv(x, sd[pre + 'conv.weight'], stride=stride), sd, pre + 'bn.')
  return _hswish(y) if act else y


def numpy_mpvit(images, sd, spec):
  """The official forward_features in eval mode, NCHW, from the torch state dict."""
  x = np.transpose(images, (0, 3, 1, 2)).astype(np.float64)
  x = _conv_bn(_conv_bn(x, sd, 'stem.0.', 2), sd, 'stem.1.', 2)
  levels = {}
  for st in range(4):
    inputs = []
    for p in range(spec['num_path'][st]):
      pre = f'patch_embed_stages.{st}.patch_embeds.{p}.patch_conv.'
      x = _conv(x, sd[pre + 'dwconv.weight'], stride=2 if st > 0 and p == 0 else 1)
      x = _hswish(_bn(_conv(x, sd[pre + 'pwconv.weight']), sd, pre + 'bn.'))
      inputs.append(x)
    stage = f'mhca_stages.{st}.'
    y = _conv_bn(inputs[0], sd, stage + 'InvRes.conv1.')
    y = _hswish(_bn(_conv(y, sd[stage + 'InvRes.dwconv.weight']), sd, stage + 'InvRes.norm.'))
    outputs = [inputs[0] + _conv_bn(y, sd, stage + 'InvRes.conv2.', act=False)]
    heads = spec['num_heads'][st]
    for p, feat in enumerate(inputs):
      enc = f'{stage}mhca_blks.{p}.'
      bsz, c, height, width = feat.shape
      ch, n = c // heads, height * width
      t = feat.reshape(bsz, c, n).transpose(0, 2, 1)  # [B, N, C]
      for layer in range(spec['num_layers'][st]):
        blk = f'{enc}MHCA_layers.{layer}.'
        img = t.transpose(0, 2, 1).reshape(bsz, c, height, width)
        img = _conv(img, sd[blk + 'cpe.proj.weight'], sd[blk + 'cpe.proj.bias']) + img
        t = img.reshape(bsz, c, n).transpose(0, 2, 1)
        cur = _ln(t, sd, blk + 'norm1.')
        qkv = _linear(cur, sd, blk + 'factoratt_crpe.qkv.')
        qkv = qkv.reshape(bsz, n, 3, heads, ch).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv  # [B, h, N, Ch]
        ks = _softmax(k, axis=2)
        fa = q @ (ks.transpose(0, 1, 3, 2) @ v)
        v_img = v.transpose(0, 1, 3, 2).reshape(bsz, heads * ch, height, width)
        convs, start = [], 0
        for i, (kk, split) in enumerate(mpvit.CRPE_WINDOW):
          cp = f'{blk}factoratt_crpe.crpe.conv_list.{i}.'
          convs.append(_conv(v_img[:, start:start + split * ch], sd[cp + 'weight'],
                             sd[cp + 'bias']))
          start += split * ch
        conv_v = np.concatenate(convs, 1).reshape(bsz, heads, ch, n).transpose(0, 1, 3, 2)
        att = ch ** -0.5 * fa + q * conv_v
        att = _linear(att.transpose(0, 2, 1, 3).reshape(bsz, n, c), sd,
                      blk + 'factoratt_crpe.proj.')
        t = t + att
        hid = _linear(_ln(t, sd, blk + 'norm2.'), sd, blk + 'mlp.fc1.')
        hid = 0.5 * hid * (1 + special.erf(hid / np.sqrt(2)))
        t = t + _linear(hid, sd, blk + 'mlp.fc2.')
      outputs.append(t.reshape(bsz, height, width, c).transpose(0, 3, 1, 2))
    x = _conv_bn(np.concatenate(outputs, 1), sd, stage + 'aggregate.')
    levels[st + 2] = x.transpose(0, 2, 3, 1)
  return levels


def test_converted_weights_reproduce_the_official_forward():
  model = mpvit.MPViT(**TINY)
  sd = random_state_dict(official_state_dict_shapes('T', overrides=TINY), seed=3)
  variables = mpvit.from_torch(sd, _init_shapes(model))
  images = np.random.default_rng(4).normal(size=(2, 40, 24, 3)).astype(np.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  got = model_testing.compile_quickly(forward.lower(variables, images))(variables, images)
  want = numpy_mpvit(images, sd, _spec('T', TINY))
  assert {l: g.shape for l, g in got.items()} == {
      2: (2, 10, 6, 16), 3: (2, 5, 3, 16), 4: (2, 3, 2, 24), 5: (2, 2, 1, 24)}
  for level in want:
    scale = np.abs(want[level]).max()
    np.testing.assert_allclose(np.asarray(got[level]), want[level], rtol=1e-4,
                               atol=1e-4 * scale, err_msg=f'level {level}')


# ----------------------------------------------------------------------------- training


def test_retinanet_with_tiny_mpvit_trains(tmp_path_factory):
  c = tiny.tiny_config(str(tmp_path_factory.mktemp('tfds')))
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='mpvit', **dict(TINY, num_path=(1, 1, 1, 1), num_layers=(1, 1, 1, 1)),
      stochastic_depth_rate=0.1))
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 0
  module, model, tx, schedule, mesh = train.build(c)
  target = train.abstract_state(model, c, tx, mesh)
  assert 'mhca_stages_3' in target['params']['backbone']
  # Random variables instead of compiling Flax's init (slow on CPU); the class bias at the
  # focal-loss prior as RetinaNet initializes it.
  variables = model_testing.random_variables(
      {'params': target['params'], 'batch_stats': target['batch_stats']})
  prior = c.model.head.prior_prob
  head = variables['params']['head']['class_predict']
  head['bias'] = jnp.full_like(head['bias'], -math.log((1 - prior) / prior))
  state = jax.device_put(
      dict(variables, opt_state=tx.init(variables['params']), step=jnp.zeros((), jnp.int32)),
      jax.tree_util.tree_map(lambda s: s.sharding, target))
  step = train.jit_train_step(
      train.make_train_step(model, module, c, tx, schedule, jax.random.key(1)),
      jax.tree_util.tree_map(lambda s: s.sharding, target), mesh)
  batch = parallel.global_batch(next(pipeline.train_iterator(c.data, batch_size=4, seed=0)),
                                mesh)
  step = model_testing.compile_quickly(step.lower(state, batch))
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
