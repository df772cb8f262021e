"""Tests for jaxdet/models/detr.py, configs/detr_r50.py and the ResNet options DETR uses."""

import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detr_r50
from jaxdet import parallel
from jaxdet import train
from jaxdet.models import detr
from jaxdet.models.backbones import resnet
import model_testing


def tiny_config(matcher='scipy'):
  c = detr_r50.get_config(f'runlocal,matcher={matcher}')
  c.data.image_size = 64
  return c


def init_params(shapes, seed=0):
  """Real variables without compiling Flax's init: kernels ~ N(0, 1/fan_in), query
  embeddings ~ N(0, 1) (distinct queries), norms at identity, biases 0."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      # Attention q/k/v kernels are [d, heads, head_dim]: their fan-in is d.
      qkv = len(s.shape) == 3 and path[-2].key in ('query', 'key', 'value')
      fan_in = s.shape[0] if qkv else np.prod(s.shape[:-1])
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)
    if name == 'query_embed':
      return jnp.asarray(rng.normal(size=s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def synthetic_batch(rng, batch_size, size, max_instances, counts):
  """Filled rectangles on noise; the class is the rectangle's colour."""
  colours = np.array([[2, -2, -2], [-2, 2, -2], [-2, -2, 2], [2, 2, -2], [2, -2, 2],
                      [-2, 2, 2]], np.float32)
  image = 0.3 * rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
  boxes = np.zeros((batch_size, max_instances, 4), np.float32)
  classes = np.full((batch_size, max_instances), -1, np.int32)
  for b, k in enumerate(counts):
    for n in range(k):
      w, h = rng.integers(size // 6, size // 2, 2)
      x, y = rng.integers(0, size - w), rng.integers(0, size - h)
      cls = rng.integers(0, 6)
      image[b, y:y + h, x:x + w] = colours[cls]
      boxes[b, n] = (x, y, x + w, y + h)
      classes[b, n] = cls
  return {'image': image, 'image_id': np.arange(batch_size, dtype=np.int32),
          'orig_size': np.full((batch_size, 2), size, np.int32),
          'scale': np.ones((batch_size, 2), np.float32),
          'offset': np.zeros((batch_size, 2), np.float32),
          'boxes': boxes, 'classes': classes,
          'is_crowd': np.zeros((batch_size, max_instances), bool)}


# ----------------------------------------------------------------------------- full size


def test_detr_r50_parameter_count():
  """41.3M in the paper's DETR-R50 at 91 classes (+ no object): the reference counts the
  trained parameters, without the frozen stem, first stage and BatchNorm."""
  c = detr_r50.get_config()
  c.model.num_classes = 91
  c.data.image_size = 256
  model = detr.Model(c)
  variables = jax.eval_shape(lambda: train.init_variables(model, c, jax.random.key(0)))
  leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  rules = train._multiplier_rules(c.optimizer)  # pylint: disable=protected-access
  trained = sum(int(np.prod(x.shape)) for p, x in leaves
                if train.lr_multiplier(p, rules) > 0
                and not re.search('/bn/', parallel.path_str(p)))
  assert total == 41_577_888
  assert trained == 41_302_368
  assert abs(total / 41.3e6 - 1) < 0.01
  head = variables['params']['head']
  assert head['class_embed']['kernel'].shape == (256, 92)
  assert head['query_embed'].shape == (100, 256)
  assert len([k for k in head if k.startswith('encoder_layer')]) == 6
  assert len([k for k in head if k.startswith('decoder_layer')]) == 6


def test_detr_r50_dc5_output_shapes():
  c = detr_r50.get_config('dc5')
  c.data.image_size = 256
  model = detr.Model(c)
  variables = jax.eval_shape(lambda: train.init_variables(model, c, jax.random.key(0)))
  images = jax.ShapeDtypeStruct((2, 256, 192, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert out['pred_logits'].shape == (2, 100, 81)
  assert out['pred_boxes'].shape == (2, 100, 4)
  assert out['aux_logits'].shape == (5, 2, 100, 81)
  assert out['aux_boxes'].shape == (5, 2, 100, 4)
  # DC5: the transformer reads level 5 at stride 16 (its input projection sees 16 x 12).
  proj = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=['intermediates'])[1], variables, images)
  feats = proj['intermediates']['backbone']['__call__'][0][5]
  assert feats.shape == (2, 16, 12, 2048)


def test_config_recipe():
  c = detr_r50.get_config('epochs=500')
  assert c.optimizer.name == 'adamw' and c.optimizer.learning_rate == 1e-4
  assert c.optimizer.weight_decay == 1e-4 and c.optimizer.grad_clip_norm == 0.1
  lr = train.learning_rate_schedule(c)
  steps = c.num_train_steps
  assert steps == round(500 * 118_287 / 64)
  np.testing.assert_allclose(float(lr(int(0.79 * steps))), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(int(0.81 * steps))), 1e-5, rtol=1e-6)
  assert detr_r50.get_config().optimizer.decay_boundaries == (200 / 300,)
  # The reference's augmentation: short side 480..800 by 32, long side <= 1333, and the
  # random-size crop half of the time.
  d = c.data
  assert d.resize == 'short_side' and d.max_size == 1333 and d.eval_short_side == 800
  assert tuple(d.short_sides) == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
  assert d.random_size_crop.probability == 0.5
  assert tuple(d.random_size_crop.resize_sides) == (400, 500, 600)
  assert (d.random_size_crop.min_size, d.random_size_crop.max_size) == (384, 600)
  with pytest.raises(ValueError, match='300 or 500'):
    detr_r50.get_config('epochs=400')
  mult = lambda name: train.lr_multiplier(
      [jax.tree_util.DictKey(k) for k in name.split('/')],
      train._multiplier_rules(c.optimizer))  # pylint: disable=protected-access
  assert mult('backbone/stage3_block0/conv1/conv/kernel') == pytest.approx(0.1)
  assert mult('backbone/stem/conv/kernel') == 0.0
  assert mult('head/class_embed/kernel') == 1.0
  # The paper's model; the shapes recipe's convergence aids are options it leaves off.
  t = c.model.transformer
  assert (t.query_type, t.pre_norm, c.model.loss.class_loss) == ('learned', False, 'softmax')
  s = detr_r50.get_config('shapes')
  assert (s.model.transformer.query_type, s.model.transformer.pre_norm) == ('two_stage', True)
  assert s.model.loss.class_loss == 'focal' and s.model.loss.ce_weight == 2.0


