"""MPViT: Multi-Path Vision Transformer (Lee, Kim, Willette, Hwang, CVPR 2022).

images [B, H, W, 3] -> {2: stride 4, 3: 8, 4: 16, 5: 32}, the level dict of ResNet, so FPN
and every detector take it unchanged. Level l is the output of stage l-1 (l = 2..5); its
channels are embed_dims[l-1] for l <= 4 and embed_dims[3] for l = 5, as the official
detection backbone (T: 96/176/216/216, S: 128/216/288/288).

  stem                  two 3x3/2 Conv-BN-Hardswish (C0/2, then C0): stride 4
  per stage s = 0..3
    multi-scale patch   num_path depthwise-separable 3x3 embeddings applied in sequence
    embedding           (3x3 dw -> 1x1 pw -> BN -> Hardswish; only the first of stages 1..3
                        strides 2), so path p sees a 3/5/7 receptive field while every path
                        keeps the same token count (paper section 3.1)
    multi-path          one encoder per path: L blocks of pre-LN (eps 1e-6) factorized
    transformer         attention with convolutional relative position encoding (CoaT),
                        then an MLP; a conv position encoding shared by the encoder's blocks
                        runs before each block (paper section 3.2)
    local path          a depthwise residual bottleneck on the first embedding:
                        1x1 Conv-BN-Hardswish, 3x3 dw-BN-Hardswish, 1x1 Conv-BN, + identity
    global-to-local     concatenate [local, path_1 .. path_P] on channels, 1x1
    interaction         Conv-BN-Hardswish to the next stage's width (paper section 3.3)

Everything is a convolution or a reduction over all tokens, so any H and W work (no window
or patch divisibility); the detectors pad images to a multiple of 2**max_level anyway.

The parameter tree mirrors the official PyTorch module tree (youngwanLEE/MPViT `mpvit.py`):
a torch key `a.b.3.c.weight` is the Flax path `a/b_3/c/kernel|scale`, so `from_torch` and
`to_torch` below are a mechanical renaming plus the layout changes of conv and linear
kernels.
"""

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import convert
from jaxdet.models import layers

Array = jax.Array

# Paper Table 1 (and the official `mpvit_tiny` ... `mpvit_base` constructors): paths,
# transformer blocks, channels and MLP ratio per stage; 8 heads everywhere. The ImageNet
# classifiers have 5,843,736 / 10,573,448 / 22,892,400 / 74,845,976 parameters (the
# counts in the official constructors' docstrings; jaxdet's match them exactly).
MPVIT_VARIANTS = {
    'T': dict(num_path=(2, 3, 3, 3), num_layers=(1, 2, 4, 1),
              embed_dims=(64, 96, 176, 216), mlp_ratios=(2, 2, 2, 2), num_heads=(8, 8, 8, 8)),
    'XS': dict(num_path=(2, 3, 3, 3), num_layers=(1, 2, 4, 1),
               embed_dims=(64, 128, 192, 256), mlp_ratios=(4, 4, 4, 4), num_heads=(8, 8, 8, 8)),
    'S': dict(num_path=(2, 3, 3, 3), num_layers=(1, 3, 6, 3),
              embed_dims=(64, 128, 216, 288), mlp_ratios=(4, 4, 4, 4), num_heads=(8, 8, 8, 8)),
    'B': dict(num_path=(2, 3, 3, 3), num_layers=(1, 3, 8, 3),
              embed_dims=(128, 224, 368, 480), mlp_ratios=(4, 4, 4, 4), num_heads=(8, 8, 8, 8)),
}

# CoaT's convolutional relative position encoding: (window, heads) splits of the 8 heads.
CRPE_WINDOW = ((3, 2), (5, 3), (7, 3))

# The transformer blocks' LayerNorm epsilon (official `partial(nn.LayerNorm, eps=1e-6)`).
LAYER_NORM_EPSILON = 1e-6

