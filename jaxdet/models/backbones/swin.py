"""Swin Transformer backbone (Liu et al. 2021, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows"), in the form its detection code uses.

images [B, H, W, 3] -> {2: [B, H/4, W/4, C], 3: [.., 2C], 4: [.., 4C], 5: [B, H/32, W/32, 8C]}
(sizes rounded up), every level normalised by its own LayerNorm:

  patch_embed      proj: 4x4/4 conv to C channels, norm: LayerNorm; inputs are zero-padded
                   on the right and bottom to a multiple of 4
  layers_{i}       stage i = 0..3 (level i + 2) of depths[i] blocks, then (i < 3) the patch
                   merging into stage i + 1
    blocks_{j}     x + DropPath(attn(norm1(x))); x + DropPath(mlp(norm2(x)))
      attn         window attention over M x M windows (M = 7) with a learned relative
                   position bias; odd j shift the windows by M // 2 (cyclic roll + mask)
    downsample     2x2 neighbourhoods concatenated -> norm: LayerNorm(4C) ->
                   reduction: Linear(4C -> 2C, no bias)
  norm{i}          LayerNorm on stage i's output (before its merging)

Facts (`../shared/reference/detr_swin_mpvit.md` section 2): the variants of `SWIN_VARIANTS`,
MLP ratio 4, qkv bias, no absolute position embedding; a (2M-1)^2 x heads bias table indexed
by (dh + M-1)(2M-1) + (dw + M-1); -100 between the regions of a shifted window; padding after
norm1 and before the roll, with the padded tokens left unmasked; drop-path rates rising
linearly from 0 over all blocks.

Parameter names mirror the official PyTorch keys: `layers.1.blocks.0.attn.qkv.weight` is
`layers_1/blocks_0/attn/qkv/kernel` here. A numeric key part joins its parent with '_', and
`weight` becomes `kernel` (transposed to Flax's layout) or `scale` (LayerNorm). `from_torch`
and `to_torch` apply exactly that rule.
"""

import functools
import re
from typing import Any, Mapping, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models import layers

Array = jax.Array

# Paper Table 1 / official configs: embed dim C, blocks and heads per stage, and the
# drop-path rate of the ImageNet-1K recipe (Swin-L is only pre-trained on 22K, at 0.2).
SWIN_VARIANTS = {
    'T': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    'S': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'B': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
              drop_path_rate=0.5),
    'L': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
              drop_path_rate=0.2),
}

# torch.nn.LayerNorm's default epsilon, which the released checkpoints were trained with
# (Flax defaults to 1e-6).
LN_EPSILON = 1e-5
# Added to the logits of token pairs from different regions of a shifted window: large
# enough to vanish after the softmax, finite so that a fully masked row cannot give NaN.
MASK_VALUE = -100.0

# Linear layers and the bias table start from a truncated normal of std 0.02 with zero
# biases, the reference's `trunc_normal_` initialisation for training from scratch.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)


