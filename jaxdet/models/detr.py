"""DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020).

images -> ResNet (C5, or DC5) -> 1x1 projection to d -> + 2-D sine positions (padding
masked) -> transformer encoder / decoder over Q learned object queries -> per decoder layer a
class head over C + 1 logits (the last is "no object") and a 3-layer MLP predicting normalised
(cx, cy, w, h) boxes. Training matches predictions to targets one-to-one with the Hungarian
algorithm (`loss`), at inference every query is a detection (`postprocess`, no NMS).

Defaults are the paper's and its reference code's (`../shared/reference/detr_swin_mpvit.md`
section 1): d = 256, 8 heads, 6 + 6 post-norm layers, FFN 2048, dropout 0.1, 100 queries;
matching cost 1 * (-p(class)) + 5 * L1 + 2 * (-GIoU); loss CE (no-object weight 0.1)
+ 5 * L1 + 2 * GIoU on every decoder layer, each with its own matching.

`model.transformer.query_type` chooses the decoder's object queries: 'learned' (the
paper's: Q learned positional embeddings, boxes predicted from scratch), 'anchor' (each query
a learned point, its positions the point's sine encoding and its box centre an offset from
the point, as Anchor DETR / DAB-DETR) or 'two_stage' (every encoder token predicts a box
around its own cell and takes a set loss of its own; the Q best tokens become the decoder's
reference boxes, as Deformable DETR's two-stage variant and DINO's query selection). With
`transformer.pre_norm` and `loss.class_loss='focal'` these are the convergence aids of
DETR's successors; the paper's recipe keeps none of them, and the shapes recipe
(configs/detr_r50.py) uses the combination that was measured to help.

Normalised box coordinates are relative to the image content of each input (the valid,
unpadded region, `valid_size`), as the reference normalises targets by the augmented image
size before padding. The valid region comes from the per-image metadata of the batch
(`orig_size * scale - offset`, clipped to the canvas), never from ground truth, so the same
code runs at training and inference.
"""

import math
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import hungarian

# Transformer weights: Xavier-uniform, as the reference `Transformer._reset_parameters`.
_xavier = nn.initializers.xavier_uniform()



def _uniform_logit(key, shape, dtype=jnp.float32):
  """Logits of points drawn uniformly in [0.02, 0.98] (anchor-point queries)."""
  return _logit(jax.random.uniform(key, shape, jnp.float32, 0.02, 0.98)).astype(dtype)


def _logit(p):
  """The inverse of the sigmoid, for p in (0, 1)."""
  return jnp.log(p / (1 - p))


QUERY_TYPES = ('learned', 'anchor', 'two_stage')


def _class_loss(model_cfg):
  return model_cfg.loss.get('class_loss', 'softmax')


def class_scores(logits, sigmoid=False):
  """[..., C + 1] logits -> [..., C] real-class probabilities: softmax over all C + 1
  (DETR), or sigmoid of the first C (with the focal loss; the last logit is unused)."""
  if sigmoid:
    return jax.nn.sigmoid(logits[..., :-1])
  return jax.nn.softmax(logits, axis=-1)[..., :-1]

MATCHERS = {
    'scipy': hungarian.linear_sum_assignment_scipy,
    'jax': hungarian.linear_sum_assignment_jax,
}


# ----------------------------------------------------------------------------- geometry