# PyTorch initialisations of the official code: convs N(0, 2/fan_out), linears
# truncated N(0, 0.02).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_dense_init = nn.initializers.truncated_normal(0.02)


def hard_swish(x: Array) -> Array:
  """PyTorch nn.Hardswish: x * relu6(x + 3) / 6, any shape."""
  return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def factorized_attention(q: Array, k: Array, v: Array) -> Array:
  """CoaT's factorized attention, linear in the number of tokens.

  softmax(K) is taken over the token axis, the per-head Ch x Ch context softmax(K)^T V is
  formed first, and Q multiplies it: Ch**-0.5 * Q (softmax(K)^T V). This costs O(N Ch^2)
  instead of the O(N^2 Ch) of softmax(Q K^T) V.

  Args:
    q, k, v: [B, N, h, Ch] queries, keys and values of h heads over N tokens.

  Returns:
    [B, N, h, Ch] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  # The softmax over all tokens runs in float32: with bfloat16 activations a sum over
  # thousands of tokens would lose the small weights.
  k_soft = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(v.dtype)
  context = jnp.einsum('bnhk,bnhv->bhkv', k_soft, v)  # [B, h, Ch, Ch]
  return (scale * jnp.einsum('bnhk,bhkv->bnhv', q, context)).astype(q.dtype)


def _depthwise_conv(features: int, kernel: int, strides: int, use_bias: bool, dtype, name):
  """A depthwise (groups = channels) conv with torch's symmetric k//2 padding."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=layers.conv_padding(kernel, 'FIXED'), feature_group_count=features,
                 use_bias=use_bias, kernel_init=_conv_init, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class ConvBN(nn.Module):
  """Conv (no bias) -> BN -> optional Hardswish: the official `Conv2d_BN` (conv, bn)."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  use_act: bool = False
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C_in] -> [B, ceil(H/s), ceil(W/s), features]."""
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                strides=(self.strides, self.strides),
                padding=layers.conv_padding(self.kernel_size, 'FIXED'), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                name='conv')(x)
    x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                          name='bn')(x)
    return hard_swish(x) if self.use_act else x


class DWConvBN(nn.Module):
  """3x3 depthwise -> 1x1 pointwise -> BN -> Hardswish (official `DWConv2d_BN`)."""
  features: int
  strides: int = 1
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, features] -> [B, ceil(H/s), ceil(W/s), features]."""
    x = _depthwise_conv(x.shape[-1], 3, self.strides, False, self.dtype, 'dwconv')(x)
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=_conv_init,
                dtype=self.dtype, param_dtype=jnp.float32, name='pwconv')(x)
    x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                          name='bn')(x)
    return hard_swish(x)


class DWCPatchEmbed(nn.Module):
  """One path's patch embedding (official `DWCPatchEmbed`, holding `patch_conv`)."""
  features: int
  strides: int = 1
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, features] -> [B, ceil(H/s), ceil(W/s), features]."""
    return DWConvBN(self.features, self.strides, self.norm_momentum, self.norm_epsilon,
                    self.dtype, name='patch_conv')(x, train=train)


class PatchEmbedStage(nn.Module):
  """Multi-scale patch embedding: num_path embeddings chained, every output kept.

  Chaining 3x3 convs gives path p a (2p + 3)-pixel receptive field at the same stride,
  so the paths see coarser patches but produce the same number of tokens (paper 3.1).
  """
  features: int
  num_path: int
  downsample: bool
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> list[Array]:
    """x: [B, H, W, C] -> num_path maps [B, H', W', C], H' = ceil(H/2) if downsample."""
    outputs = []
    for p in range(self.num_path):
      strides = 2 if self.downsample and p == 0 else 1
      x = DWCPatchEmbed(self.features, strides, self.norm_momentum, self.norm_epsilon,
                        self.dtype, name=f'patch_embeds_{p}')(x, train=train)
      outputs.append(x)
    return outputs