# ----------------------------------------------------------------------------- window ops


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """Index into the (2M-1)^2 bias table for every token pair of an M x M window.

  Args:
    window: M.

  Returns:
    [M*M, M*M] int32. Tokens are numbered row-major (t = h * M + w); entry (p, q) is
    (h_p - h_q + M - 1) * (2M - 1) + (w_p - w_q + M - 1).
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  coords = coords.reshape(2, -1)                                  # [2, M*M] (h, w)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)    # [2, M*M, M*M]
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def window_partition(x, window: int):
  """Cuts a map into non-overlapping windows.

  Args:
    x: [B, H, W, C], H and W multiples of `window` (numpy or jax).
    window: M.

  Returns:
    [B * nW, M*M, C] with nW = (H/M) * (W/M); windows ordered batch-major then row-major,
    tokens row-major inside a window.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                               # [B, H/M, W/M, M, M, C]
  return x.reshape(b * (h // window) * (w // window), window * window, c)


def window_merge(windows, window: int, height: int, width: int):
  """Inverse of `window_partition`: [B * nW, M*M, C] -> [B, height, width, C]."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                               # [B, H/M, M, W/M, M, C]
  return x.reshape(-1, height, width, c)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: int, shift_h: int,
                        shift_w: int) -> np.ndarray:
  """Attention mask of the shifted windows, for a map already rolled by (-shift_h, -shift_w).

  After the roll, the last window along an axis holds tokens from both ends of the map.
  Each axis is cut into the bands [0, size-M), [size-M, size-shift), [size-shift, size)
  (a single band when its shift is 0); the bands of the two axes make up to 9 regions,
  and two tokens of one window may attend to each other only within one region.

  Args:
    height, width: the padded map size (multiples of `window`).
    window: M.
    shift_h, shift_w: the roll along each axis (0 <= shift < M).

  Returns:
    [nW, M*M, M*M] float32: 0 where the pair shares a region, MASK_VALUE elsewhere, in
    the window and token order of `window_partition`.
  """
  def bands(size, shift):
    if shift == 0:
      return [slice(0, size)]
    return [slice(0, size - window), slice(size - window, size - shift), slice(size - shift, size)]

  labels = np.zeros((1, height, width, 1), np.int32)
  region = 0
  for rows in bands(height, shift_h):
    for cols in bands(width, shift_w):
      labels[0, rows, cols, 0] = region
      region += 1
  ids = window_partition(labels, window)[..., 0]                  # [nW, M*M]
  return np.where(ids[:, :, None] == ids[:, None, :], 0.0, MASK_VALUE).astype(np.float32)


def merge_patches(x: Array) -> Array:
  """The 2x2 neighbourhood gather of patch merging.

  Args:
    x: [B, H, W, C].

  Returns:
    [B, ceil(H/2), ceil(W/2), 4C]: odd sizes are zero-padded by one row/column at the
    bottom/right, then channel blocks are the neighbours (0,0), (1,0), (0,1), (1,1) as
    (row, col) offsets, the reference's x0, x1, x2, x3 order that its reduction weights
    expect.
  """
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  return jnp.concatenate(
      [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


# ----------------------------------------------------------------------------- modules


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


class WindowAttention(nn.Module):
  """(Shifted-)window multi-head self-attention with the relative position bias.

  Attributes:
    num_heads: attention heads; the channels must divide by it.
    window_size: M.
    qkv_bias: bias on the q, k, v projection.
    dtype: activation dtype (the logits and softmax are float32).
  """
  num_heads: int
  window_size: int = 7
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, shift: tuple[int, int] = (0, 0)) -> Array:
    """Attention inside the windows of a map.

    Args:
      x: [B, H, W, C] normalised tokens.
      shift: (sh, sw) cyclic shift of the windows; (0, 0) for regular windows.

    Returns:
      [B, H, W, C].
    """
    b, h, w, c = x.shape
    m = self.window_size
    heads = self.num_heads
    head_dim = c // heads
    hp, wp = -(-h // m) * m, -(-w // m) * m
    # Zero padding after norm1 and before the roll, as the detection reference (padding
    # after the roll misaligns the mask); the padded tokens are attended to, unmasked.
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    shifted = any(shift)
    if shifted:
      x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    windows = window_partition(x, m)                              # [N, M*M, C], N = B*nW
    n = windows.shape[0]

    qkv = _dense(3 * c, self.dtype, 'qkv', self.qkv_bias)(windows)
    # The 3C outputs are ordered (q|k|v, head, channel), the reference's reshape.
    qkv = qkv.reshape(n, m * m, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)  # [3, N, h, M*M, d]
    q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
    logits = jnp.einsum('nhqd,nhkd->nhqk', q, k).astype(jnp.float32)   # [N, h, M*M, M*M]

    table = self.param('relative_position_bias_table', _dense_init,
                       ((2 * m - 1)**2, heads), jnp.float32)
    bias = table[relative_position_index(m).reshape(-1)]          # [M*M*M*M, h]
    logits = logits + bias.reshape(m * m, m * m, heads).transpose(2, 0, 1)[None]
    if shifted:
      mask = jnp.asarray(shifted_window_mask(hp, wp, m, shift[0], shift[1]))  # [nW, ., .]
      num_windows = mask.shape[0]
      logits = logits.reshape(b, num_windows, heads, m * m, m * m) + mask[None, :, None]
      logits = logits.reshape(n, heads, m * m, m * m)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('nhqk,nhkd->nqhd', weights, v).reshape(n, m * m, c)
    out = _dense(c, self.dtype, 'proj')(out)

    x = window_merge(out, m, hp, wp)                              # [B, Hp, Wp, C]
    if shifted:
      x = jnp.roll(x, shift, axis=(1, 2))
    return x[:, :h, :w]


class Mlp(nn.Module):
  """fc1 (C -> ratio*C) -> exact GELU -> fc2 (-> C), the reference's `Mlp`."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., C] -> [..., C]."""
    c = x.shape[-1]
    x = layers.activation('gelu')(_dense(self.hidden, self.dtype, 'fc1')(x))
    return _dense(c, self.dtype, 'fc2')(x)


class SwinBlock(nn.Module):
  """One Swin Transformer block (pre-norm attention and MLP, each with drop-path).

  Attributes:
    num_heads: attention heads.
    window_size: M.
    shifted: shift the windows by M // 2 (the odd blocks of a stage).
    always_shift: shift even when an axis is no longer than the window, as the detection
      code; False disables the shift on such an axis, as the ImageNet classification code
      and timm (identical outputs when that axis equals M).
    mlp_ratio: MLP hidden width / C.
    qkv_bias: bias on the q, k, v projection.
    drop_path: stochastic depth rate of both residual branches.
    dtype: activation dtype.
  """
  num_heads: int
  window_size: int = 7
  shifted: bool = False
  always_shift: bool = True
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]. `train` is positional for `nn.remat`."""
    m = self.window_size
    shift = tuple(
        0 if not self.shifted or (not self.always_shift and size <= m) else m // 2
        for size in x.shape[1:3])
    y = WindowAttention(self.num_heads, m, self.qkv_bias, dtype=self.dtype, name='attn')(
        _layer_norm(self.dtype, 'norm1')(x), shift)
    x = x + layers.StochasticDepth(self.drop_path)(y, train=train)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name='mlp')(
        _layer_norm(self.dtype, 'norm2')(x))
    return x + layers.StochasticDepth(self.drop_path)(y, train=train)


class PatchMerging(nn.Module):
  """2x2 patch merging: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = _layer_norm(self.dtype, 'norm')(merge_patches(x))         # [B, H/2, W/2, 4C]
    return _dense(2 * c, self.dtype, 'reduction', use_bias=False)(x)


class SwinStage(nn.Module):
  """`depth` blocks alternating regular and shifted windows, then optional merging.

  Attributes:
    num_heads, window_size, always_shift, mlp_ratio, qkv_bias: see `SwinBlock`.
    drop_paths: one stochastic depth rate per block (its length is the depth).
    downsample: end with patch merging.
    remat: recompute each block in the backward pass instead of storing its activations.
    dtype: activation dtype.
  """
  num_heads: int
  drop_paths: Sequence[float]
  window_size: int = 7
  always_shift: bool = True
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  downsample: bool = True
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array | None]:
    """x: [B, H, W, C] -> (stage output [B, H, W, C], merged [B, H/2, W/2, 2C] or None)."""
    # `train` (argument 2, counting self) is a Python bool: static under remat.
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    for j, rate in enumerate(self.drop_paths):
      x = block_cls(self.num_heads, self.window_size, shifted=j % 2 == 1,
                    always_shift=self.always_shift, mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias, drop_path=rate, dtype=self.dtype,
                    name=f'blocks_{j}')(x, train)
    down = PatchMerging(dtype=self.dtype, name='downsample')(x) if self.downsample else None
    return x, down


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> C channels, then LayerNorm."""
  embed_dim: int
  patch_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images: [B, H, W, 3] -> [B, ceil(H/p), ceil(W/p), C]."""
    _, h, w, _ = images.shape
    p = self.patch_size
    # Right/bottom zero padding to a multiple of p, as the detection reference.
    images = jnp.pad(images, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='proj')(images)
    return _layer_norm(self.dtype, 'norm')(x)