def valid_size(batch, image_shape, data_cfg=None):
  """Height and width of each image's content on the padded canvas, in input pixels.

  The pipeline maps original pixels to input pixels as `orig * scale - offset` and pads
  bottom / right, so the content ends at round(orig_size * scale - offset), clipped to the
  canvas and to the crop window `data.image_size`. The pipeline's `valid_size` gives it
  directly, and is what is used when present: after DETR's random-size crop the formula
  would reach past the crop window.

  Args:
    batch: dict with 'valid_size' [B, 2] (h, w), or 'orig_size' [B, 2] int (h, w),
      'scale' [B, 2] (sy, sx), 'offset' [B, 2] (oy, ox); None means every image fills the canvas.
    image_shape: (B, H, W, ...) of the padded images (static).
    data_cfg: optional data config; its image_size bounds the content.

  Returns:
    [B, 2] float32 (h, w), at least 1 pixel.
  """
  b, h, w = image_shape[:3]
  canvas = jnp.asarray([h, w], jnp.float32)
  if batch is None or 'orig_size' not in batch:
    return jnp.broadcast_to(canvas, (b, 2))
  if data_cfg is not None and 'image_size' in data_cfg:
    canvas = jnp.minimum(canvas, float(data_cfg.image_size))
  if 'valid_size' in batch:
    return jnp.clip(jnp.round(jnp.asarray(batch['valid_size'], jnp.float32)), 1.0, canvas)
  size = (jnp.asarray(batch['orig_size'], jnp.float32) * jnp.asarray(batch['scale'], jnp.float32)
          - jnp.asarray(batch['offset'], jnp.float32))
  return jnp.clip(jnp.round(size), 1.0, canvas)


def feature_mask(size, feature_shape, image_shape):
  """Which feature-map cells lie on image content.

  A cell (i, j) of a stride-s map is valid when its top-left input pixel (i*s, j*s) is,
  which is the reference's nearest-neighbour resize of the pixel mask to the feature size.

  Args:
    size: [B, 2] float (h, w) valid input pixels (`valid_size`).
    feature_shape: (h_f, w_f), static.
    image_shape: (H, W) of the padded input, static.

  Returns:
    [B, h_f, w_f] bool, True on content.
  """
  hf, wf = feature_shape
  sy, sx = image_shape[0] / hf, image_shape[1] / wf
  rows = jnp.arange(hf, dtype=jnp.float32) * sy          # [h_f] first input row of a cell
  cols = jnp.arange(wf, dtype=jnp.float32) * sx
  return (rows[None, :, None] < size[:, 0, None, None]) & (
      cols[None, None, :] < size[:, 1, None, None])


def sine_position_encoding(mask, num_features, temperature=10000.0, scale=2 * math.pi):
  """2-D sine positional encoding that counts positions over the valid cells only.

  As the reference `PositionEmbeddingSine(normalize=True)`: y (x) is the running count of
  valid cells down the column (along the row), divided by the column's (row's) total and
  multiplied by `scale`, so an image's encoding does not depend on how much padding it got.
  Each of y and x gives `num_features` channels, sin / cos interleaved at frequencies
  temperature ** (2 * (k // 2) / num_features); y comes first.

  Args:
    mask: [B, h, w] bool, True on content.
    num_features: channels per axis (d / 2).
    temperature: frequency base.
    scale: the normalised coordinate runs over (0, scale].

  Returns:
    [B, h, w, 2 * num_features] float32; entries of padded cells are meaningless.
  """
  valid = mask.astype(jnp.float32)
  y = jnp.cumsum(valid, axis=1)                                   # [B, h, w]
  x = jnp.cumsum(valid, axis=2)
  eps = 1e-6
  y = y / (y[:, -1:, :] + eps) * scale
  x = x / (x[:, :, -1:] + eps) * scale
  return jnp.concatenate([sine_embed(y, num_features, temperature),
                          sine_embed(x, num_features, temperature)], axis=-1)