# ----------------------------------------------------------------------------- resnet options


def test_resnet_frozen_bn_and_dilation():
  plain = resnet.ResNet(depth=18, width=4)
  frozen = resnet.ResNet(depth=18, width=4, frozen_bn=True, last_stage_dilation=2)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))
  assert jax.tree.structure(shapes) == jax.tree.structure(
      jax.eval_shape(lambda: frozen.init(jax.random.key(0), x, train=False)))
  variables = model_testing.random_variables(shapes)
  rng = np.random.default_rng(0)
  variables['batch_stats'] = jax.tree.map(
      lambda v: v * 1.5 + 0.1 * rng.normal(size=v.shape).astype(np.float32),
      variables['batch_stats'])

  def forward(params):
    out, updates = frozen.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
    return out[5].sum(), (out, updates)

  grad_fn = jax.jit(jax.value_and_grad(forward, has_aux=True))
  (_, (out, updates)), grads = model_testing.compile_quickly(
      grad_fn.lower(variables['params']))(variables['params'])
  # DC5: level 5 keeps level 4's resolution.
  assert out[5].shape == (2, 4, 4, 32) and out[4].shape == (2, 4, 4, 16)
  # Frozen: the statistics are used and kept, the affine parameters get no gradient.
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])
  eval_out = frozen.apply(variables, x, train=False)
  np.testing.assert_allclose(out[5], eval_out[5], rtol=1e-5, atol=1e-5)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  bn = [np.abs(g).max() for p, g in flat if '/bn/' in parallel.path_str(p) + '/']
  conv = [np.abs(g).max() for p, g in flat if parallel.path_str(p).endswith('kernel')]
  assert bn and max(bn) == 0.0
  assert min(conv) > 0.0
  # The dilated stage's later blocks dilate their 3x3 kernels by 2.
  def dilated_forward():
    return frozen.apply(variables, x, train=False)[5]
  hlo = jax.jit(dilated_forward).lower().as_text()
  assert 'rhs_dilate = [2, 2]' in hlo or 'rhs_dilation = array<i64: 2, 2>' in hlo


