"""ResNet v1 backbone (He, Zhang, Ren, Sun 2015, "Deep Residual Learning").

images [B, H, W, 3] -> {2: C2, 3: C3, 4: C4, 5: C5}, level l at stride 2**l.

The layout follows torchvision's ResNet so that its ImageNet checkpoints map
one-to-one onto the parameter tree:

  stem                      conv1 + bn1 (7x7/2, 64 channels for width 64)
  stage{l}_block{i}         layer{l-1}.{i}, l = 2..5
    conv1, conv2, conv3     conv{k} + bn{k} (each a ConvNormAct: conv/kernel, bn/scale, bn/bias)
    shortcut                downsample.0 + downsample.1

With `stride_in_1x1=False` a bottleneck strides on its 3x3 conv, as torchvision
("ResNet v1.5"); True strides on the first 1x1 conv as in the paper. All convs
pad symmetrically (torchvision `padding=k//2`, TPU `conv2d_fixed_padding`).

Two options serve detectors that start from an ImageNet checkpoint (DETR,
Carion et al. 2020, section 4 and its reference code):

* `frozen_bn`: BatchNorm normalises with its stored statistics in training as
  well (the statistics are never updated) and its affine scale / bias receive
  no gradient. The parameter tree is unchanged, so checkpoints load as usual.
* `last_stage_dilation=2`: the last stage keeps stride 16 and dilates its 3x3
  convs instead (DETR's "DC5"), as torchvision's
  `replace_stride_with_dilation=[False, False, True]`: the stage's first block
  runs its 3x3 conv undilated at stride 1 and the following blocks dilate by 2.

The `BottleneckBlock` and `ResidualBlock` defined here are also the blocks of
SpineNet (jaxdet/models/backbones/spinenet.py).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models import layers

Array = jax.Array

# depth -> (block type, blocks per stage for levels 2..5); paper Table 1.
RESNET_SPECS = {
    18: ('residual', (2, 2, 2, 2)),
    34: ('residual', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}

# Output channels of a block relative to its width.
BLOCK_EXPANSION = {'bottleneck': 4, 'residual': 1}


def _freeze_affine(variables):
  """stop_gradient on every BatchNorm scale / bias read by the wrapped module."""
  def one(path, x):
    keys = [getattr(k, 'key', None) for k in path]
    return jax.lax.stop_gradient(x) if 'bn' in keys else x
  return jax.tree_util.tree_map_with_path(one, variables)


def frozen_bn_module(module_cls, frozen: bool):
  """`module_cls`, or with `frozen` a version whose BatchNorm affine gets no gradient.

  nn.map_variables keeps the wrapped module's names, so the parameter tree is the
  same either way; the statistics are frozen separately by normalising with the
  running averages (`train=False` for the norms).
  """
  if not frozen:
    return module_cls
  return nn.map_variables(module_cls, 'params', trans_in_fn=_freeze_affine,
                          init=False, mutable=True)


class DilatedConvNormAct(layers.ConvNormAct):
  """`layers.ConvNormAct` with a dilated kernel ('FIXED' padding grows with it).

  Attributes:
    dilation: kernel dilation; padding is dilation * (kernel_size - 1) // 2 on
      each side, as torchvision's `padding=dilation` for 3x3 convs.
  """
  dilation: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C_in] -> [B, ceil(H/s), ceil(W/s), features]."""
    use_bias = (not self.use_norm) if self.use_bias is None else self.use_bias
    pad = self.dilation * (self.kernel_size - 1) // 2
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=(self.strides, self.strides), padding=((pad, pad), (pad, pad)),
        kernel_dilation=(self.dilation, self.dilation),
        use_bias=use_bias, kernel_init=layers.conv_kernel_init,
        dtype=self.dtype, param_dtype=jnp.float32, name='conv')(x)
    if self.use_norm:
      x = layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                            name='bn')(x)
    if self.activation is not None:
      x = layers.activation(self.activation)(x)
    return x


def _conv3x3(dilation):
  """The 3x3 conv-norm-act of a block: the shared one unless it is dilated."""
  return layers.ConvNormAct if dilation == 1 else functools.partial(
      DilatedConvNormAct, dilation=dilation)