class ConvPosEnc(nn.Module):
  """Convolutional position encoding: x + dwconv3x3(x) (official `ConvPosEnc`, as CPVT)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    return x + _depthwise_conv(x.shape[-1], 3, 1, True, self.dtype, 'proj')(x)


class ConvRelPosEnc(nn.Module):
  """CoaT's convolutional relative position encoding: Q * dwconv(V), per head split.

  The heads are split into groups (CRPE_WINDOW: 2 heads with a 3x3 window, 3 with 5x5,
  3 with 7x7); each group's value channels go through a depthwise conv of its window.

  Attributes:
    window: ((kernel, heads), ...) covering all heads in order.
  """
  window: Sequence[tuple[int, int]] = CRPE_WINDOW
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: Array, v: Array, size: tuple[int, int]) -> Array:
    """Computes the position term added to the attention output.

    Args:
      q, v: [B, N, h, Ch] with N = H * W tokens in row-major order.
      size: (H, W).

    Returns:
      [B, N, h, Ch]: q times the depthwise-convolved values.
    """
    batch, n, heads, ch = v.shape
    height, width = size
    if sum(s for _, s in self.window) != heads:
      raise ValueError(f'CRPE window {tuple(self.window)} splits '
                       f'{sum(s for _, s in self.window)} heads, the attention has {heads}.')
    # Channels are head-major (head * Ch + c), the order of torch's "(h Ch)" layout.
    v_img = v.reshape(batch, height, width, heads * ch)
    outs, start = [], 0
    for i, (kernel, split) in enumerate(self.window):
      part = v_img[..., start:start + split * ch]
      outs.append(_depthwise_conv(split * ch, kernel, 1, True, self.dtype,
                                  f'conv_list_{i}')(part))
      start += split * ch
    conv_v = jnp.concatenate(outs, axis=-1).reshape(batch, n, heads, ch)
    return q * conv_v


class FactorAttConvRelPosEnc(nn.Module):
  """Factorized attention + CRPE, then the output projection (`FactorAtt_ConvRelPosEnc`).

  Attributes:
    num_heads: attention heads h; channels C must be divisible by h.
    crpe: the encoder's shared ConvRelPosEnc.
  """
  num_heads: int
  crpe: nn.Module
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] (layer-normalized tokens) -> [B, H, W, C]."""
    batch, height, width, channels = x.shape
    ch = channels // self.num_heads
    dense = lambda n, name: nn.Dense(n, kernel_init=_dense_init, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    # [B, H, W, 3C] -> [B, N, 3, h, Ch]: torch's reshape(B, N, 3, h, Ch).
    qkv = dense(3 * channels, 'qkv')(x).reshape(batch, height * width, 3, self.num_heads, ch)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, h, Ch]
    # The relative position term is added unscaled (CoaT eq. 6).
    y = factorized_attention(q, k, v) + self.crpe(q, v, (height, width))
    y = y.reshape(batch, height, width, channels)
    return dense(channels, 'proj')(y)


class Mlp(nn.Module):
  """fc1 -> GELU (exact) -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., C] -> [..., C]."""
    out = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=_dense_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name='fc1')(x)
    x = layers.activation('gelu')(x)
    return nn.Dense(out, kernel_init=_dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name='fc2')(x)


class MHCABlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)), with drop-path."""
  num_heads: int
  mlp_ratio: int
  crpe: nn.Module
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    norm = lambda name: nn.LayerNorm(LAYER_NORM_EPSILON, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    drop = layers.StochasticDepth(self.drop_path)
    y = FactorAttConvRelPosEnc(self.num_heads, self.crpe, self.dtype,
                               name='factoratt_crpe')(norm('norm1')(x))
    x = x + drop(y, train=train)
    y = Mlp(x.shape[-1] * self.mlp_ratio, self.dtype, name='mlp')(norm('norm2')(x))
    return x + drop(y, train=train)


class MHCAEncoder(nn.Module):
  """One path's encoder: blocks sharing one conv position encoding and one CRPE."""
  num_layers: int
  num_heads: int
  mlp_ratio: int
  drop_path: Sequence[float]
  crpe_window: Sequence[tuple[int, int]] = CRPE_WINDOW
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    cpe = ConvPosEnc(self.dtype, name='cpe')
    crpe = ConvRelPosEnc(tuple(self.crpe_window), self.dtype, name='crpe')
    for i in range(self.num_layers):
      # The official block applies the shared CPE first (MHCABlock.forward).
      x = cpe(x)
      x = MHCABlock(self.num_heads, self.mlp_ratio, crpe, self.drop_path[i], self.dtype,
                    name=f'MHCA_layers_{i}')(x, train=train)
    return x