# ----------------------------------------------------------------------------- geometry


def test_valid_size_and_feature_mask():
  batch = {'orig_size': np.array([[100, 50], [300, 400]], np.int32),
           'scale': np.array([[0.64, 0.64], [0.32, 0.32]], np.float32),
           'offset': np.array([[0, 0], [10, 20]], np.float32)}
  size = np.asarray(detr.valid_size(batch, (2, 128, 128, 3)))
  np.testing.assert_array_equal(size, [[64, 32], [86, 108]])
  mask = np.asarray(detr.feature_mask(jnp.asarray(size), (4, 4), (128, 128)))
  # A stride-32 cell is content when its first pixel is: rows 0..1 / cols 0 for 64 x 32.
  want0 = np.zeros((4, 4), bool)
  want0[:2, :1] = True
  want1 = np.zeros((4, 4), bool)
  want1[:3, :4] = True
  np.testing.assert_array_equal(mask, [want0, want1])
  np.testing.assert_array_equal(np.asarray(detr.valid_size(None, (2, 64, 96, 3))),
                                [[64, 96], [64, 96]])
  # The pipeline's valid_size wins: after a crop window the formula reaches past it.
  batch['valid_size'] = np.array([[40, 30], [200, 50]], np.float32)
  np.testing.assert_array_equal(np.asarray(detr.valid_size(batch, (2, 128, 128, 3))),
                                [[40, 30], [128, 50]])


def _sine_reference(mask, f, temperature=10000.0):
  """Per-cell loops: y = rank of the cell among its column's content cells, / column total."""
  b, h, w = mask.shape
  out = np.zeros((b, h, w, 2 * f))
  for i, r, col in itertools.product(range(b), range(h), range(w)):
    y = mask[i, :r + 1, col].sum() / (mask[i, :, col].sum() + 1e-6) * 2 * math.pi
    x = mask[i, r, :col + 1].sum() / (mask[i, r, :].sum() + 1e-6) * 2 * math.pi
    for axis, t in enumerate((y, x)):
      for k in range(f):
        angle = t / temperature ** (2 * (k // 2) / f)
        out[i, r, col, axis * f + k] = math.sin(angle) if k % 2 == 0 else math.cos(angle)
  return out


def test_sine_position_encoding_reference_and_padding():
  mask = np.zeros((2, 5, 6), bool)
  mask[0, :3, :4] = True
  mask[1] = True
  got = np.asarray(detr.sine_position_encoding(jnp.asarray(mask), 8))
  want = _sine_reference(mask, 8)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-5)
  # The content of a padded image is encoded as the unpadded image.
  small = np.asarray(detr.sine_position_encoding(jnp.ones((1, 3, 4), bool), 8))
  np.testing.assert_allclose(got[0, :3, :4], small[0], atol=1e-6)


@pytest.mark.parametrize('pre_norm', [False, True])
def test_padding_does_not_change_predictions(pre_norm):
  """An image padded with garbage features gives the unpadded image's predictions."""
  head = detr.DetrHead(num_classes=6, hidden_dim=32, num_queries=10, num_heads=4, ffn_dim=64,
                       num_encoder_layers=2, num_decoder_layers=2, pre_norm=pre_norm)
  rng = np.random.default_rng(0)
  small = rng.normal(size=(1, 3, 4, 16)).astype(np.float32)
  big = rng.normal(size=(1, 5, 7, 16)).astype(np.float32) * 10.0   # garbage in the padding
  big[:, :3, :4] = small
  mask_big = np.zeros((1, 5, 7), bool)
  mask_big[:, :3, :4] = True
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), small, np.ones((1, 3, 4), bool),
                                            train=False))
  params = init_params(shapes)
  apply = jax.jit(lambda f, m: head.apply(params, f, m, train=False))
  logits_s, boxes_s = apply(small, np.ones((1, 3, 4), bool))
  logits_b, boxes_b = apply(big, mask_big)
  np.testing.assert_allclose(logits_b, logits_s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(boxes_b, boxes_s, rtol=1e-4, atol=1e-5)
  # Without the mask the padding leaks in: the test can fail.
  logits_leak, _ = apply(big, np.ones((1, 5, 7), bool))
  assert np.abs(np.asarray(logits_leak) - np.asarray(logits_s)).max() > 1e-2


def test_pre_norm_layers():
  """pre_norm=True: x + SelfAttn(LN(x) + pos) then x + FFN(LN(x)), against the layer's own
  sub-modules applied by hand; the head gains the reference's final encoder norm."""
  layer = detr.EncoderLayer(dim=16, num_heads=2, ffn_dim=32, dropout=0.0, pre_norm=True)
  rng = np.random.default_rng(0)
  x, pos = (jnp.asarray(rng.normal(size=(1, 5, 16)), jnp.float32) for _ in range(2))
  key_mask = jnp.ones((1, 5), bool)
  variables = layer.init(jax.random.key(0), x, pos, key_mask, train=False)
  p = variables['params']
  ln = lambda name, v: nn.LayerNorm().apply({'params': p[name]}, v)
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=16)
  y = ln('norm1', x)
  h = x + attn.apply({'params': p['self_attn']}, y + pos, y + pos, y)
  f = p['ffn']
  z = ln('norm2', h)
  z = nn.relu(z @ f['linear1']['kernel'] + f['linear1']['bias'])
  want = h + z @ f['linear2']['kernel'] + f['linear2']['bias']
  np.testing.assert_allclose(layer.apply(variables, x, pos, key_mask, train=False), want,
                             rtol=1e-5, atol=1e-5)
  post = detr.EncoderLayer(dim=16, num_heads=2, ffn_dim=32, dropout=0.0)
  assert np.abs(post.apply(variables, x, pos, key_mask, train=False) - want).max() > 1e-2
  head = detr.DetrHead(num_classes=6, hidden_dim=16, num_queries=4, num_heads=2, ffn_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1, pre_norm=True)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), np.zeros((1, 2, 2, 8)),
                                            np.ones((1, 2, 2), bool), train=False))
  assert 'encoder_norm' in shapes['params']