def sine_embed(t, num_features, temperature=10000.0):
  """[...] coordinates -> [..., num_features]: sin at even, cos at odd channels k, of
  t / temperature ** (2 * (k // 2) / num_features)."""
  k = jnp.arange(num_features, dtype=jnp.float32)
  t = t[..., None] / temperature ** (2.0 * (k // 2) / num_features)
  return jnp.where(k % 2 == 0, jnp.sin(t), jnp.cos(t))


# ----------------------------------------------------------------------------- transformer


class FeedForward(nn.Module):
  """Linear -> ReLU -> dropout -> Linear (the transformer's FFN)."""
  dim: int
  hidden_dim: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [B, L, d] -> [B, L, d]."""
    x = nn.Dense(self.hidden_dim, kernel_init=_xavier, dtype=self.dtype, name='linear1')(x)
    x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=not train)
    return nn.Dense(self.dim, kernel_init=_xavier, dtype=self.dtype, name='linear2')(x)


def _attention(num_heads, dim, dropout, dtype, name):
  # Dropout on the attention weights, element-wise as PyTorch's nn.MultiheadAttention.
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, qkv_features=dim, out_features=dim, dropout_rate=dropout,
      broadcast_dropout=False, kernel_init=_xavier, dtype=dtype, name=name)


class EncoderLayer(nn.Module):
  """Encoder layer. Post-norm (the paper): x = LN(x + SelfAttn(x + pos)); x = LN(x + FFN(x)).
  Pre-norm (the reference's `pre_norm`): x = x + SelfAttn(LN(x) + pos); x = x + FFN(LN(x))."""
  dim: int
  num_heads: int
  ffn_dim: int
  dropout: float
  pre_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, key_mask, *, train: bool):
    """x, pos: [B, L, d]; key_mask: [B, L] bool (True = content). Returns [B, L, d]."""
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    attn = _attention(self.num_heads, self.dim, self.dropout, self.dtype, 'self_attn')
    ffn = FeedForward(self.dim, self.ffn_dim, self.dropout, self.dtype, name='ffn')
    norm1 = nn.LayerNorm(dtype=self.dtype, name='norm1')
    norm2 = nn.LayerNorm(dtype=self.dtype, name='norm2')
    attn_mask = key_mask[:, None, None, :]                         # [B, 1, 1, L]
    if self.pre_norm:
      y = norm1(x)
      x = x + drop(attn(y + pos, y + pos, y, mask=attn_mask, deterministic=not train))
      return x + drop(ffn(norm2(x), train=train))
    q = x + pos
    x = norm1(x + drop(attn(q, q, x, mask=attn_mask, deterministic=not train)))
    return norm2(x + drop(ffn(x, train=train)))


class DecoderLayer(nn.Module):
  """Decoder layer: self-attention over queries, cross-attention to the memory, FFN, each
  post-norm (the paper) or pre-norm; positions (query embeddings, sine encoding) are added
  to queries and keys only."""
  dim: int
  num_heads: int
  ffn_dim: int
  dropout: float
  pre_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, pos, key_mask, *, train: bool):
    """tgt, query_pos: [B, Q, d]; memory, pos: [B, L, d]; key_mask: [B, L] bool.

    Returns [B, Q, d].
    """
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    self_attn = _attention(self.num_heads, self.dim, self.dropout, self.dtype, 'self_attn')
    cross_attn = _attention(self.num_heads, self.dim, self.dropout, self.dtype, 'cross_attn')
    ffn = FeedForward(self.dim, self.ffn_dim, self.dropout, self.dtype, name='ffn')
    norms = [nn.LayerNorm(dtype=self.dtype, name=f'norm{i}') for i in (1, 2, 3)]
    mask = key_mask[:, None, None, :]
    if self.pre_norm:
      y = norms[0](tgt)
      tgt = tgt + drop(self_attn(y + query_pos, y + query_pos, y, deterministic=not train))
      y = norms[1](tgt)
      tgt = tgt + drop(cross_attn(y + query_pos, memory + pos, memory, mask=mask,
                                  deterministic=not train))
      return tgt + drop(ffn(norms[2](tgt), train=train))
    q = tgt + query_pos
    tgt = norms[0](tgt + drop(self_attn(q, q, tgt, deterministic=not train)))
    tgt = norms[1](tgt + drop(cross_attn(tgt + query_pos, memory + pos, memory, mask=mask,
                                         deterministic=not train)))
    return norms[2](tgt + drop(ffn(tgt, train=train)))


class DetrHead(nn.Module):
  """Everything after the backbone: projection, positions, transformer, prediction heads.

  Attributes:
    num_classes: C real classes; the class head has C + 1 outputs.
    hidden_dim: d.
    num_queries: Q.
    num_heads, ffn_dim, dropout: transformer layer settings.
    num_encoder_layers, num_decoder_layers: depths.
    dtype: activation dtype.
  """
  num_classes: int
  hidden_dim: int = 256
  num_queries: int = 100
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  query_type: str = 'learned'
  pre_norm: bool = False
  sigmoid_scores: bool = False      # class scores: softmax over C + 1, or sigmoid (focal loss)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, mask, *, train: bool):
    """Predictions of every decoder layer.

    Args:
      features: [B, h, w, C_in] backbone features.
      mask: [B, h, w] bool, True on image content.
      train: dropout when True.

    Returns:
      logits: [L_dec, B, Q, C + 1] float32.
      boxes: [L_dec, B, Q, 4] float32 (cx, cy, w, h) in [0, 1], relative to the content.
    """
    d = self.hidden_dim
    b, h, w, _ = features.shape
    x = nn.Conv(d, (1, 1), dtype=self.dtype, name='input_proj')(features.astype(self.dtype))
    pos = sine_position_encoding(mask, d // 2).astype(self.dtype)
    memory = x.reshape(b, h * w, d)                                   # [B, h*w, d]
    pos = pos.reshape(b, h * w, d)
    key_mask = mask.reshape(b, h * w)
    layer_args = dict(dim=d, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
                      dropout=self.dropout, pre_norm=self.pre_norm, dtype=self.dtype)
    for i in range(self.num_encoder_layers):
      memory = EncoderLayer(**layer_args, name=f'encoder_layer{i}')(
          memory, pos, key_mask, train=train)
    if self.pre_norm and self.num_encoder_layers:
      # Pre-norm layers leave their sum unnormalised: the reference's final encoder norm.
      memory = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(memory)

    if self.query_type == 'learned':
      query_pos = self.param('query_embed', nn.initializers.normal(1.0),
                             (self.num_queries, d), jnp.float32)
      ref_logit = None
    elif self.query_type == 'anchor':
      # Anchor points (Anchor DETR, Wang et al. 2022; DAB-DETR, Liu et al. 2022): each
      # query owns a learned point, uniform over the image at init; its positional query is
      # an MLP of the point's sine encoding (the encoder's, so query and key positions speak
      # the same language), and its box centre is predicted as an offset from the point.
      ref_logit = self.param('reference_points', _uniform_logit, (self.num_queries, 2),
                             jnp.float32)                             # (y, x) logits
      sine = sine_embed(jax.nn.sigmoid(ref_logit) * 2 * math.pi, d // 2).reshape(
          self.num_queries, d)                                       # y then x, [Q, d]
      query_pos = _position_mlp(sine, d)
    elif self.query_type == 'two_stage':
      ref_logit, content, encoder_outputs = self._propose(memory, mask, key_mask)
      # The selected boxes' sine encoding (d / 4 channels per coordinate) -> positions.
      sine = sine_embed(jax.nn.sigmoid(ref_logit) * 2 * math.pi, d // 4).reshape(
          b, self.num_queries, d)
      query_pos = _position_mlp(sine, d)
    else:
      raise ValueError(f'model.transformer.query_type={self.query_type!r}; use one of '
                       f'{QUERY_TYPES}.')
    query_pos = jnp.broadcast_to(query_pos.astype(self.dtype), (b, self.num_queries, d))
    # DETR's decoder starts from zero content; two-stage from the selected tokens' features.
    tgt = content.astype(self.dtype) if self.query_type == 'two_stage' else jnp.zeros_like(
        query_pos)
    # One LayerNorm shared by every layer's output (the reference decoder's `norm`,
    # applied to the intermediate outputs that feed the auxiliary losses).
    decoder_norm = nn.LayerNorm(dtype=self.dtype, name='decoder_norm')
    outputs = []
    for i in range(self.num_decoder_layers):
      tgt = DecoderLayer(**layer_args, name=f'decoder_layer{i}')(
          tgt, query_pos, memory, pos, key_mask, train=train)
      outputs.append(decoder_norm(tgt))
    hs = jnp.stack(outputs)                                          # [L, B, Q, d]

    logits = nn.Dense(self.num_classes + 1, bias_init=self._class_bias_init(),
                      dtype=self.dtype, name='class_embed')(hs)
    y = _box_mlp(hs, d, self.dtype, 'bbox_embed')
    if self.query_type == 'anchor':
      # Centre = sigmoid(offset + logit(anchor)); the model's boxes are (cx, cy, w, h).
      y = y + jnp.concatenate([ref_logit[:, ::-1], jnp.zeros_like(ref_logit)], -1)
    elif self.query_type == 'two_stage':
      y = y + ref_logit                                             # [B, Q, 4] + [L, B, Q, 4]
    boxes = jax.nn.sigmoid(y)
    if self.query_type == 'two_stage':
      return logits.astype(jnp.float32), boxes, encoder_outputs
    return logits.astype(jnp.float32), boxes

  def _class_bias_init(self):
    # Sigmoid scores start at a prior probability of 0.01 (RetinaNet, Deformable DETR).
    if self.sigmoid_scores:
      return nn.initializers.constant(-math.log((1 - 0.01) / 0.01))
    return nn.initializers.zeros

  def _propose(self, memory, mask, key_mask):
    """Two-stage query selection (Deformable DETR's two-stage variant, DINO's query
    selection): every encoder token predicts a class and a box around its own cell, and the
    Q best-scoring tokens on image content become the decoder's reference boxes.

    Returns:
      ref_logit: [B, Q, 4] logits of the selected (cx, cy, w, h), gradient stopped.
      content: [B, Q, d] the selected tokens' features, gradient stopped (RT-DETR's
        initial decoder content).
      (logits [B, L, C + 1], boxes [B, L, 4], valid [B, L]) of every token, for the
      encoder's own set loss.
    """
    b, h, w = mask.shape
    d = self.hidden_dim
    if self.num_queries > h * w:
      raise ValueError(f'two_stage selects num_queries={self.num_queries} of the encoder\'s '
                       f'{h}x{w}={h * w} tokens; use fewer queries or a finer feature map.')
    valid = mask.astype(jnp.float32)
    rows = jnp.maximum(valid.sum(1, keepdims=True), 1.0)             # valid cells per column
    cols = jnp.maximum(valid.sum(2, keepdims=True), 1.0)
    cy = (jnp.cumsum(valid, 1) - 0.5) / rows                          # cell centres on content
    cx = (jnp.cumsum(valid, 2) - 0.5) / cols
    # A token's prior box: its cell's centre, two cells wide and high.
    anchor = jnp.stack([cx, cy, jnp.broadcast_to(2.0 / cols, cx.shape),
                        jnp.broadcast_to(2.0 / rows, cy.shape)], -1).reshape(b, h * w, 4)
    anchor_logit = _logit(jnp.clip(anchor, 0.01, 0.99))
    out = nn.LayerNorm(dtype=self.dtype, name='enc_output_norm')(
        nn.Dense(d, kernel_init=_xavier, dtype=self.dtype, name='enc_output')(memory))
    logits = nn.Dense(self.num_classes + 1, bias_init=self._class_bias_init(),
                      dtype=self.dtype, name='enc_class_embed')(
        out).astype(jnp.float32)
    box_logit = _box_mlp(out, d, self.dtype, 'enc_bbox_embed') + anchor_logit
    score = class_scores(logits, self.sigmoid_scores).max(-1)        # best real class
    score = jnp.where(key_mask, score, -1.0)                         # never a padded token
    _, index = jax.lax.top_k(score, self.num_queries)                # [B, Q]
    ref_logit = jax.lax.stop_gradient(jnp.take_along_axis(box_logit, index[..., None], 1))
    content = jax.lax.stop_gradient(jnp.take_along_axis(out, index[..., None], 1))
    return ref_logit, content, (logits, jax.nn.sigmoid(box_logit), key_mask)


def _position_mlp(sine, d):
  """Positional queries from reference points' sine encodings (Linear, ReLU, Linear)."""
  x = nn.Dense(d, kernel_init=_xavier, name='anchor_proj0')(sine)
  return nn.Dense(d, kernel_init=_xavier, name='anchor_proj1')(nn.relu(x))


def _box_mlp(x, d, dtype, name):
  """DETR's 3-layer box MLP (d, d, 4), returning float32 logits."""
  for i in range(2):
    x = nn.relu(nn.Dense(d, dtype=dtype, name=f'{name}{i}')(x))
  return nn.Dense(4, dtype=dtype, name=f'{name}2')(x).astype(jnp.float32)


class Model(nn.Module):
  """DETR: backbone -> DetrHead. `config` is the experiment config."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images, *, train: bool, targets=None) -> Dict[str, jnp.ndarray]:
    """images: [B, H, W, 3] normalised; targets: the batch (only its per-image metadata
    orig_size / scale / offset is read, for the padding mask).

    Returns float32:
      pred_logits: [B, Q, C + 1] of the last decoder layer; pred_boxes: [B, Q, 4]
      normalised (cx, cy, w, h);
      aux_logits: [L_dec - 1, B, Q, C + 1], aux_boxes: [L_dec - 1, B, Q, 4], the earlier
      decoder layers (empty leading axis with one layer).
    """
    cfg = self.config.model
    dtype = jnp.dtype(self.config.dtype)
    features = backbones.build(cfg, dtype)(images.astype(dtype), train=train)
    features = features[cfg.get('feature_level', 5)]
    size = valid_size(targets, images.shape, self.config.get('data'))
    mask = feature_mask(size, features.shape[1:3], images.shape[1:3])
    head = DetrHead(num_classes=cfg.num_classes, dtype=dtype, **cfg.transformer.to_dict(),
                    sigmoid_scores=_class_loss(cfg) == 'focal',
                    name='head')
    logits, boxes, *encoder = head(features, mask, train=train)
    outputs = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1],
               'aux_logits': logits[:-1], 'aux_boxes': boxes[:-1]}
    if encoder:                           # two-stage: every encoder token's prediction
      outputs['enc_logits'], outputs['enc_boxes'], outputs['enc_valid'] = encoder[0]
    return outputs


# ----------------------------------------------------------------------------- loss


def normalized_targets(batch, image_shape, data_cfg=None):
  """Ground truth in the model's box format.

  Returns:
    classes: [B, N] int32 (-1 padding); boxes: [B, N, 4] (cx, cy, w, h) divided by the
    content size; valid: [B, N] bool, real non-crowd targets (crowd regions are never
    positives, and DETR's COCO loader drops them).
  """
  size = valid_size(batch, image_shape, data_cfg)                     # [B, 2] (h, w)
  whwh = jnp.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], -1)[:, None, :]
  boxes = box_ops.xyxy_to_cxcywh(batch['boxes']) / whwh
  valid = batch['classes'] >= 0
  if 'is_crowd' in batch:
    valid &= ~jnp.asarray(batch['is_crowd'], bool)
  return jnp.asarray(batch['classes'], jnp.int32), boxes, valid


def match(logits, boxes, gt_classes, gt_boxes, gt_valid, model_cfg, query_valid=None):
  """Hungarian matching of every (layer, image) at once: one host call for the scipy solver.

  Args:
    logits: [L, B, Q, C + 1]; boxes: [L, B, Q, 4] (cx, cy, w, h) normalised.
    gt_classes: [B, N]; gt_boxes: [B, N, 4] normalised (cx, cy, w, h); gt_valid: [B, N].
    model_cfg: config.model (matcher, cost weights).
    query_valid: optional [B, Q] bool; False rows (padded encoder tokens) are never matched
      while a valid one is free.

  Returns:
    pred_idx: [L, B, N] int32, the query matched to target n (distinct per image;
    meaningless where gt_valid is False).
  """
  if model_cfg.matcher not in MATCHERS:
    raise ValueError(f'model.matcher={model_cfg.matcher!r}; use one of {sorted(MATCHERS)}.')
  costs = dict(model_cfg.cost.to_dict(), class_cost=_class_loss(model_cfg))
  cost_fn = lambda l, b, c, g, v: hungarian.detr_cost(l, b, c, g, v, **costs)
  per_image = jax.vmap(cost_fn)                                      # over B
  cost = jax.vmap(per_image, in_axes=(0, 0, None, None, None))(      # over L
      logits, boxes, gt_classes, gt_boxes, gt_valid)                 # [L, B, Q, N]
  if query_valid is not None:
    # Far above any real cost (class <= 1, L1 <= 4, -GIoU <= 1, times their weights).
    cost = cost + jnp.where(query_valid, 0.0, 1e4)[None, :, :, None]
  valid = jnp.broadcast_to(gt_valid, cost.shape[:2] + gt_valid.shape[-1:])
  pred_idx, _, _ = MATCHERS[model_cfg.matcher](jax.lax.stop_gradient(cost), valid)
  return pred_idx


def set_loss(logits, boxes, pred_idx, gt_classes, gt_boxes, gt_valid, num_boxes, loss_cfg,
             query_valid=None):
  """DETR's loss of one decoder layer given its matching.

  Args:
    logits: [B, Q, C + 1]; boxes: [B, Q, 4] normalised (cx, cy, w, h).
    pred_idx: [B, N] matched query per target.
    gt_classes, gt_boxes, gt_valid: [B, N], [B, N, 4], [B, N] (see `normalized_targets`).
    num_boxes: scalar, real targets in the global batch (at least 1).
    loss_cfg: ce_weight, l1_weight, giou_weight, eos_coef.
    query_valid: optional [B, Q] bool; False queries (padded encoder tokens) take no
      classification loss.

  Returns:
    (weighted sum, {'loss_ce', 'loss_bbox', 'loss_giou'}).
  """
  b, q, k = logits.shape
  num_classes = k - 1
  rows = jnp.arange(b)[:, None]
  # Every query is "no object" unless matched. Queries given to padded targets are
  # distinct from the matched ones, so writing "no object" there cannot overwrite a match.
  target = jnp.full((b, q), num_classes, jnp.int32).at[rows, pred_idx].set(
      jnp.where(gt_valid, gt_classes, num_classes))
  class_loss = loss_cfg.get('class_loss', 'softmax')
  if class_loss == 'softmax':
    weights = jnp.where(target == num_classes, loss_cfg.eos_coef, 1.0)
    if query_valid is not None:
      weights = jnp.where(query_valid, weights, 0.0)
    ce = losses.softmax_cross_entropy(logits, target, weights)
    # Weighted mean over all queries of the batch, as PyTorch's cross_entropy(weight=...).
    loss_ce = ce.sum() / weights.sum()
  elif class_loss == 'focal':
    # Sigmoid focal loss on the C real-class logits ("no object" is all zeros), summed
    # over queries and classes and divided by the target count, as Deformable DETR.
    onehot = jax.nn.one_hot(target, num_classes)                    # no object -> zeros
    fl = losses.sigmoid_focal_loss(logits[..., :num_classes], onehot,
                                   alpha=loss_cfg.get('focal_alpha', 0.25),
                                   gamma=loss_cfg.get('focal_gamma', 2.0)).sum(-1)
    if query_valid is not None:
      fl = jnp.where(query_valid, fl, 0.0)
    loss_ce = fl.sum() / num_boxes
  else:
    raise ValueError(f'model.loss.class_loss={class_loss!r}; use "softmax" or "focal".')

  matched_boxes = jnp.take_along_axis(boxes, pred_idx[..., None], axis=1)  # [B, N, 4]
  m = gt_valid.astype(jnp.float32)
  l1 = jnp.abs(matched_boxes - gt_boxes).sum(-1)
  giou = losses.giou_loss(box_ops.cxcywh_to_xyxy(matched_boxes),
                          box_ops.cxcywh_to_xyxy(gt_boxes))
  loss_bbox = (l1 * m).sum() / num_boxes
  loss_giou = (giou * m).sum() / num_boxes
  total = (loss_cfg.ce_weight * loss_ce + loss_cfg.l1_weight * loss_bbox
           + loss_cfg.giou_weight * loss_giou)
  return total, {'loss_ce': loss_ce, 'loss_bbox': loss_bbox, 'loss_giou': loss_giou}


def loss(outputs, batch, config):
  """The set loss summed over the last and (with loss.aux_loss) every earlier decoder layer.

  L1 and GIoU are divided by the number of real target boxes in the batch; under jit the
  batch is the global one, so this is the global count of the reference's all-reduce.
  Returns (scalar loss, metrics of the last layer).
  """
  cfg = config.model
  loss_cfg = cfg.loss
  logits, boxes = outputs['pred_logits'][None], outputs['pred_boxes'][None]
  if loss_cfg.aux_loss and outputs['aux_logits'].shape[0]:
    logits = jnp.concatenate([outputs['aux_logits'], logits])       # [L, B, Q, C + 1]
    boxes = jnp.concatenate([outputs['aux_boxes'], boxes])
  gt_classes, gt_boxes, gt_valid = normalized_targets(
      batch, batch['image'].shape, config.get('data'))
  num_boxes = jnp.maximum(gt_valid.sum().astype(jnp.float32), 1.0)
  pred_idx = match(logits, boxes, gt_classes, gt_boxes, gt_valid, cfg)   # [L, B, N]

  total = 0.0
  for layer in range(logits.shape[0]):
    layer_loss, metrics = set_loss(logits[layer], boxes[layer], pred_idx[layer],
                                   gt_classes, gt_boxes, gt_valid, num_boxes, loss_cfg)
    total = total + layer_loss
  if 'enc_logits' in outputs:
    # Two-stage: the encoder's token proposals take the set loss with their own matching.
    # They are never detections, so each target may be matched to `encoder_repeats` tokens
    # (H-DETR's one-to-many matching: the targets repeated k times, then Hungarian).
    k = int(loss_cfg.get('encoder_repeats', 1))
    enc_logits, enc_boxes = outputs['enc_logits'][None], outputs['enc_boxes'][None]
    enc_valid = outputs['enc_valid']
    if k * gt_valid.shape[1] > enc_valid.shape[1]:
      raise ValueError(f'model.loss.encoder_repeats={k} x data.max_instances='
                       f'{gt_valid.shape[1]} targets exceed the {enc_valid.shape[1]} '
                       'encoder tokens.')
    rep_classes, rep_boxes, rep_valid = (jnp.tile(gt_classes, (1, k)),
                                         jnp.tile(gt_boxes, (1, k, 1)),
                                         jnp.tile(gt_valid, (1, k)))
    enc_idx = match(enc_logits, enc_boxes, rep_classes, rep_boxes, rep_valid, cfg, enc_valid)
    enc_loss, enc_metrics = set_loss(enc_logits[0], enc_boxes[0], enc_idx[0], rep_classes,
                                     rep_boxes, rep_valid, num_boxes * k, loss_cfg,
                                     enc_valid)
    total = total + enc_loss
    metrics = dict(metrics, **{f'enc_{k}': v for k, v in enc_metrics.items()})
  return total, dict(metrics, num_boxes=num_boxes / gt_valid.shape[0])


# ----------------------------------------------------------------------------- inference


def postprocess(outputs, batch, config):
  """Softmax, drop "no object", each query's best class, top-k queries by score; no NMS.

  Returns boxes [B, K, 4] (original-image pixels), scores [B, K], classes [B, K] int32,
  num [B] int32 (= K: every query is a detection), K = min(postprocess.max_detections, Q).
  """
  prob = class_scores(outputs['pred_logits'], _class_loss(config.model) == 'focal')
  scores, classes = prob.max(-1), prob.argmax(-1)
  k = min(config.model.postprocess.max_detections, scores.shape[1])
  scores, keep = jax.lax.top_k(scores, k)
  classes = jnp.take_along_axis(classes, keep, 1)
  boxes = jnp.take_along_axis(outputs['pred_boxes'], keep[..., None], 1)
  size = valid_size(batch, batch['image'].shape, config.get('data'))  # [B, 2] (h, w)
  whwh = jnp.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], -1)[:, None, :]
  boxes = box_ops.to_original_pixels(box_ops.cxcywh_to_xyxy(boxes) * whwh, batch)
  num = jnp.full(scores.shape[:1], k, jnp.int32)
  return {'boxes': boxes, 'scores': scores, 'classes': classes.astype(jnp.int32), 'num': num}