class ResBlock(nn.Module):
  """The local path: 1x1 Conv-BN-Hswish, 3x3 dw-BN-Hswish, 1x1 Conv-BN, + identity."""
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    bn = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
              dtype=self.dtype)
    y = ConvBN(c, 1, use_act=True, name='conv1', **bn)(x, train=train)
    y = _depthwise_conv(c, 3, 1, False, self.dtype, 'dwconv')(y)
    y = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                          name='norm')(y)
    y = ConvBN(c, 1, name='conv2', **bn)(hard_swish(y), train=train)
    return x + y


class MHCAStage(nn.Module):
  """Multi-path transformer + local path + global-to-local interaction (`MHCA_stage`)."""
  out_features: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  drop_path: Sequence[float]
  crpe_window: Sequence[tuple[int, int]] = CRPE_WINDOW
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Array], *, train: bool) -> Array:
    """inputs: num_path maps [B, H, W, C] -> [B, H, W, out_features]."""
    bn = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
              dtype=self.dtype)
    outputs = [ResBlock(name='InvRes', **bn)(inputs[0], train=train)]
    for p, x in enumerate(inputs):
      outputs.append(MHCAEncoder(self.num_layers, self.num_heads, self.mlp_ratio,
                                 tuple(self.drop_path), tuple(self.crpe_window), self.dtype,
                                 name=f'mhca_blks_{p}')(x, train=train))
    x = jnp.concatenate(outputs, axis=-1)  # [B, H, W, (num_path + 1) * C]
    return ConvBN(self.out_features, 1, use_act=True, name='aggregate', **bn)(x, train=train)


def drop_path_rates(rate: float, num_layers: Sequence[int]) -> list[list[float]]:
  """Drop-path probability per block: linear from 0 to `rate` over all blocks, per stage.

  Every path of a stage uses the same list (official `dpr_generator`).
  """
  flat = np.linspace(0.0, rate, sum(num_layers))
  out, start = [], 0
  for n in num_layers:
    out.append([float(r) for r in flat[start:start + n]])
    start += n
  return out