def test_anchor_queries_predict_offsets_from_their_points():
  """query_type='anchor': uniform points at init, centres sigmoid(offset + logit(point)),
  positional queries from the points' sine encoding; an unknown type is an error."""
  head = detr.DetrHead(num_classes=6, hidden_dim=32, num_queries=50, num_heads=4, ffn_dim=64,
                       num_encoder_layers=1, num_decoder_layers=2, query_type='anchor')
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  mask = np.ones((2, 4, 4), bool)
  variables = head.init(jax.random.key(0), features, mask, train=False)
  params = variables['params']
  points = jax.nn.sigmoid(params['reference_points'])                 # [Q, 2] (y, x)
  assert points.shape == (50, 2) and 'query_embed' not in params
  assert 0.02 <= float(points.min()) and float(points.max()) <= 0.98
  assert float(points.std()) > 0.2                                   # spread, not clustered
  # With a zero last box layer every decoder layer's centre is its query's point.
  zeroed = jax.tree_util.tree_map(jnp.zeros_like, params['bbox_embed2'])
  params = dict(params, bbox_embed2=zeroed)
  _, boxes = head.apply({'params': params}, features, mask, train=False)
  np.testing.assert_allclose(boxes[..., 0], np.broadcast_to(points[:, 1], boxes.shape[:3]),
                             atol=1e-6)
  np.testing.assert_allclose(boxes[..., 1], np.broadcast_to(points[:, 0], boxes.shape[:3]),
                             atol=1e-6)
  np.testing.assert_allclose(boxes[..., 2:], 0.5)
  # The positional query is a function of the point: two queries moved onto one point
  # get the same predictions.
  ref = params['reference_points'].at[1].set(params['reference_points'][0])
  logits, boxes = head.apply({'params': dict(params, reference_points=ref)}, features, mask,
                             train=False)
  np.testing.assert_allclose(logits[:, :, 0], logits[:, :, 1], atol=1e-5)
  np.testing.assert_allclose(boxes[:, :, 0], boxes[:, :, 1], atol=1e-6)
  bad = detr.DetrHead(num_classes=6, hidden_dim=32, num_queries=4, num_heads=4, ffn_dim=64,
                      num_encoder_layers=1, num_decoder_layers=1, query_type='dab')
  with pytest.raises(ValueError, match='query_type'):
    bad.init(jax.random.key(0), features, mask, train=False)