class BottleneckBlock(nn.Module):
  """1x1 (filters) -> 3x3 (filters) -> 1x1 (4*filters), plus the shortcut.

  Attributes:
    filters: width of the inner convs; the block outputs 4 * filters channels.
    strides: spatial stride of the block.
    use_projection: 1x1 conv + BN on the shortcut (needed when the channels or
      the resolution change).
    stride_in_1x1: put the stride on the first 1x1 conv (paper) instead of the
      3x3 (torchvision).
    stochastic_depth_rate: drop probability of the residual branch.
    dilation: dilation of the 3x3 conv (DC5).
    frozen_bn: normalise with the stored statistics in training too (see
      the module docstring).
  """
  filters: int
  strides: int = 1
  use_projection: bool = False
  stride_in_1x1: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  dilation: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H/s, W/s, 4 * filters]."""
    norm_train = train and not self.frozen_bn
    conv = lambda *a, cls=layers.ConvNormAct, **k: cls(
        *a, **k, padding='FIXED', norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    shortcut = x
    if self.use_projection:
      shortcut = conv(4 * self.filters, 1, self.strides, activation=None,
                      name='shortcut')(x, train=norm_train)
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = conv(self.filters, 1, s1, activation=self.activation, name='conv1')(
        x, train=norm_train)
    y = conv(self.filters, 3, s3, activation=self.activation, cls=_conv3x3(self.dilation),
             name='conv2')(y, train=norm_train)
    y = conv(4 * self.filters, 1, 1, activation=None, name='conv3')(y, train=norm_train)
    # Stochastic depth drops the residual branch before the addition (TPU
    # nn_blocks.bottleneck_block, TF Model Garden BottleneckBlock).
    y = layers.StochasticDepth(self.stochastic_depth_rate)(y, train=train)
    return layers.activation(self.activation)(y + shortcut)


class ResidualBlock(nn.Module):
  """The basic block: 3x3 (filters) -> 3x3 (filters), plus the shortcut.

  Attributes are those of `BottleneckBlock`; the block outputs `filters` channels.
  `dilation` applies to both 3x3 convs (torchvision's BasicBlock rejects
  dilation; dilating both keeps the receptive field growing as at stride 32).
  """
  filters: int
  strides: int = 1
  use_projection: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  dilation: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H/s, W/s, filters]."""
    norm_train = train and not self.frozen_bn
    conv = lambda *a, **k: _conv3x3(self.dilation)(
        *a, **k, padding='FIXED', norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    shortcut = x
    if self.use_projection:
      shortcut = layers.ConvNormAct(
          self.filters, 1, self.strides, padding='FIXED', activation=None,
          norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
          dtype=self.dtype, name='shortcut')(x, train=norm_train)
    y = conv(self.filters, 3, self.strides, activation=self.activation,
             name='conv1')(x, train=norm_train)
    y = conv(self.filters, 3, 1, activation=None, name='conv2')(y, train=norm_train)
    y = layers.StochasticDepth(self.stochastic_depth_rate)(y, train=train)
    return layers.activation(self.activation)(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1 feature extractor.

  Attributes:
    depth: 18 | 34 (basic blocks) | 50 | 101 | 152 (bottlenecks).
    width: base width; the stem has `width` channels and stage l blocks have
      width * 2**(l-2) inner channels (64 in the paper; tests use tiny widths).
    activation: see `layers.activation`.
    norm_momentum, norm_epsilon: BatchNorm settings.
    stochastic_depth_rate: stage l (2..5) drops residual branches with
      probability rate * l / 5, as TF Model Garden's ResNet.
    stride_in_1x1: see the module docstring.
    frozen_bn: BatchNorm statistics and affine parameters are not trained
      (module docstring).
    last_stage_dilation: 1, or 2 for DC5: level 5 then has stride 16.
    dropblock_keep_prob, dropblock_size: DropBlock ('dropblock' rng) on the output of
      every block of levels 4 and 5, the DropBlock paper's placement in ResNet-50
      (groups 3 and 4, residual branch and shortcut together); keep_prob 1.0 disables it;
      dropblock_warmup_steps > 0 lowers keep_prob linearly to it over that many steps.
    dtype: activation dtype.
  """
  depth: int = 50
  width: int = 64
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  stride_in_1x1: bool = False
  frozen_bn: bool = False
  last_stage_dilation: int = 1
  dropblock_keep_prob: float = 1.0
  dropblock_size: int = 7
  dropblock_warmup_steps: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array]:
    """Computes the feature pyramid.

    Args:
      images: [B, H, W, 3] normalized images.
      train: batch statistics and stochastic depth when True.

    Returns:
      {l: [B, ceil(H/2**l), ceil(W/2**l), C_l]} for l = 2..5, with
      C_l = e * width * 2**(l-2), e = 4 for bottlenecks and 1 for basic blocks;
      with last_stage_dilation 2, level 5 has level 4's spatial size.
    """
    if self.depth not in RESNET_SPECS:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}.')
    if self.last_stage_dilation not in (1, 2):
      raise ValueError(f'last_stage_dilation must be 1 or 2 (DC5), got '
                       f'{self.last_stage_dilation}.')
    block_fn, repeats = RESNET_SPECS[self.depth]
    expansion = BLOCK_EXPANSION[block_fn]
    norm = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
                dtype=self.dtype)
    frozen = self.frozen_bn
    stem_cls = frozen_bn_module(layers.ConvNormAct, frozen)
    block_cls = frozen_bn_module(
        BottleneckBlock if block_fn == 'bottleneck' else ResidualBlock, frozen)

    x = stem_cls(self.width, 7, 2, padding='FIXED', activation=self.activation,
                 name='stem', **norm)(images, train=train and not frozen)
    # torchvision MaxPool2d(3, 2, padding=1): symmetric -inf padding.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    features = {}
    for stage, num_blocks in enumerate(repeats):
      level = stage + 2
      filters = self.width * 2**stage
      rate = self.stochastic_depth_rate * level / 5
      dilated = level == 5 and self.last_stage_dilation > 1
      for i in range(num_blocks):
        strides = 2 if (i == 0 and level > 2 and not dilated) else 1
        in_channels = x.shape[-1]
        use_projection = i == 0 and (strides != 1 or in_channels != expansion * filters)
        kwargs = dict(filters=filters, strides=strides, use_projection=use_projection,
                      activation=self.activation, stochastic_depth_rate=rate,
                      frozen_bn=frozen, name=f'stage{level}_block{i}', **norm)
        if dilated and i > 0:
          # torchvision: the block that would have strided keeps dilation 1.
          kwargs['dilation'] = self.last_stage_dilation
        if block_fn == 'bottleneck':
          kwargs['stride_in_1x1'] = self.stride_in_1x1
        x = block_cls(**kwargs)(x, train=train)
        if level >= 4:
          x = layers.DropBlock(self.dropblock_keep_prob, self.dropblock_size,
                               self.dropblock_warmup_steps, name=f'stage{level}_dropblock{i}')(x, train=train)
      features[level] = x
    return features


def build(cfg, dtype, name=None) -> ResNet:
  """ResNet from `config.model.backbone` (keys: the attributes of `ResNet`)."""
  return layers.build_module(ResNet, cfg, dtype, name=name)
