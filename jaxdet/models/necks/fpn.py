"""Feature Pyramid Network (Lin et al. 2017) as used by RetinaNet (Lin et al. 2017b).

backbone {l: C_l} -> {l: P_l} for l = min_level..max_level, each with
`num_filters` channels, following TPU `modeling/architecture/fpn.py`:

  lateral{l}   1x1 conv on C_l, for l in [min_level, L] where
               L = min(max backbone level, max_level)
  top-down     P'_L = lateral_L;  P'_l = upsample2x(P'_{l+1}) + lateral_l
  output{l}    3x3 conv on P'_l                          (l <= L)
  extra{l}     3x3/2 conv on P_{l-1}, with the activation  (l > L; RetinaNet's
               first for l > L + 1                      P6 and P7, taken from
                                                         P5 rather than C5)
  bn{l}        BatchNorm without activation on every output level
               (`use_norm`; the TPU FPN's `p{l}-bn`)

The extra levels read the pre-BN outputs of the level below, and all convs keep
their bias, as the TPU FPN does.

`extra_levels='maxpool'` is the FPN of Faster / Mask R-CNN (Lin et al. 2017,
sec. 4.1; detectron2 `LastLevelMaxPool`): every level above L is the level
below subsampled by a 1x1 max-pool of stride 2, with no parameters. With
min_level 2, max_level 6 and `use_norm=False` on ResNet C2-C5 this is
detectron2's R50-FPN (P2-P5 from convs, P6 from P5).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models import layers

Array = jax.Array


class FPN(nn.Module):
  """RetinaNet's feature pyramid.

  Attributes:
    min_level, max_level: output levels (inclusive).
    num_filters: channels of every output level.
    use_norm: BatchNorm (no activation) after each output conv, as the TPU
      FPN; False gives the original FPN (and torchvision's) layout.
    activation: applied before the conv of every extra level above the first.
    extra_levels: how levels above the backbone's are made: 'conv' (3x3/2
      convs, RetinaNet) or 'maxpool' (1x1/2 max-pool, Faster / Mask R-CNN).
    norm_momentum, norm_epsilon: BatchNorm settings.
    dtype: activation dtype.
  """
  min_level: int = 3
  max_level: int = 7
  num_filters: int = 256
  use_norm: bool = True
  activation: str = 'relu'
  extra_levels: str = 'conv'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict[int, Array], *, train: bool) -> dict[int, Array]:
    """Builds the pyramid.

    Args:
      features: {l: [B, H_l, W_l, C_l]} backbone levels with H_l = ceil(H/2**l);
        must contain every level in [min_level, min(max(features), max_level)].
      train: BatchNorm uses batch statistics when True.

    Returns:
      {l: [B, H_l, W_l, num_filters]} for l = min_level..max_level.
    """
    top = min(max(features), self.max_level)
    missing = [l for l in range(self.min_level, top + 1) if l not in features]
    if missing or top < self.min_level:
      raise ValueError(
          f'FPN(min_level={self.min_level}) needs backbone levels {self.min_level}..{top}; '
          f'the backbone gives {sorted(features)}.')
    conv = lambda k, s, name: nn.Conv(
        self.num_filters, (k, k), strides=(s, s), padding=layers.conv_padding(k, 'FIXED'),
        use_bias=True, kernel_init=layers.conv_kernel_init, dtype=self.dtype,
        param_dtype=jnp.float32, name=name)

    lateral = {l: conv(1, 1, f'lateral{l}')(features[l]) for l in range(self.min_level, top + 1)}

    # Top-down pathway: nearest 2x upsampling, cropped when a backbone level
    # had an odd size (ceil-mode strides make the coarser map one pixel larger).
    merged = {top: lateral[top]}
    for l in range(top - 1, self.min_level - 1, -1):
      h, w = lateral[l].shape[1:3]
      merged[l] = layers.upsample_nearest(merged[l + 1], 2)[:, :h, :w] + lateral[l]

    if self.extra_levels not in ('conv', 'maxpool'):
      raise ValueError(f"FPN extra_levels={self.extra_levels!r}; use 'conv' or 'maxpool'.")
    out = {l: conv(3, 1, f'output{l}')(merged[l]) for l in range(self.min_level, top + 1)}
    for l in range(top + 1, self.max_level + 1):
      x = out[l - 1]
      if self.extra_levels == 'maxpool':
        # detectron2 LastLevelMaxPool: max_pool2d(kernel 1, stride 2) keeps every
        # other cell, giving ceil(H / 2) x ceil(W / 2).
        out[l] = nn.max_pool(x, (1, 1), strides=(2, 2), padding='VALID')
        continue
      if l > top + 1:
        x = layers.activation(self.activation)(x)
      out[l] = conv(3, 2, f'extra{l}')(x)

    if self.use_norm:
      out = {l: layers.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype,
                                  name=f'bn{l}')(x)
             for l, x in out.items()}
    return out


def build(cfg, dtype, name=None) -> FPN:
  """FPN from `config.model.neck` (keys: the attributes of `FPN`)."""
  return layers.build_module(FPN, cfg, dtype, name=name)