def test_two_stage_selects_content_tokens_and_trains_the_encoder():
  """query_type='two_stage': every encoder token proposes a box around its own cell, the
  decoder starts from the best Q tokens on content (never padding), and the encoder's
  proposals take their own set loss."""
  head = detr.DetrHead(num_classes=6, hidden_dim=32, num_queries=6, num_heads=4, ffn_dim=64,
                       num_encoder_layers=1, num_decoder_layers=2, query_type='two_stage')
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  mask = np.ones((2, 4, 4), bool)
  mask[1, :, 2:] = False                                  # image 1: left half is content
  variables = head.init(jax.random.key(0), features, mask, train=False)
  params = variables['params']
  zeroed = jax.tree_util.tree_map(jnp.zeros_like, params['enc_bbox_embed2'])
  params = dict(params, enc_bbox_embed2=zeroed)
  logits, boxes, (enc_logits, enc_boxes, enc_valid) = head.apply(
      {'params': params}, features, mask, train=False)
  assert logits.shape == (2, 2, 6, 7) and boxes.shape == (2, 2, 6, 4)
  assert enc_logits.shape == (2, 16, 7) and enc_boxes.shape == (2, 16, 4)
  np.testing.assert_array_equal(enc_valid, mask.reshape(2, 16))
  # With a zero last layer a token's box is its prior: its cell's centre, two cells wide,
  # measured on the content (image 1's content is 2 cells wide).
  np.testing.assert_allclose(enc_boxes[0, 5], [0.375, 0.375, 0.5, 0.5], atol=1e-5)
  np.testing.assert_allclose(enc_boxes[1, 1], [0.75, 0.125, 0.99, 0.5], atol=1e-5)
  # Selected reference boxes come from content tokens only: image 1's decoder boxes
  # before refinement (zero last decoder layer) are prior boxes of its left half.
  params = dict(params, bbox_embed2=jax.tree_util.tree_map(jnp.zeros_like,
                                                            params['bbox_embed2']))
  _, boxes, _ = head.apply({'params': params}, features, mask, train=False)
  content = np.asarray(enc_boxes[1])[mask[1].reshape(-1)]
  for q in range(6):
    assert np.abs(content - np.asarray(boxes[-1, 1, q])).sum(-1).min() < 1e-5
  with pytest.raises(ValueError, match='num_queries=20'):
    detr.DetrHead(num_classes=6, hidden_dim=32, num_queries=20, num_heads=4, ffn_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, query_type='two_stage').init(
                      jax.random.key(0), features, mask, train=False)


def test_two_stage_loss_includes_the_encoder_and_skips_padded_tokens():
  config = tiny_config()
  config.model.transformer.query_type = 'two_stage'
  rng = np.random.default_rng(1)
  batch = synthetic_batch(rng, 2, 64, config.data.max_instances, counts=[2, 1])
  b, q, l, k = 2, config.model.transformer.num_queries, 16, 7
  outputs = {'pred_logits': jnp.asarray(rng.normal(size=(b, q, k)), jnp.float32),
             'pred_boxes': jnp.full((b, q, 4), 0.5),
             'aux_logits': jnp.zeros((0, b, q, k)), 'aux_boxes': jnp.zeros((0, b, q, 4)),
             'enc_logits': jnp.asarray(rng.normal(size=(b, l, k)), jnp.float32),
             'enc_boxes': jnp.full((b, l, 4), 0.5)}
  valid = np.ones((b, l), bool)
  valid[:, 8:] = False
  # Padded tokens hold perfect predictions; they must be neither matched nor classified.
  gt = detr.normalized_targets(batch, batch['image'].shape, config.data)
  perfect = np.asarray(outputs['enc_boxes']).copy()
  perfect[0, 8:10] = np.asarray(gt[1][0, :2])
  outputs['enc_boxes'] = jnp.asarray(perfect)
  total, metrics = detr.loss(dict(outputs, enc_valid=jnp.asarray(valid)), batch, config)
  decoder_only, _ = detr.loss({k: v for k, v in outputs.items() if not k.startswith('enc')},
                              batch, config)
  assert float(total) > float(decoder_only) and float(metrics['enc_loss_bbox']) > 0.1
  shifted = np.asarray(outputs['enc_logits']).copy()
  shifted[:, 8:] += 5.0 * rng.normal(size=shifted[:, 8:].shape)
  total2, _ = detr.loss(dict(outputs, enc_logits=jnp.asarray(shifted),
                             enc_valid=jnp.asarray(valid)), batch, config)
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)


