"""Building blocks shared by the backbones, necks and heads.

Conventions:
  * Feature maps are NHWC: `[B, H, W, C]`.
  * Parameters are float32; activations are computed in the module's `dtype`
    (float32 or bfloat16).
  * BatchNorm has no `axis_name`: under a data-sharded `jax.jit` the batch
    statistics already span the global batch, which is the synchronized BN of
    the SpineNet and RetinaNet recipes.
  * Randomness comes from named Flax rng streams: 'drop_path' (stochastic
    depth), 'dropblock' (DropBlock), 'dropout' (dropout). Every regularizer is
    the identity when `train=False`.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# VarianceScaling(1.0, fan_in, truncated normal): the kernel initializer of the
# SpineNet / ResNet reference implementations (TPU and TF Model Garden), i.e.
# He-normal for ReLU networks.
conv_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')

ACTIVATIONS = ('relu', 'swish', 'gelu', 'identity')


def activation(name: str) -> Callable[[Array], Array]:
  """Returns the elementwise activation called `name`.

  Args:
    name: 'relu' | 'swish' (x * sigmoid(x), the SpineNet protocol-C choice) |
      'gelu' (the exact erf form, as PyTorch's nn.GELU used by the transformer
      backbones) | 'identity'.

  Returns:
    A function mapping an array of any shape to an array of the same shape.
  """
  if name == 'relu':
    return nn.relu
  if name == 'swish':
    return nn.swish
  if name == 'gelu':
    return functools.partial(nn.gelu, approximate=False)
  if name == 'identity':
    return lambda x: x
  raise ValueError(f'Unknown activation {name!r}; choose one of {ACTIVATIONS}.')


def conv_padding(kernel_size: int, padding: str):
  """Padding argument for `nn.Conv` / `nn.max_pool` over two spatial dims.

  Args:
    kernel_size: the (square) window size.
    padding: 'FIXED' pads (k-1)//2 before and the rest after on both spatial
      dims, independent of the input size, as TPU's `conv2d_fixed_padding` and
      torchvision's `padding=k//2` (symmetric for odd k). 'SAME' lets XLA pad,
      which for a stride-2 window on an even input pads only after (TF
      Model Garden numerics). 'VALID' pads nothing.
  """
  if padding == 'FIXED':
    before = (kernel_size - 1) // 2
    after = kernel_size - 1 - before
    return ((before, after), (before, after))
  if padding in ('SAME', 'VALID'):
    return padding
  raise ValueError(f"Unknown padding {padding!r}; choose 'FIXED', 'SAME' or 'VALID'.")


def batch_norm(train: bool, momentum: float, epsilon: float, dtype: Any, name=None,
               scale_init=nn.initializers.ones) -> nn.BatchNorm:
  """BatchNorm over the global batch (no axis_name), float32 statistics."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=momentum, epsilon=epsilon,
      dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init, name=name)


class ConvNormAct(nn.Module):
  """Conv -> BatchNorm -> activation on NHWC features.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: spatial stride.
    padding: 'FIXED' (symmetric, TPU `conv2d_fixed_padding` / torchvision),
      'SAME' or 'VALID'; see `conv_padding`.
    use_norm: apply BatchNorm after the conv.
    use_bias: conv bias; by default only when there is no BatchNorm, whose
      shift makes a bias redundant.
    activation: name for `activation`, or None for none.
    norm_momentum, norm_epsilon: BatchNorm moving-average momentum and epsilon.
    dtype: activation dtype.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: str = 'FIXED'
  use_norm: bool = True
  use_bias: bool | None = None
  activation: str | None = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C_in] -> [B, ceil(H/s), ceil(W/s), features] (FIXED/SAME)."""
    use_bias = (not self.use_norm) if self.use_bias is None else self.use_bias
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=(self.strides, self.strides),
        padding=conv_padding(self.kernel_size, self.padding),
        use_bias=use_bias, kernel_init=conv_kernel_init,
        dtype=self.dtype, param_dtype=jnp.float32, name='conv')(x)
    if self.use_norm:
      x = batch_norm(train, self.norm_momentum, self.norm_epsilon, self.dtype, name='bn')(x)
    if self.activation is not None:
      x = activation(self.activation)(x)
    return x


def upsample_nearest(x: Array, scale: int) -> Array:
  """Nearest-neighbour upsampling by an integer factor.

  Args:
    x: [B, H, W, C].
    scale: integer factor.

  Returns:
    [B, H*scale, W*scale, C]; output pixel (i, j) copies input (i//scale, j//scale).
  """
  if scale == 1:
    return x
  return jnp.repeat(jnp.repeat(x, scale, axis=1), scale, axis=2)


class StochasticDepth(nn.Module):
  """Stochastic depth / drop-path (Huang et al. 2016) on a residual branch.

  Each sample's branch is zeroed with probability `rate` and the kept ones are
  scaled by 1/(1-rate), so the expectation is unchanged (TPU `drop_connect`,
  TF Model Garden `StochasticDepth`). Draws from the 'drop_path' rng stream.

  Attributes:
    rate: drop probability in [0, 1).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, ...] residual branch -> same shape; identity at eval or rate 0."""
    if not train or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'StochasticDepth rate must be in [0, 1), got {self.rate}.')
    keep_prob = 1.0 - self.rate
    # One Bernoulli draw per sample, broadcast over all other axes.
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng('drop_path'), keep_prob, shape)
    return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


