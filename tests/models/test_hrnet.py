"""Tests for jaxdet/models/backbones/hrnet.py and jaxdet/models/necks/hrfpn.py."""

import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet import convert
from jaxdet import train
from jaxdet.models.backbones import hrnet
from jaxdet.models.necks import hrfpn
import model_testing

TINY = dict(width=4, stem_width=8, stage1_width=4, num_modules=(1, 1, 1, 1), num_blocks=1)


@functools.lru_cache(maxsize=None)
def _template(width):
  model = hrnet.HRNet(width=width)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                           train=False))


def _timm_head_params(width):
  """Parameters of timm's HRNet ImageNet head (incre/downsamp/final layers + classifier),
  counted from its definition: bottlenecks of widths 32..256 with projection, 3x3/2 convs
  with bias + BN between them, a 1x1 conv 1024 -> 2048 with bias + BN, a 1000-way fc."""
  head_widths = [32, 64, 128, 256]
  n = 0
  for b, p in enumerate(head_widths):
    c = width * 2**b
    n += c * p + 9 * p * p + 4 * p * p + c * 4 * p + 2 * (p + p + 4 * p + 4 * p)
  for a, b in zip(head_widths[:-1], head_widths[1:]):
    n += 9 * 4 * a * 4 * b + 4 * b + 2 * 4 * b
  n += 1024 * 2048 + 2048 + 2 * 2048
  return n + 2048 * 1000 + 1000


# timm's published totals of the ImageNet classifiers hrnet_w18/w32/w40 (with the head).
TIMM_PARAMS = {18: 21.30e6, 32: 41.23e6, 40: 57.56e6}


@pytest.mark.parametrize('width', [18, 32, 40])
def test_param_count_matches_timm_classifier(width):
  backbone = model_testing.num_params(_template(width)['params'])
  total = backbone + _timm_head_params(width)
  assert abs(total - TIMM_PARAMS[width]) / TIMM_PARAMS[width] < 5e-4, (backbone, total)


def _reference_torch_keys(width):
  """Every conv/BN key of the PyTorch HRNet (no head), built from the reference's loops:
  stem, layer1, transition{t} (_make_transition_layer), stage{s}.{m} branches and fuse
  layers (HighResolutionModule._make_fuse_layers)."""
  keys = []
  conv_bn = lambda c, b: keys.extend([f'{c}.weight', f'{b}.weight', f'{b}.bias',
                                      f'{b}.running_mean', f'{b}.running_var'])
  conv_bn('conv1', 'bn1')
  conv_bn('conv2', 'bn2')
  for i in range(4):
    for k in (1, 2, 3):
      conv_bn(f'layer1.{i}.conv{k}', f'layer1.{i}.bn{k}')
  conv_bn('layer1.0.downsample.0', 'layer1.0.downsample.1')
  pre = [256]
  for s, modules in ((2, 1), (3, 4), (4, 3)):
    cur = [width * 2**b for b in range(s)]
    t = f'transition{s - 1}'
    for i in range(len(cur)):
      if i < len(pre):
        if pre[i] != cur[i]:
          conv_bn(f'{t}.{i}.0', f'{t}.{i}.1')
      else:
        for j in range(i + 1 - len(pre)):
          conv_bn(f'{t}.{i}.{j}.0', f'{t}.{i}.{j}.1')
    for m in range(modules):
      p = f'stage{s}.{m}'
      for b in range(s):
        for k in range(4):
          for c in (1, 2):
            conv_bn(f'{p}.branches.{b}.{k}.conv{c}', f'{p}.branches.{b}.{k}.bn{c}')
      for i in range(s):
        for j in range(s):
          if j > i:
            conv_bn(f'{p}.fuse_layers.{i}.{j}.0', f'{p}.fuse_layers.{i}.{j}.1')
          for k in range(i - j):
            conv_bn(f'{p}.fuse_layers.{i}.{j}.{k}.0', f'{p}.fuse_layers.{i}.{j}.{k}.1')
    pre = cur
  return keys