def test_two_stage_encoder_repeats_match_each_target_k_times():
  config = tiny_config()
  config.model.transformer.query_type = 'two_stage'
  config.model.loss.encoder_repeats = 2
  rng = np.random.default_rng(2)
  batch = synthetic_batch(rng, 1, 64, 4, counts=[3])
  q, l, k = config.model.transformer.num_queries, 16, 7
  gt = np.asarray(detr.normalized_targets(batch, batch['image'].shape, config.data)[1][0])
  enc_boxes = np.tile(np.array([0.9, 0.9, 0.05, 0.05], np.float32), (1, l, 1))
  enc_boxes[0, :3] = gt[:3]                               # one perfect token per target
  outputs = {'pred_logits': jnp.zeros((1, q, k)), 'pred_boxes': jnp.full((1, q, 4), 0.5),
             'aux_logits': jnp.zeros((0, 1, q, k)), 'aux_boxes': jnp.zeros((0, 1, q, 4)),
             'enc_logits': jnp.zeros((1, l, k)), 'enc_valid': jnp.ones((1, l), bool)}
  _, once = detr.loss(dict(outputs, enc_boxes=jnp.asarray(enc_boxes)), batch, config)
  enc_boxes[0, 3:6] = gt[:3]                              # a second perfect token each
  _, twice = detr.loss(dict(outputs, enc_boxes=jnp.asarray(enc_boxes)), batch, config)
  assert float(once['enc_loss_bbox']) > 0.3
  np.testing.assert_allclose(float(twice['enc_loss_bbox']), 0.0, atol=1e-6)
  config.model.loss.encoder_repeats = 5                   # 5 x 4 slots > 16 tokens
  with pytest.raises(ValueError, match='encoder_repeats=5'):
    detr.loss(dict(outputs, enc_boxes=jnp.asarray(enc_boxes)), batch, config)


# ----------------------------------------------------------------------------- loss


def _giou_np(a, b):
  """a, b: (cx, cy, w, h)."""
  a = np.array([a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2])
  b = np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (enc - union) / enc


def _loss_reference(logits, boxes, gt_boxes, gt_classes, eos=0.1):
  """DETR's loss of one layer by brute-force matching, float64 numpy.

  logits [B, Q, C+1], boxes [B, Q, 4] cxcywh; gt_* lists per image (normalised cxcywh).
  """
  b, q, k = logits.shape
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  targets = np.full((b, q), k - 1)
  l1 = giou = 0.0
  num = max(sum(len(g) for g in gt_classes), 1)
  for i in range(b):
    n = len(gt_classes[i])
    def cost(qi, t):
      return (-prob[i, qi, gt_classes[i][t]] + 5 * np.abs(boxes[i, qi] - gt_boxes[i][t]).sum()
              - 2 * _giou_np(boxes[i, qi], gt_boxes[i][t]))
    best = min(itertools.permutations(range(q), n),
               key=lambda rows: sum(cost(r, t) for t, r in enumerate(rows)))
    for t, r in enumerate(best):
      targets[i, r] = gt_classes[i][t]
      l1 += np.abs(boxes[i, r] - gt_boxes[i][t]).sum()
      giou += 1 - _giou_np(boxes[i, r], gt_boxes[i][t])
  w = np.where(targets == k - 1, eos, 1.0)
  logp = np.log(np.take_along_axis(prob, targets[..., None], -1)[..., 0])
  ce = (-logp * w).sum() / w.sum()
  return ce, l1 / num, giou / num