class SwinTransformer(nn.Module):
  """Swin Transformer feature extractor (or, with `num_classes`, the ImageNet classifier).

  Attributes:
    variant: 'T' | 'S' | 'B' | 'L', a row of `SWIN_VARIANTS`.
    embed_dim, depths, num_heads: override the variant's (None keeps it); tests use tiny
      widths this way.
    drop_path_rate: the last block's stochastic depth rate; None takes the variant's
      ImageNet rate. The detection recipes use less (0.1-0.3; see the configs).
    window_size: M.
    patch_size: side of the patch embedding.
    mlp_ratio: MLP hidden width / C.
    qkv_bias: bias on the q, k, v projections.
    always_shift: see `SwinBlock`.
    remat: gradient checkpointing of every block (`nn.remat`), which roughly halves the
      training memory of the reference (its `use_checkpoint`) at the cost of a recomputed
      forward pass.
    num_classes: 0 for the detection backbone; > 0 builds the ImageNet classifier instead
      (final `norm`, global average pool, `head`; no per-level norms), used to compare
      parameter counts and logits with the papers and the classification checkpoints.
    dtype: activation dtype.
  """
  variant: str = 'T'
  embed_dim: int | None = None
  depths: Sequence[int] | None = None
  num_heads: Sequence[int] | None = None
  drop_path_rate: float | None = None
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  always_shift: bool = True
  remat: bool = False
  num_classes: int = 0
  dtype: Any = jnp.float32

  def spec(self) -> dict:
    """The variant's row with this module's overrides applied."""
    if self.variant not in SWIN_VARIANTS:
      raise ValueError(f'Swin variant must be one of {sorted(SWIN_VARIANTS)}, got '
                       f'{self.variant!r}.')
    spec = dict(SWIN_VARIANTS[self.variant])
    for key in ('embed_dim', 'depths', 'num_heads', 'drop_path_rate'):
      if getattr(self, key) is not None:
        spec[key] = getattr(self, key)
    spec['depths'], spec['num_heads'] = tuple(spec['depths']), tuple(spec['num_heads'])
    if len(spec['depths']) != 4 or len(spec['num_heads']) != 4:
      raise ValueError(f'Swin needs 4 stages; got depths={spec["depths"]}, '
                       f'num_heads={spec["num_heads"]}.')
    for i, heads in enumerate(spec['num_heads']):
      if (spec['embed_dim'] * 2**i) % heads:
        raise ValueError(f'Stage {i} width {spec["embed_dim"] * 2**i} does not divide into '
                         f'{heads} heads.')
    return spec

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array] | Array:
    """Computes the feature pyramid.

    Args:
      images: [B, H, W, 3] normalized images, any H and W.
      train: stochastic depth when True.

    Returns:
      {l: [B, ceil(H/2**l), ceil(W/2**l), C * 2**(l-2)]} for l = 2..5; with num_classes > 0,
      logits [B, num_classes] instead.
    """
    spec = self.spec()
    depths = spec['depths']
    # Stochastic depth rises linearly from 0 over all blocks of all stages.
    rates = np.linspace(0.0, spec['drop_path_rate'], sum(depths)).tolist()
    x = PatchEmbed(spec['embed_dim'], self.patch_size, dtype=self.dtype,
                   name='patch_embed')(images.astype(self.dtype))
    features = {}
    for i, depth in enumerate(depths):
      start = sum(depths[:i])
      out, down = SwinStage(
          spec['num_heads'][i], tuple(rates[start:start + depth]),
          window_size=self.window_size, always_shift=self.always_shift,
          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, downsample=i < len(depths) - 1,
          remat=self.remat, dtype=self.dtype, name=f'layers_{i}')(x, train=train)
      if not self.num_classes:
        features[i + 2] = _layer_norm(self.dtype, f'norm{i}')(out)
      x = down if down is not None else out
    if not self.num_classes:
      return features
    x = _layer_norm(self.dtype, 'norm')(x).mean(axis=(1, 2))      # [B, 8C]
    return _dense(self.num_classes, self.dtype, 'head')(x)