class DropBlock(nn.Module):
  """DropBlock (Ghiasi, Lin, Le 2018) on NHWC features.

  Seeds are drawn with probability gamma at positions whose block lies fully
  inside the feature map; every seed zeroes a `block_size` x `block_size`
  square around it (independently per sample and channel). gamma is chosen so
  that the expected dropped fraction is 1 - keep_prob (paper eq. 1):

    gamma = (1 - keep_prob) / block_size**2 * (H*W) / ((H - bs + 1)(W - bs + 1))

  with bs = min(block_size, H, W). The kept activations are divided by the
  fraction actually kept in the batch, as TPU's `nn_ops.Dropblock`.
  Draws from the 'dropblock' rng stream.

  The DropBlock paper (Sec. 3) lowers keep_prob linearly from 1 to its target over
  training; with `warmup_steps` > 0 the layer does so itself, counting its training calls
  in a 'batch_stats' variable `step` (so the schedule is checkpointed and resumes with
  the run): keep = 1 - (1 - keep_prob) * min(step / warmup_steps, 1).

  Attributes:
    keep_prob: probability of keeping an activation; 1.0 disables DropBlock.
    block_size: side of the dropped squares.
    warmup_steps: length of the linear keep_prob schedule; 0 keeps keep_prob fixed.
  """
  keep_prob: float = 1.0
  block_size: int = 7
  warmup_steps: int = 0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, keep_prob: float | Array | None = None) -> Array:
    """Applies DropBlock.

    Args:
      x: [B, H, W, C] features.
      train: DropBlock is the identity when False.
      keep_prob: overrides the attribute; may be a traced scalar so that a
        schedule can anneal it inside a jitted step.

    Returns:
      [B, H, W, C], same dtype as x.
    """
    if keep_prob is None:
      keep_prob = self.keep_prob
      if keep_prob == 1.0:
        return x
      if self.warmup_steps > 0:
        step = self.variable('batch_stats', 'step', lambda: jnp.zeros((), jnp.float32))
        progress = jnp.minimum(step.value / float(self.warmup_steps), 1.0)
        keep_prob = 1.0 - (1.0 - keep_prob) * progress
        if train and not self.is_initializing() and self.is_mutable_collection('batch_stats'):
          step.value = step.value + 1.0
    if not train:
      return x
    _, height, width, _ = x.shape
    bs = min(self.block_size, height, width)
    keep_prob = jnp.asarray(keep_prob, jnp.float32)
    valid_h, valid_w = height - bs + 1, width - bs + 1
    gamma = (1.0 - keep_prob) / bs**2 * (height * width) / (valid_h * valid_w)

    # A block around a seed must fit inside the map (paper Alg. 1): seed row r
    # zeroes rows [r - bs//2, r + (bs-1)//2], so r needs bs//2 rows above it
    # and (bs-1)//2 below.
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    valid_rows = (rows >= bs // 2) & (rows < height - (bs - 1) // 2)
    valid_cols = (cols >= bs // 2) & (cols < width - (bs - 1) // 2)
    valid = valid_rows[:, None] & valid_cols[None, :]  # [H, W]

    u = jax.random.uniform(self.make_rng('dropblock'), x.shape, jnp.float32)
    seeds = (u < gamma) & valid[None, :, :, None]  # [B, H, W, C]
    # Spread each seed to its block: max over the bs x bs window.
    dropped = jax.lax.reduce_window(
        seeds.astype(jnp.float32), 0.0, jax.lax.max,
        window_dimensions=(1, bs, bs, 1), window_strides=(1, 1, 1, 1),
        padding=((0, 0), ((bs - 1) // 2, bs // 2), ((bs - 1) // 2, bs // 2), (0, 0)))
    mask = 1.0 - dropped
    # Renormalize by the kept fraction so the expected activation is unchanged.
    kept_fraction = jnp.maximum(jnp.mean(mask), 1e-6)
    return x * (mask / kept_fraction).astype(x.dtype)


def build_module(module_cls: type[nn.Module], cfg, dtype, name=None) -> nn.Module:
  """Instantiates a backbone or neck from its config sub-dict.

  Args:
    module_cls: a Flax module class whose attributes carry the defaults.
    cfg: `ml_collections.ConfigDict` (or mapping). Its 'name' (the module file
      name that selected this class) is ignored; every other key must be an
      attribute of `module_cls` and overrides it.
    dtype: activation dtype (a dtype or its name, e.g. 'bfloat16'); the
      experiment-wide `config.dtype`.
    name: the Flax module name (the parameter tree's key), e.g. 'backbone'.

  Returns:
    The module instance.

  Raises:
    ValueError: for a key that is not an attribute, naming the valid ones.
  """
  valid = sorted(f.name for f in dataclasses.fields(module_cls)
                 if f.name not in ('parent', 'name', 'dtype'))
  items = cfg.items() if cfg is not None else ()
  kwargs = {}
  for key, value in items:
    if key == 'name':
      continue
    if key not in valid:
      raise ValueError(
          f'Unknown {module_cls.__name__} config key {key!r}; valid keys are {valid} '
          "(plus 'name'; the activation dtype comes from config.dtype).")
    kwargs[key] = value
  return module_cls(dtype=jnp.dtype(dtype), name=name, **kwargs)