@pytest.mark.parametrize('matcher', ['scipy', 'jax'])
def test_loss_against_brute_force_reference(matcher):
  c = tiny_config(matcher)
  rng = np.random.default_rng(3)
  layers, b, q, n, k = 2, 2, 5, 4, 7
  logits = rng.normal(size=(layers, b, q, k)).astype(np.float32) * 2
  centres = rng.uniform(0.2, 0.8, (layers, b, q, 2))
  sizes = rng.uniform(0.1, 0.4, (layers, b, q, 2))
  boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  # Image 0: three targets; image 1: one target and a crowd region (never matched).
  size_hw = np.array([[64, 48], [32, 64]], np.float32)    # content (h, w) per image
  gt_xyxy = [[(4, 6, 20, 30), (30, 10, 44, 40), (10, 40, 30, 60)], [(5, 5, 40, 25)]]
  gt_cls = [[1, 4, 0], [5]]
  batch = {'image': np.zeros((b, 64, 64, 3), np.float32),
           'orig_size': size_hw.astype(np.int32), 'scale': np.ones((b, 2), np.float32),
           'offset': np.zeros((b, 2), np.float32),
           'boxes': np.zeros((b, n, 4), np.float32), 'classes': np.full((b, n), -1, np.int32),
           'is_crowd': np.zeros((b, n), bool)}
  gt_norm = []
  for i in range(b):
    h, w = size_hw[i]
    for t, box in enumerate(gt_xyxy[i]):
      batch['boxes'][i, t] = box
      batch['classes'][i, t] = gt_cls[i][t]
    x1, y1, x2, y2 = np.array(gt_xyxy[i], np.float64).T
    gt_norm.append(list(np.stack([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w,
                                  (y2 - y1) / h], -1)))
  batch['boxes'][1, 1] = (0, 0, 10, 10)
  batch['classes'][1, 1] = 2
  batch['is_crowd'][1, 1] = True
  outputs = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1],
             'aux_logits': logits[:-1], 'aux_boxes': boxes[:-1]}
  total, metrics = jax.jit(lambda o, bt: detr.loss(o, bt, c))(outputs, batch)
  want_total = 0.0
  for layer in range(layers):
    ce, l1, giou = _loss_reference(logits[layer].astype(np.float64),
                                   boxes[layer].astype(np.float64), gt_norm, gt_cls)
    want_total += ce + 5 * l1 + 2 * giou
  np.testing.assert_allclose(float(metrics['loss_ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_bbox']), l1, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_giou']), giou, rtol=1e-5)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  # Without auxiliary losses only the last layer counts.
  c.model.loss.aux_loss = False
  last, _ = detr.loss(outputs, batch, c)
  np.testing.assert_allclose(float(last), ce + 5 * l1 + 2 * giou, rtol=1e-5)


def test_focal_class_loss_and_sigmoid_scores():
  """loss.class_loss='focal': sigmoid focal loss over the C real classes of every query
  (matched queries one-hot at their target, the rest all zeros), summed and divided by the
  target count; post-processing then scores with sigmoids."""
  c = tiny_config()
  c.model.loss.class_loss = 'focal'
  rng = np.random.default_rng(7)
  b, q, n, k = 2, 4, 3, 7
  logits = rng.normal(scale=2.0, size=(b, q, k)).astype(np.float32)
  boxes = np.full((b, q, 4), 0.5, np.float32)
  pred_idx = np.array([[2, 0, 1], [3, 1, 0]])
  gt_classes = np.array([[4, 1, -1], [0, -1, -1]])
  gt_valid = gt_classes >= 0
  num_boxes = 3.0
  _, metrics = detr.set_loss(logits, boxes, pred_idx, gt_classes, boxes[:, :n], gt_valid,
                             num_boxes, c.model.loss)
  target = np.zeros((b, q, k - 1))
  target[0, 2, 4] = target[0, 0, 1] = target[1, 3, 0] = 1.0
  p = 1 / (1 + np.exp(-logits[..., :-1].astype(np.float64)))
  pt = np.where(target == 1, p, 1 - p)
  alpha = np.where(target == 1, 0.25, 0.75)
  want = (alpha * (1 - pt) ** 2 * -np.log(pt)).sum() / num_boxes
  np.testing.assert_allclose(float(metrics['loss_ce']), want, rtol=1e-5)
  batch = {'image': np.zeros((b, 64, 64, 3), np.float32),
           'orig_size': np.full((b, 2), 64, np.int32), 'scale': np.ones((b, 2), np.float32),
           'offset': np.zeros((b, 2), np.float32)}
  out = detr.postprocess({'pred_logits': logits, 'pred_boxes': boxes}, batch, c)
  np.testing.assert_allclose(np.sort(out['scores'], -1)[:, ::-1], np.sort(p.max(-1), -1)[:, ::-1],
                             rtol=1e-6)
  c.model.loss.class_loss = 'hinge'
  with pytest.raises(ValueError, match='class_loss'):
    detr.set_loss(logits, boxes, pred_idx, gt_classes, boxes[:, :n], gt_valid, num_boxes,
                  c.model.loss)


def test_loss_without_targets_is_classification_only():
  c = tiny_config()
  logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
  batch = {'image': np.zeros((2, 64, 64, 3), np.float32),
           'orig_size': np.full((2, 2), 64, np.int32), 'scale': np.ones((2, 2), np.float32),
           'offset': np.zeros((2, 2), np.float32), 'boxes': np.zeros((2, 3, 4), np.float32),
           'classes': np.full((2, 3), -1, np.int32), 'is_crowd': np.zeros((2, 3), bool)}
  outputs = {'pred_logits': logits, 'pred_boxes': np.full((2, 3, 4), 0.5, np.float32),
             'aux_logits': np.zeros((0, 2, 3, 7), np.float32),
             'aux_boxes': np.zeros((0, 2, 3, 4), np.float32)}
  total, metrics = jax.jit(lambda o, bt: detr.loss(o, bt, c))(outputs, batch)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(total), -logp[..., -1].mean(), rtol=1e-5)
  assert float(metrics['loss_bbox']) == 0.0 and float(metrics['loss_giou']) == 0.0


