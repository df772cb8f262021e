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

The `BottleneckBlock` and `ResidualBlock` defined here are also the blocks of
SpineNet (jaxdet/models/backbones/spinenet.py).
"""

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
  """
  filters: int
  strides: int = 1
  use_projection: bool = False
  stride_in_1x1: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H/s, W/s, 4 * filters]."""
    conv = lambda *a, **k: layers.ConvNormAct(
        *a, **k, padding='FIXED', norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    shortcut = x
    if self.use_projection:
      shortcut = conv(4 * self.filters, 1, self.strides, activation=None,
                      name='shortcut')(x, train=train)
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = conv(self.filters, 1, s1, activation=self.activation, name='conv1')(x, train=train)
    y = conv(self.filters, 3, s3, activation=self.activation, name='conv2')(y, train=train)
    y = conv(4 * self.filters, 1, 1, activation=None, name='conv3')(y, train=train)
    # Stochastic depth drops the residual branch before the addition (TPU
    # nn_blocks.bottleneck_block, TF Model Garden BottleneckBlock).
    y = layers.StochasticDepth(self.stochastic_depth_rate)(y, train=train)
    return layers.activation(self.activation)(y + shortcut)


class ResidualBlock(nn.Module):
  """The basic block: 3x3 (filters) -> 3x3 (filters), plus the shortcut.

  Attributes are those of `BottleneckBlock`; the block outputs `filters` channels.
  """
  filters: int
  strides: int = 1
  use_projection: bool = False
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H/s, W/s, filters]."""
    conv = lambda *a, **k: layers.ConvNormAct(
        *a, **k, padding='FIXED', norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    shortcut = x
    if self.use_projection:
      shortcut = conv(self.filters, 1, self.strides, activation=None,
                      name='shortcut')(x, train=train)
    y = conv(self.filters, 3, self.strides, activation=self.activation,
             name='conv1')(x, train=train)
    y = conv(self.filters, 3, 1, activation=None, name='conv2')(y, train=train)
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
    dtype: activation dtype.
  """
  depth: int = 50
  width: int = 64
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  stride_in_1x1: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array]:
    """Computes the feature pyramid.

    Args:
      images: [B, H, W, 3] normalized images.
      train: batch statistics and stochastic depth when True.

    Returns:
      {l: [B, ceil(H/2**l), ceil(W/2**l), C_l]} for l = 2..5, with
      C_l = e * width * 2**(l-2), e = 4 for bottlenecks and 1 for basic blocks.
    """
    if self.depth not in RESNET_SPECS:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}.')
    block_fn, repeats = RESNET_SPECS[self.depth]
    expansion = BLOCK_EXPANSION[block_fn]
    norm = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
                dtype=self.dtype)

    x = layers.ConvNormAct(self.width, 7, 2, padding='FIXED', activation=self.activation,
                           name='stem', **norm)(images, train=train)
    # torchvision MaxPool2d(3, 2, padding=1): symmetric -inf padding.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    features = {}
    for stage, num_blocks in enumerate(repeats):
      level = stage + 2
      filters = self.width * 2**stage
      rate = self.stochastic_depth_rate * level / 5
      for i in range(num_blocks):
        strides = 2 if (i == 0 and level > 2) else 1
        in_channels = x.shape[-1]
        use_projection = i == 0 and (strides != 1 or in_channels != expansion * filters)
        kwargs = dict(filters=filters, strides=strides, use_projection=use_projection,
                      activation=self.activation, stochastic_depth_rate=rate,
                      name=f'stage{level}_block{i}', **norm)
        if block_fn == 'bottleneck':
          x = BottleneckBlock(stride_in_1x1=self.stride_in_1x1, **kwargs)(x, train=train)
        else:
          x = ResidualBlock(**kwargs)(x, train=train)
      features[level] = x
    return features


def build(cfg, dtype, name=None) -> ResNet:
  """ResNet from `config.model.backbone` (keys: the attributes of `ResNet`)."""
  return layers.build_module(ResNet, cfg, dtype, name=name)