def test_torch_names_are_the_reference_layout():
  # Zero-strided stand-ins: the layout without 29M real numbers.
  fake = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), _template(32))
  sd = hrnet.to_torch(fake)
  expected = _reference_torch_keys(32)
  assert len(expected) == len(set(expected))
  assert set(sd) == set(expected)
  assert sd['stage4.2.fuse_layers.3.0.2.0.weight'].shape == (256, 32, 3, 3)
  assert sd['stage4.2.fuse_layers.3.0.1.0.weight'].shape == (32, 32, 3, 3)
  assert sd['stage3.0.fuse_layers.0.2.0.weight'].shape == (32, 128, 1, 1)
  assert sd['transition1.0.0.weight'].shape == (32, 256, 3, 3)
  assert sd['transition3.3.0.0.weight'].shape == (256, 128, 3, 3)


def test_levels_and_channels_of_w32():
  model = hrnet.HRNet(width=32)
  images = jax.ShapeDtypeStruct((2, 640, 384, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), _template(32), images)
  assert {l: o.shape for l, o in out.items()} == {
      l: (2, 640 // 2**l, 384 // 2**l, 32 * 2**(l - 2)) for l in range(2, 6)}


def _conv_nhwc(x, k, stride):
  """Brute-force 'FIXED'-padded conv: x [B, H, W, I], k [kh, kw, I, O] -> [B, H', W', O]."""
  kh = k.shape[0]
  p = (kh - 1) // 2
  x = np.pad(x, ((0, 0), (p, kh - 1 - p), (p, kh - 1 - p), (0, 0)))
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kh) // stride + 1
  out = np.zeros((x.shape[0], h, w, k.shape[-1]))
  for i in range(h):
    for j in range(w):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kh]
      out[:, i, j] = np.einsum('bhwi,hwio->bo', patch, k)
  return out


def test_fuse_layer_shapes_and_values_against_numpy():
  channels = (3, 5, 7)
  sizes = ((9, 7), (5, 4), (3, 2))  # ceil-mode halvings of a 9x7 map
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, channels)]
  module = hrnet.HRModule(channels, num_blocks=0)  # the fuse alone
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), xs, train=False))
  variables = model_testing.random_variables(shapes)
  names = sorted(variables['params'])
  assert names == ['fuse0_1', 'fuse0_2', 'fuse1_0_0', 'fuse1_2', 'fuse2_0_0', 'fuse2_0_1',
                   'fuse2_1_0']
  # Down-sampling chains keep the source width until their last conv.
  assert variables['params']['fuse2_0_0']['conv']['kernel'].shape == (3, 3, 3, 3)
  assert variables['params']['fuse2_0_1']['conv']['kernel'].shape == (3, 3, 3, 7)
  out = module.apply(variables, xs, train=False)
  assert [o.shape for o in out] == [x.shape for x in xs]

  # BN is the identity in random_variables up to 1/sqrt(1 + eps).
  bn = 1.0 / np.sqrt(1.0 + module.norm_epsilon)
  k = lambda name: np.asarray(variables['params'][name]['conv']['kernel'], np.float64)
  up = lambda x, s, like: np.repeat(np.repeat(x, s, 1), s, 2)[:, :like.shape[1], :like.shape[2]]
  relu = lambda x: np.maximum(x, 0)
  x0, x1, x2 = [x.astype(np.float64) for x in xs]
  want0 = x0 + up(_conv_nhwc(x1, k('fuse0_1'), 1) * bn, 2, x0) + up(
      _conv_nhwc(x2, k('fuse0_2'), 1) * bn, 4, x0)
  want1 = _conv_nhwc(x0, k('fuse1_0_0'), 2) * bn + x1 + up(
      _conv_nhwc(x2, k('fuse1_2'), 1) * bn, 2, x1)
  chain = relu(_conv_nhwc(x0, k('fuse2_0_0'), 2) * bn)
  want2 = (_conv_nhwc(chain, k('fuse2_0_1'), 2) * bn + _conv_nhwc(x1, k('fuse2_1_0'), 2) * bn
           + x2)
  for got, want in zip(out, (want0, want1, want2)):
    np.testing.assert_allclose(np.asarray(got), relu(want), rtol=1e-4, atol=1e-4)