def test_postprocess_top_k_and_original_pixels():
  c = tiny_config()
  c.model.postprocess.max_detections = 2
  logits = np.full((1, 3, 4), -10.0, np.float32)
  logits[0, 0, 3] = 10.0          # query 0: no object
  logits[0, 1, 2] = 3.0           # query 1: class 2
  logits[0, 2, 0] = 5.0           # query 2: class 0, the most confident
  boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.5],
                     [0.5, 0.25, 1.0, 0.5]]], np.float32)
  # Original 100 x 200 (h, w) scaled by 0.5 and cropped at (oy, ox) = (10, 20): content 40 x 80.
  batch = {'image': np.zeros((1, 64, 96, 3), np.float32),
           'orig_size': np.array([[100, 200]], np.int32),
           'scale': np.array([[0.5, 0.5]], np.float32),
           'offset': np.array([[10, 20]], np.float32)}
  c.data.image_size = 96
  det = detr.postprocess({'pred_logits': logits, 'pred_boxes': boxes}, batch, c)
  assert det['boxes'].shape == (1, 2, 4) and int(det['num'][0]) == 2
  np.testing.assert_array_equal(det['classes'][0], [0, 2])
  p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
  np.testing.assert_allclose(det['scores'][0], [p[2, 0], p[1, 2]], rtol=1e-5)
  # Query 2 covers the content (0..80) x (0..20) -> original ((x + 20) / 0.5, (y + 10) / 0.5).
  np.testing.assert_allclose(det['boxes'][0, 0], [40, 20, 200, 60], rtol=1e-5)
  np.testing.assert_allclose(det['boxes'][0, 1], [40, 40, 120, 80], rtol=1e-5)


# ----------------------------------------------------------------------------- training


def test_train_step_on_four_devices_loss_falls_and_compiles_once():
  """The jitted step with the scipy callback on 4 simulated devices: overfitting one batch
  lowers the loss, and batches with other numbers of objects reuse the executable."""
  assert jax.device_count() >= 4
  c = tiny_config('scipy')
  c.optimizer.warmup_steps = 0
  module, model, tx, schedule, _ = train.build(c)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:4])
  shapes = jax.eval_shape(lambda: train.init_variables(model, c, jax.random.key(0)))
  params = init_params(shapes['params'])
  state = {'params': params, 'batch_stats': init_params(shapes['batch_stats']),
           'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  state = jax.device_put(state, shardings)
  step = train.jit_train_step(
      train.make_train_step(model, module, c, tx, schedule, jax.random.key(1)), shardings, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      synthetic_batch(rng, 4, 64, c.data.max_instances, counts=[2, 1, 3, 0]), mesh)
  # One executable for the run: compiled once from the shapes, it must accept every batch
  # (a batch whose shapes or shardings differed would be rejected, not recompiled).
  compiled = model_testing.compile_quickly(step.lower(state, batch))
  losses = []
  for _ in range(12):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  for counts in ([0, 10, 5, 1], [0, 0, 0, 0]):
    other = synthetic_batch(rng, 4, 64, c.data.max_instances, counts=counts)
    state, metrics = compiled(state, parallel.global_batch(other, mesh))
    assert np.isfinite(float(metrics['loss']))