def build(cfg, dtype, name=None) -> SwinTransformer:
  """Swin from `config.model.backbone` (keys: the attributes of `SwinTransformer`)."""
  return layers.build_module(SwinTransformer, cfg, dtype, name=name)


# ----------------------------------------------------------------------------- checkpoints

# Buffers of the PyTorch modules, recomputed here from the window size and map size.
_TORCH_BUFFERS = ('relative_position_index', 'attn_mask')


def _flax_module_path(torch_module: str) -> tuple[str, ...]:
  """'layers.1.blocks.0.attn.qkv' -> ('layers_1', 'blocks_0', 'attn', 'qkv')."""
  parts = []
  for token in torch_module.split('.'):
    if token.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{token}'
    else:
      parts.append(token)
  return tuple(parts)


def _torch_module_name(path: Sequence[str]) -> str:
  """('layers_1', 'blocks_0', 'attn', 'qkv') -> 'layers.1.blocks.0.attn.qkv'."""
  out = []
  for token in path:
    match = re.fullmatch(r'(.+)_(\d+)', token)
    out.extend(match.groups() if match else (token,))
  return '.'.join(out)


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Official Swin key names from the layouts the released checkpoints come in.

  * 'module.' (DistributedDataParallel) prefixes are dropped.
  * A detector checkpoint (mmdetection: 'backbone.*', 'neck.*', ...) gives its backbone.
  * timm puts each patch merging at the start of the next stage ('layers.{i+1}.downsample')
    and names the classifier 'head.fc'; both are moved back to the official places.
  * Buffers are dropped after checking that a relative position index equals ours.
  """
  sd = {re.sub(r'^module\.', '', k): np.asarray(v) for k, v in state_dict.items()}
  if any(k.startswith('backbone.') for k in sd):
    sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
  if 'layers.3.downsample.reduction.weight' in sd and (
      'layers.0.downsample.reduction.weight' not in sd):
    sd = {re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', k): v
          for k, v in sd.items()}
  sd = {re.sub(r'^head\.fc\.', 'head.', k): v for k, v in sd.items()}
  out = {}
  for key, value in sd.items():
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'relative_position_index':
      window = int(round((value.shape[0])**0.5))
      if value.shape != (window * window,) * 2 or not np.array_equal(
          value, relative_position_index(window)):
        raise ValueError(f'{key}: the checkpoint indexes its bias table differently from '
                         'jaxdet (a different window size or layout).')
    if leaf in _TORCH_BUFFERS:
      continue
    out[key] = value
  return out


def from_torch(state_dict: Mapping[str, Any], params_template) -> dict:
  """Official Swin PyTorch weights -> this module's parameters.

  Args:
    state_dict: {key: array} as `torch.load(..., weights_only=True)` gives (tensors
      converted with `.numpy()`): the official classification or detection layout, timm's,
      or a whole mmdetection detector (its 'backbone.*' part is taken).
    params_template: the backbone's params tree (arrays or ShapeDtypeStructs), e.g.
      `jax.eval_shape(model.init, ...)['params']['backbone']`.

  Returns:
    A params tree of float32 numpy arrays with the template's structure.

  Raises:
    ValueError: listing every checkpoint key that matches no parameter, every parameter
      the checkpoint lacks and every shape mismatch.

  An ImageNet classification checkpoint fits the detection backbone as the detection
  reference loads it: its final `norm` and `head` are dropped, and the per-level `norm{i}`
  it lacks start at identity (scale 1, bias 0). Any other difference is an error.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params_template))
  template = {path: tuple(leaf.shape) for path, leaf in flat.items()}
  modules = {path[:-1] for path in template}
  is_classifier = ('head',) in modules
  sd = _normalize_keys(state_dict)

  params, unmatched, misshaped, dropped = {}, [], [], []
  for key, value in sorted(sd.items()):
    module, _, leaf = key.rpartition('.')
    path = _flax_module_path(module)
    shape = tuple(value.shape)
    if not is_classifier and (module in ('norm', 'head')):
      dropped.append(key)
      continue
    if leaf == 'weight':
      leaf = 'kernel' if path + ('kernel',) in template else 'scale'
      if leaf == 'kernel':
        # torch Linear [out, in] -> [in, out]; Conv2d OIHW -> HWIO.
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    path = path + (leaf,)
    if path not in template:
      unmatched.append(f'{key} {shape}')
    elif tuple(value.shape) != template[path]:
      misshaped.append(f'{key}: checkpoint {shape}, model {template[path]} '
                       f'(as {"/".join(path)}, in its layout)')
    else:
      params[path] = np.asarray(value, np.float32)

  defaulted = []
  has_level_norms = any(re.fullmatch(r'norm\d', k.split('.')[0]) for k in sd)
  missing = []
  for path, shape in sorted(template.items()):
    if path in params:
      continue
    if not has_level_norms and re.fullmatch(r'norm\d', path[0]) and len(path) == 2:
      params[path] = np.full(shape, 1.0 if path[1] == 'scale' else 0.0, np.float32)
      defaulted.append('/'.join(path))
    else:
      missing.append(f'{_torch_module_name(path[:-1])}.{path[-1]} {shape}')
  if unmatched or missing or misshaped:
    lines = ['The checkpoint does not fit this Swin backbone.']
    for title, items in (('checkpoint keys that match no parameter', unmatched),
                         ('parameters missing from the checkpoint (as jaxdet names them)',
                          missing),
                         ('shape mismatches', misshaped)):
      if items:
        lines.append(f'{len(items)} {title}:')
        lines.extend(f'  {item}' for item in items)
    raise ValueError('\n'.join(lines))
  if dropped:
    logging.info('Swin from_torch: dropped the classifier entries %s', dropped)
  if defaulted:
    logging.info('Swin from_torch: %s start at identity (not in the checkpoint)', defaulted)
  return flax.traverse_util.unflatten_dict(params)


def to_torch(params) -> dict[str, np.ndarray]:
  """This module's parameters -> the official PyTorch state dict (the inverse of `from_torch`).

  Args:
    params: the backbone's params tree.

  Returns:
    {official key: float32 array in the PyTorch layout}, plus each attention's
    `relative_position_index` buffer (int64) that the official modules also store.
  """
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    value = np.asarray(value, np.float32)
    module, leaf = _torch_module_name(path[:-1]), path[-1]
    if leaf == 'kernel':
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
      leaf = 'weight'
    elif leaf == 'scale':
      leaf = 'weight'
    elif leaf == 'relative_position_bias_table':
      window = int(round((value.shape[0]**0.5 + 1) / 2))
      out[f'{module}.relative_position_index'] = relative_position_index(window).astype(np.int64)
    out[f'{module}.{leaf}'] = value
  return out