def test_tiny_forward_on_a_size_not_divisible_by_32():
  model = hrnet.HRNet(**TINY)
  images = jax.random.normal(jax.random.key(0), (2, 72, 40, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  variables = model_testing.random_variables(shapes)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = model_testing.compile_quickly(forward.lower(variables, images))(variables, images)
  for l in range(2, 6):
    assert out[l].shape == (2, -(-72 // 2**l), -(-40 // 2**l), 4 * 2**(l - 2))
    assert np.all(np.isfinite(out[l])) and np.min(out[l]) >= 0.0  # fuse ends in a ReLU


def test_build_rejects_unknown_keys_and_sets_dtype():
  cfg = ml_collections.ConfigDict(dict(name='hrnet', **TINY))
  model = hrnet.build(cfg, 'bfloat16')
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  assert all(o.dtype == jnp.bfloat16 for o in out.values())
  cfg.depth = 50
  with pytest.raises(ValueError, match='depth'):
    hrnet.build(cfg, 'float32')


def test_from_torch_to_torch_round_trip_and_errors():
  model = hrnet.HRNet(**TINY)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  sd = hrnet.to_torch(variables)
  assert sd['conv1.weight'].shape == (8, 3, 3, 3)  # OIHW
  # The ImageNet classifier's keys and BN counters are ignored.
  sd_with_head = dict(sd, **{'classifier.weight': np.zeros((1000, 2048)),
                             'incre_modules.0.0.conv1.weight': np.zeros((32, 4, 1, 1)),
                             'bn1.num_batches_tracked': np.zeros((), np.int64)})
  back = hrnet.from_torch(sd_with_head, shapes)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)

  broken = dict(sd)
  del broken['stage2.0.branches.0.0.conv1.weight']
  broken['stage2.0.extra.weight'] = np.zeros(3)
  broken['transition1.0.1.running_var'] = np.zeros(7)
  with pytest.raises(convert.ConversionError) as e:
    hrnet.from_torch(broken, shapes)
  msg = str(e.value)
  assert 'missing keys (1): stage2.0.branches.0.0.conv1.weight' in msg
  assert 'unexpected keys (1): stage2.0.extra.weight' in msg
  assert 'transition1.0.1.running_var: checkpoint (7,) vs expected (4,)' in msg
  with pytest.raises(convert.ConversionError, match='classifier.weight'):
    hrnet.from_torch(sd_with_head, shapes, skip_classifier=False)


def _torch_bilinear_upsample(x, s):
  """PyTorch interpolate(scale_factor=s, mode='bilinear', align_corners=False), x [H, W]."""
  h, w = x.shape
  def taps(n_out, n_in):
    src = np.maximum((np.arange(n_out) + 0.5) / s - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  r0, r1, fr = taps(h * s, h)
  c0, c1, fc = taps(w * s, w)
  top = x[r0][:, c0] * (1 - fc) + x[r0][:, c1] * fc
  bottom = x[r1][:, c0] * (1 - fc) + x[r1][:, c1] * fc
  return top * (1 - fr[:, None]) + bottom * fr[:, None]


def test_bilinear_upsampling_and_average_pooling_match_pytorch_semantics():
  x = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
  for s in (2, 4, 8):
    got = hrfpn.upsample_bilinear(jnp.asarray(x)[None, :, :, None], s)[0, :, :, 0]
    np.testing.assert_allclose(np.asarray(got), _torch_bilinear_upsample(x, s), atol=1e-5)
  y = np.random.default_rng(3).normal(size=(1, 8, 12, 2)).astype(np.float32)
  got = hrfpn.avg_pool(jnp.asarray(y), 4)
  want = y.reshape(1, 2, 4, 3, 4, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Partial windows at the border average the pixels they cover.
  got = hrfpn.avg_pool(jnp.asarray(y[:, :6, :5]), 4)
  assert got.shape == (1, 2, 2, 2)
  np.testing.assert_allclose(np.asarray(got[0, 1, 1]), y[0, 4:6, 4:5].mean(axis=(0, 1)),
                             rtol=1e-5)


def test_hrfpn_levels_and_parameters():
  feats = {l: jnp.zeros((2, 128 // 2**l, 96 // 2**l, 32 * 2**(l - 2))) for l in range(2, 6)}
  neck = hrfpn.HRFPN(min_level=2, max_level=6)
  variables = jax.eval_shape(lambda: neck.init(jax.random.key(0), feats, train=False))
  out = jax.eval_shape(lambda v: neck.apply(v, feats, train=False), variables)
  # Ceil-mode pooling: level 6 of the 96 px wide input is 2 (not 1) pixels wide.
  assert {l: o.shape for l, o in out.items()} == {
      l: (2, -(-128 // 2**l), -(-96 // 2**l), 256) for l in range(2, 7)}
  # The reduction sees the 15C = 480 concatenated channels; one 3x3 conv per level.
  assert variables['params']['reduction']['kernel'].shape == (1, 1, 480, 256)
  assert model_testing.num_params(variables['params']) == 480 * 256 + 256 + 5 * (
      9 * 256 * 256 + 256)
  with pytest.raises(ValueError, match='levels 2'):
    neck.apply(variables, {l: feats[l] for l in (3, 4, 5)}, train=False)


def _square_batch(size, n=4):
  """One image with a bright square, its box and class, in the data contract's layout."""
  image = np.zeros((2, size, size, 3), np.float32) - 1.0
  boxes = np.zeros((2, n, 4), np.float32)
  classes = np.full((2, n), -1, np.int32)
  for b, (x1, y1, s) in enumerate([(10, 14, 24), (30, 8, 20)]):
    image[b, y1:y1 + s, x1:x1 + s] = 1.0
    boxes[b, 0] = (x1, y1, x1 + s, y1 + s)
    classes[b, 0] = b
  return {'image': image, 'boxes': boxes, 'classes': classes,
          'is_crowd': np.zeros((2, n), bool), 'image_id': np.arange(2, dtype=np.int32),
          'orig_size': np.full((2, 2), size, np.int32), 'scale': np.ones((2, 2), np.float32),
          'offset': np.zeros((2, 2), np.float32)}


def test_retinanet_with_tiny_hrnet_trains():
  import configs.retinanet_hrnet as cfg_module  # pylint: disable=g-import-not-at-top
  c = cfg_module.get_config('runlocal')
  assert c.model.backbone.name == 'hrnet' and c.model.neck.name == 'hrfpn'
  c.model.num_classes = 2
  c.data.image_size = 64
  c.data.max_instances = 4
  c.model.head.num_filters = 16
  c.model.head.num_convs = 1
  c.optimizer.learning_rate = 0.02
  c.optimizer.warmup_steps = 2
  c.num_train_steps = 12
  module = importlib.import_module('jaxdet.models.retinanet')
  model = module.Model(c)
  tx, schedule = train.make_optimizer(c)
  batch = _square_batch(64, 4)
  # Variables without compiling Flax's init (minutes on a CPU for a network this branchy).
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch['image'], train=False))
  variables = model_testing.random_variables(shapes)
  assert set(variables['params']) == {'backbone', 'neck', 'head'}
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}
  step_fn = jax.jit(train.make_train_step(model, module, c, tx, schedule, jax.random.key(1)))
  step = model_testing.compile_quickly(step_fn.lower(state, batch))
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_faster_rcnn_config_takes_hrnet_and_hrfpn():
  import configs.fasterrcnn_hrnet as cfg_module  # pylint: disable=g-import-not-at-top
  from jaxdet import summary  # pylint: disable=g-import-not-at-top
  config = cfg_module.get_config('runlocal')
  model, variables = summary.abstract_variables(config)
  params = variables['params']
  assert set(params) >= {'backbone', 'neck', 'rpn', 'box_head'}
  # P2-P6 from one reduction of the 15W concatenated channels (W = 4 here).
  assert params['neck']['reduction']['kernel'].shape == (1, 1, 60, 16)
  assert sorted(params['neck']) == ['fpn2', 'fpn3', 'fpn4', 'fpn5', 'fpn6', 'reduction']
  with pytest.raises(ValueError, match='W18'):
    cfg_module.get_config('variant=W48')
