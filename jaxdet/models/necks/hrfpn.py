"""HRNetV2p's feature pyramid (Sun et al., "High-Resolution Representations for Labeling
Pixels and Regions", 2019, Fig. 4c; mmdet `necks/hrfpn.py`, HRNet-Object-Detection).

backbone {2: C, 3: 2C, 4: 4C, 5: 8C} (HRNet's branches) -> {l: P_l} for l = min_level..max_level:

  concat     every branch bilinearly upsampled by 2**(l-2) to level 2's resolution
             (PyTorch `interpolate(scale_factor, mode='bilinear')`, align_corners=False),
             concatenated: [B, H/4, W/4, 15C]
  reduction  1x1 conv to `num_filters` (with bias, no norm or activation, as mmdet's default)
  pool       P'_l = average pooling of the reduction by 2**(l-2), kernel = stride
  fpn{l}     3x3 conv on each P'_l

Unlike FPN, every level (strides 4 to 128 for RetinaNet's P7) comes from the one
high-resolution concatenation, so no level needs a stride-2 conv of its own.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models import layers

Array = jax.Array


def upsample_bilinear(x: Array, scale: int) -> Array:
  """Bilinear upsampling by an integer factor with half-pixel centres.

  Args:
    x: [B, H, W, C].
    scale: integer factor.

  Returns:
    [B, H*scale, W*scale, C]: output pixel i samples input coordinate (i + 0.5)/scale - 0.5,
    clamped to the border (PyTorch `interpolate(mode='bilinear', align_corners=False)`).
  """
  if scale == 1:
    return x
  b, h, w, c = x.shape
  # jax.image.resize drops out-of-range taps and renormalises the rest, which for upsampling
  # is the same as PyTorch's clamping of the source coordinate at the border.
  return jax.image.resize(x, (b, h * scale, w * scale, c), method='bilinear')


def avg_pool(x: Array, k: int) -> Array:
  """Average pooling with kernel = stride = k.

  Args:
    x: [B, H, W, C].
    k: window and stride.

  Returns:
    [B, ceil(H/k), ceil(W/k), C]; a window that runs past the border averages only its
    pixels inside (sizes divisible by k, the padded canvases, are PyTorch `avg_pool2d`).
  """
  if k == 1:
    return x
  h, w = x.shape[1:3]
  return nn.avg_pool(x, (k, k), strides=(k, k), padding=((0, -h % k), (0, -w % k)),
                     count_include_pad=False)


class HRFPN(nn.Module):
  """The HRNetV2p neck.

  Attributes:
    min_level, max_level: output levels (inclusive); level l has stride 2**l.
    num_filters: channels of the reduction and of every output level.
    dtype: activation dtype.
  """
  min_level: int = 2
  max_level: int = 6
  num_filters: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict[int, Array], *, train: bool) -> dict[int, Array]:
    """Builds the pyramid.

    Args:
      features: {l: [B, H_l, W_l, C_l]} for l = 2..L, H_l = ceil(H/2**l) (HRNet's branches;
        any number of levels from 2 up).
      train: unused (no BatchNorm); kept for the neck interface.

    Returns:
      {l: [B, ceil(H_2 / 2**(l-2)), ceil(W_2 / 2**(l-2)), num_filters]} for l in
      min_level..max_level.
    """
    del train
    levels = sorted(features)
    if not levels or levels[0] != 2 or levels != list(range(2, levels[-1] + 1)):
      raise ValueError(f'HRFPN needs backbone levels 2, 3, ... (HRNet branches); got {levels}.')
    if self.min_level < 2:
      raise ValueError(f'HRFPN min_level must be >= 2 (its finest level), got {self.min_level}.')
    h, w = features[2].shape[1:3]
    # Crop: ceil-mode strides make a coarse map cover a few pixels more than level 2.
    ups = [upsample_bilinear(features[l], 2**(l - 2))[:, :h, :w] for l in levels]
    x = jnp.concatenate(ups, axis=-1)  # [B, H_2, W_2, sum C_l]
    conv = lambda k, name: nn.Conv(
        self.num_filters, (k, k), padding=layers.conv_padding(k, 'FIXED'), use_bias=True,
        kernel_init=layers.conv_kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
        name=name)
    x = conv(1, 'reduction')(x)
    return {l: conv(3, f'fpn{l}')(avg_pool(x, 2**(l - 2)))
            for l in range(self.min_level, self.max_level + 1)}


def build(cfg, dtype, name=None) -> HRFPN:
  """HRFPN from `config.model.neck` (keys: the attributes of `HRFPN`)."""
  return layers.build_module(HRFPN, cfg, dtype, name=name)