class MPViT(nn.Module):
  """MPViT feature extractor (or, with `num_classes`, the ImageNet classifier).

  Attributes:
    variant: 'T' | 'XS' | 'S' | 'B', a key of MPVIT_VARIANTS.
    num_path, num_layers, embed_dims, mlp_ratios, num_heads: per-stage overrides of the
      variant's values (None keeps them); tests use them for tiny widths.
    crpe_window: ((kernel, heads), ...) splitting each stage's heads for CRPE.
    stochastic_depth_rate: the largest drop-path rate (last block), linear from 0.
    norm_momentum, norm_epsilon: BatchNorm settings (defaults: PyTorch's 0.1 / 1e-5, those
      the official checkpoints were trained with).
    num_classes: 0 for the detection backbone; > 0 adds the official classification head
      (global average pool -> `cls_head/cls`) and returns logits instead of levels.
    dtype: activation dtype.
  """
  variant: str = 'S'
  num_path: Sequence[int] | None = None
  num_layers: Sequence[int] | None = None
  embed_dims: Sequence[int] | None = None
  mlp_ratios: Sequence[int] | None = None
  num_heads: Sequence[int] | None = None
  crpe_window: Sequence[Sequence[int]] = CRPE_WINDOW
  stochastic_depth_rate: float = 0.0
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  num_classes: int = 0
  dtype: Any = jnp.float32

  def spec(self) -> dict:
    """The variant's table row with this module's overrides applied."""
    if self.variant not in MPVIT_VARIANTS:
      raise ValueError(f'MPViT variant must be one of {sorted(MPVIT_VARIANTS)}, '
                       f'got {self.variant!r}.')
    spec = dict(MPVIT_VARIANTS[self.variant])
    for key in spec:
      if getattr(self, key) is not None:
        spec[key] = tuple(getattr(self, key))
      if len(spec[key]) != 4:
        raise ValueError(f'MPViT {key} needs 4 stages, got {spec[key]}.')
    return spec

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array] | Array:
    """Computes the feature pyramid.

    Args:
      images: [B, H, W, 3] normalized images, any H and W.
      train: batch statistics and stochastic depth when True.

    Returns:
      {l: [B, ceil(H/2**l), ceil(W/2**l), C_l]} for l = 2..5 with
      C_l = embed_dims[min(l - 1, 3)]; or [B, num_classes] logits when num_classes > 0.
    """
    spec = self.spec()
    dims = spec['embed_dims']
    window = tuple(tuple(w) for w in self.crpe_window)
    bn = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
              dtype=self.dtype)
    rates = drop_path_rates(self.stochastic_depth_rate, spec['num_layers'])

    x = ConvBN(dims[0] // 2, 3, 2, use_act=True, name='stem_0', **bn)(images, train=train)
    x = ConvBN(dims[0], 3, 2, use_act=True, name='stem_1', **bn)(x, train=train)
    features = {}
    for s in range(4):
      paths = PatchEmbedStage(dims[s], spec['num_path'][s], downsample=s > 0,
                              name=f'patch_embed_stages_{s}', **bn)(x, train=train)
      # Each stage's interaction conv already maps to the next stage's width.
      x = MHCAStage(dims[min(s + 1, 3)], spec['num_layers'][s], spec['num_heads'][s],
                    spec['mlp_ratios'][s], tuple(rates[s]), window,
                    name=f'mhca_stages_{s}', **bn)(paths, train=train)
      features[s + 2] = x
    if self.num_classes > 0:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      return ClsHead(self.num_classes, name='cls_head')(pooled)
    return features


class ClsHead(nn.Module):
  """The ImageNet classifier: one linear layer `cls` on pooled features."""
  num_classes: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, C] pooled features -> [B, num_classes] float32 logits."""
    return nn.Dense(self.num_classes, kernel_init=_dense_init, name='cls')(x)


def build(cfg, dtype, name=None) -> MPViT:
  """MPViT from `config.model.backbone` (keys: the attributes of `MPViT`)."""
  return layers.build_module(MPViT, cfg, dtype, name=name)


# ----------------------------------------------------------------------------- checkpoints
#
# Official key  ->  jaxdet path, e.g.
#   stem.0.conv.weight                      params/stem_0/conv/kernel      OIHW -> HWIO
#   stem.0.bn.running_var                   batch_stats/stem_0/bn/var
#   mhca_stages.2.mhca_blks.1.MHCA_layers.0.factoratt_crpe.qkv.weight
#                                           params/mhca_stages_2/mhca_blks_1/MHCA_layers_0/
#                                             factoratt_crpe/qkv/kernel   [out, in] -> [in, out]
#   ...norm1.weight                         .../norm1/scale
# PyTorch's state_dict lists a shared module under every name it is registered with, so
# each encoder's `cpe` and `crpe` also appear as MHCA_layers.{i}.cpe, MHCA_layers.{i}.crpe
# and MHCA_layers.{i}.factoratt_crpe.crpe; these aliases must equal the encoder's copy.

_INDEXED = re.compile(r'^(.*)_(\d+)$')


def _torch_to_path(key: str, ndim: int) -> tuple[str, ...]:
  """'a.b.3.c.weight' -> ('params', 'a', 'b_3', 'c', 'kernel').

  1-D weights are norm scales; running_mean / running_var go to 'batch_stats'; any other
  tensor name gives an 'unknown' path that no template holds.
  """
  parts = key.split('.')
  module, leaf = parts[:-1], parts[-1]
  names = []
  for part in module:
    if part.isdigit() and names:
      names[-1] = f'{names[-1]}_{part}'
    else:
      names.append(part)
  if leaf == 'weight':
    return ('params', *names, 'kernel' if ndim > 1 else 'scale')
  if leaf == 'bias':
    return ('params', *names, 'bias')
  if leaf == 'running_mean':
    return ('batch_stats', *names, 'mean')
  if leaf == 'running_var':
    return ('batch_stats', *names, 'var')
  return ('unknown', *names, leaf)


def _path_to_torch(path: Sequence[str]) -> str:
  """Inverse of `_torch_to_path`: ('params', 'stem_0', 'conv', 'kernel') -> 'stem.0.conv.weight'."""
  collection, *names, leaf = path
  parts = []
  for name in names:
    m = _INDEXED.match(name)
    parts.extend([m.group(1), m.group(2)] if m else [name])
  if collection == 'batch_stats':
    parts.append({'mean': 'running_mean', 'var': 'running_var'}[leaf])
  else:
    parts.append({'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf])
  return '.'.join(parts)


def _to_jax_layout(value: np.ndarray) -> np.ndarray:
  """torch conv [O, I/g, kh, kw] -> [kh, kw, I/g, O]; linear [O, I] -> [I, O]; 1-D as is."""
  if value.ndim == 4:
    return convert.conv_to_jax(value)
  return convert.linear_to_jax(value) if value.ndim == 2 else value


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  """The inverse of `_to_jax_layout`."""
  if value.ndim == 4:
    return convert.conv_to_torch(value)
  return convert.linear_to_jax(value) if value.ndim == 2 else value


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _aliases(torch_keys) -> dict[str, str]:
  """Alias torch key -> canonical torch key, for every encoder's shared cpe and crpe.

  Args:
    torch_keys: the canonical keys of a model (no aliases), e.g. from `_path_to_torch`.
  """
  keys = list(torch_keys)
  layer_ids = {}  # 'mhca_stages.s.mhca_blks.p.' -> block indices
  for key in keys:
    m = re.match(r'^(.*mhca_blks\.\d+\.)MHCA_layers\.(\d+)\.', key)
    if m:
      layer_ids.setdefault(m.group(1), set()).add(int(m.group(2)))
  out = {}
  for key in keys:
    m = re.match(r'^(.*mhca_blks\.\d+\.)(cpe|crpe)\.(.*)$', key)
    if not m:
      continue
    encoder, module, rest = m.groups()
    owners = ['', 'factoratt_crpe.'] if module == 'crpe' else ['']
    for i in sorted(layer_ids.get(encoder, ())):
      for owner in owners:
        out[f'{encoder}MHCA_layers.{i}.{owner}{module}.{rest}'] = key
  return out


def from_torch(state_dict: dict[str, np.ndarray], params_template, *, prefix: str = '',
               drop_classifier: bool = True) -> dict:
  """Official MPViT PyTorch weights -> jaxdet variables.

  Args:
    state_dict: torch key -> array (numpy or anything `np.asarray` takes), as read from an
      official checkpoint (its 'model' entry) with torch.load(weights_only=True).
    params_template: the jaxdet backbone's variables {'params', 'batch_stats'} (arrays or
      ShapeDtypeStructs, e.g. from jax.eval_shape of `MPViT.init`), or only its params;
      fixes the expected keys and shapes.
    prefix: only keys starting with it are read, with it removed (e.g.
      'backbone.bottom_up.backbone.' for the detectron2 detection checkpoints); others are
      ignored.
    drop_classifier: when the template has no classifier, ignore the checkpoint's
      'cls_head.*' (an ImageNet checkpoint initializing a detection backbone).

  Returns:
    The template's structure ({'params', 'batch_stats'}, or params for a params template)
    holding float32 numpy arrays.

  Raises:
    convert.ConversionError (a ValueError): listing every unmatched checkpoint key, every
      mis-shaped one (with both shapes), every template entry the checkpoint lacks, and
      every shared cpe/crpe alias whose value differs from the encoder's copy.
  """
  is_variables = 'params' in params_template
  variables = params_template if is_variables else {'params': params_template}
  expected = _flatten({k: variables[k] for k in ('params', 'batch_stats') if k in variables})
  aliases = _aliases(_path_to_torch(p) for p in expected)
  has_classifier = any(p[1] == 'cls_head' for p in expected)

  values, unmatched, misshaped, conflicting, alias_values = {}, [], [], [], {}
  for key in sorted(state_dict):
    if not key.startswith(prefix):
      continue
    name = key[len(prefix):]
    if name.endswith('num_batches_tracked'):
      continue  # BatchNorm's step counter; flax's running averages do not use one.
    if drop_classifier and not has_classifier and name.startswith('cls_head.'):
      continue
    value = np.asarray(state_dict[key], dtype=np.float32)
    if name in aliases:
      alias_values[name] = value
      continue
    path = _torch_to_path(name, value.ndim)
    if path not in expected:
      unmatched.append(f'{key} {tuple(value.shape)}')
      continue
    value = _to_jax_layout(value)
    want = tuple(expected[path].shape)
    if value.shape != want:
      misshaped.append(f'{key}: checkpoint {tuple(value.shape)} (jaxdet layout), '
                       f'model {want}')
      continue
    values[path] = value
  for name, value in alias_values.items():
    canonical = _torch_to_path(aliases[name], value.ndim)
    if canonical in values and not np.allclose(_to_jax_layout(value), values[canonical]):
      conflicting.append(f'{prefix}{name} differs from {prefix}{aliases[name]}')
  missing = [f"{'/'.join(p)} {tuple(expected[p].shape)} (torch {prefix}{_path_to_torch(p)})"
             for p in expected if p not in values]
  if unmatched or misshaped or missing or conflicting:
    lines = ['The checkpoint does not fit the MPViT model:']
    for title, items in (('unmatched checkpoint keys', unmatched),
                         ('mis-shaped keys', misshaped),
                         ('model variables missing from the checkpoint', missing),
                         ('shared cpe/crpe copies that disagree', conflicting)):
      if items:
        lines.append(f'  {len(items)} {title}:')
        lines.extend(f'    {item}' for item in items)
    if not is_variables and any('running_' in u for u in unmatched):
      lines.append("  (pass the variables {'params', 'batch_stats'} as the template to "
                   'convert BatchNorm statistics)')
    raise convert.ConversionError('\n'.join(lines))
  out = _unflatten(values)
  return out if is_variables else out['params']


def to_torch(params) -> dict[str, np.ndarray]:
  """jaxdet variables (or params) -> the official PyTorch state_dict, aliases included.

  Args:
    params: {'params', 'batch_stats'} of an `MPViT`, or only its params.

  Returns:
    torch key -> float32 numpy array in torch layout, plus 'num_batches_tracked' (int64 0)
    for every BatchNorm when batch statistics are given; loads into the official module
    with strict=True.
  """
  variables = params if 'params' in params else {'params': params}
  flat = _flatten({k: variables[k] for k in ('params', 'batch_stats') if k in variables})
  out = {}
  for path, value in flat.items():
    out[_path_to_torch(path)] = _to_torch_layout(np.asarray(value, dtype=np.float32))
    if path[0] == 'batch_stats' and path[-1] == 'mean':
      out[_path_to_torch(path).replace('running_mean', 'num_batches_tracked')] = \
          np.zeros((), np.int64)
  for alias, key in _aliases(list(out)).items():
    out[alias] = out[key]
  return out
