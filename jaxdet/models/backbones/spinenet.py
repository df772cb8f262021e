"""SpineNet (Du et al. 2020, "SpineNet: Learning Scale-Permuted Backbone for
Recognition and Localization", arXiv 1912.05027).

images [B, H, W, 3] -> {l: [B, H/2**l, W/2**l, endpoints_num_filters]} for
l = min_level..max_level (3..7); H and W must be multiples of 128 (2**7, the
coarsest block level).

The network, as the TPU reference implementation
(`models/official/detection/modeling/architecture/spinenet.py`):

  stem        7x7/2 conv (64 channels, never scaled) + BN + act, 3x3/2 max-pool,
              then two L2 bottleneck groups: candidate blocks 0 and 1.
  spec k      block k + 2: every parent named by `input_offsets` is resampled
              to the block's level and input channels, the parents are summed
              (an output block also sums every same-shaped block nobody has
              used yet), the activation applied, then a group of
              `block_repeats` blocks runs at stride 1.
  endpoints   1x1 conv to `endpoints_num_filters` + BN + act on the output
              block of each level.

The specification comes from `block_specs`, or from `spec` (a name in
spinenet_search.NAMED_SPECS or a JSON file; `config.model.backbone.spec`), and
is checked by spinenet_search.validate before anything is built.

DropBlock (protocol A, paper Sec. 5.1) drops squares of every scale-permuted
block group's output, stem excluded. TPU's search-time builder
(`spinenet_lib/block_zoo.py`) applies it after every BN inside those blocks,
shortcut included; jaxdet shares its blocks with ResNet and drops the group's
output instead, which also drops both the residual branch and the shortcut of
the last block (the DropBlock paper, Sec. 4.1, found dropping the skip path
too works best) and every feature the block's consumers read. Dropping the
merged input instead would let the block's 3x3 convs fill the squares in from
their surroundings.

Resampling a parent (paper Sec. 3.2; TPU `resample_with_alpha`): 1x1 conv to
int(alpha * C) channels, where C is the parent's width (its channels, divided
by 4 for a bottleneck), + BN + act; to go coarser a 3x3/2 conv + BN + act,
then 3x3/2 SAME max-pools for any remaining factor (TF Model Garden's choice;
TPU uses one larger pool, with the same parameters); to go finer nearest
upsampling; finally a 1x1 conv to the target's input channels + BN, no
activation.

Convs pad symmetrically as TPU's `conv2d_fixed_padding`, have no bias, and use
VarianceScaling(1, fan_in, truncated normal) kernels.

Backbone parameters (tests/models/test_spinenet.py): 49S 9.09M, 49 21.83M,
96 36.26M, 143 60.25M, 190 126.59M. With the paper's RetinaNet head (91
classes) this gives 28.54M / 42.97M / 66.96M / 163.64M for 49 / 96 / 143 / 190
(paper Table 2: 28.5M / 43.0M / 66.9M / 163.6M). For 49S it gives 11.27M
against the paper's 12.0M (11.9M in the TPU model zoo), with the scaling that
both reference implementations ship (128 endpoint filters feeding a 128-filter
head); independent ports measure the same 11.15M (80 classes), and 256
endpoint filters would account for the gap (11.94M).
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models import layers
from jaxdet.models.backbones import resnet

Array = jax.Array


class BlockSpec(NamedTuple):
  """One block of the scale-permuted network.

  level: the block's resolution is 2**-level of the image.
  block_fn: 'bottleneck' (outputs 4x its width) or 'residual' (1x).
  input_offsets: indices of the parents in the running list of blocks, where
    0 and 1 are the stem groups and spec k creates block k + 2.
  is_output: the block is the endpoint of its level.
  """
  level: int
  block_fn: str
  input_offsets: tuple[int, ...]
  is_output: bool


# The searched SpineNet-49 architecture, from the paper's Fig. 4 / the TPU
# reference (15 entries; TF Model Garden appends a 16th L2 output block, which
# is unused for min_level 3). Block 11 (spec 9) has no consumer and is summed
# into the L5 output block (spec 12).
SPINENET_BLOCK_SPECS = tuple(BlockSpec(l, fn, offsets, out) for l, fn, offsets, out in (
    (2, 'bottleneck', (0, 1), False),
    (4, 'residual', (0, 1), False),
    (3, 'bottleneck', (2, 3), False),
    (4, 'bottleneck', (2, 4), False),
    (6, 'residual', (3, 5), False),
    (4, 'bottleneck', (3, 5), False),
    (5, 'residual', (6, 7), False),
    (7, 'residual', (6, 8), False),
    (5, 'bottleneck', (8, 9), False),
    (5, 'bottleneck', (8, 10), False),
    (4, 'bottleneck', (5, 10), True),
    (3, 'bottleneck', (4, 10), True),
    (5, 'bottleneck', (7, 12), True),
    (7, 'bottleneck', (5, 14), True),
    (6, 'bottleneck', (12, 14), True),
))

# Model scaling (paper Sec. 3.3, Table 2; SCALING_MAP of the TPU and TF Model
# Garden implementations). 143L came after the paper.
SCALING_MAP = {
    '49S': dict(endpoints_num_filters=128, filter_size_scale=0.65, resample_alpha=0.5,
                block_repeats=1),
    '49': dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5,
               block_repeats=1),
    '96': dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5,
               block_repeats=2),
    '143': dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=1.0,
                block_repeats=3),
    '143L': dict(endpoints_num_filters=256, filter_size_scale=1.3, resample_alpha=1.0,
                 block_repeats=3),
    '190': dict(endpoints_num_filters=512, filter_size_scale=1.3, resample_alpha=1.0,
                block_repeats=4),
}

# Block width per level before `filter_size_scale` (TPU FILTER_SIZE_MAP).
FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}

STEM_FILTERS = 64


class BlockGroup(nn.Module):
  """`repeats` blocks of one kind at stride 1; only the first may project.

  Attributes:
    filters: block width (a bottleneck outputs 4 * filters channels).
    block_fn: 'bottleneck' | 'residual'.
    repeats: number of blocks.
    stochastic_depth_rate: drop rate of every block in the group.
  """
  filters: int
  block_fn: str
  repeats: int = 1
  stochastic_depth_rate: float = 0.0
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H, W, C] -> [B, H, W, e * filters], e from resnet.BLOCK_EXPANSION."""
    block_cls = {'bottleneck': resnet.BottleneckBlock, 'residual': resnet.ResidualBlock}
    out_channels = resnet.BLOCK_EXPANSION[self.block_fn] * self.filters
    for r in range(self.repeats):
      x = block_cls[self.block_fn](
          filters=self.filters, strides=1,
          use_projection=(r == 0 and x.shape[-1] != out_channels),
          activation=self.activation, norm_momentum=self.norm_momentum,
          norm_epsilon=self.norm_epsilon, stochastic_depth_rate=self.stochastic_depth_rate,
          dtype=self.dtype, name=f'block{r}')(x, train=train)
    return x


class Resample(nn.Module):
  """Cross-scale connection from a parent block to a target block's input.

  Attributes:
    source_level, source_block_fn: the parent's level and block type.
    target_level: the target block's level.
    target_channels: the target block's input channels (4x its width for a
      bottleneck, 1x for a residual block).
    alpha: resample_alpha, the channel reduction of the connection.
  """
  source_level: int
  source_block_fn: str
  target_level: int
  target_channels: int
  alpha: float = 0.5
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: [B, H/2**s, W/2**s, C] -> [B, H/2**t, W/2**t, target_channels]."""
    conv = lambda *a, **k: layers.ConvNormAct(
        *a, **k, padding='FIXED', norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    width = x.shape[-1] / resnet.BLOCK_EXPANSION[self.source_block_fn]
    new_channels = int(width * self.alpha)
    x = conv(new_channels, 1, activation=self.activation, name='reduce')(x, train=train)
    if self.source_level < self.target_level:
      x = conv(new_channels, 3, 2, activation=self.activation, name='down')(x, train=train)
      for _ in range(self.target_level - self.source_level - 1):
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    elif self.source_level > self.target_level:
      x = layers.upsample_nearest(x, 2**(self.source_level - self.target_level))
    return conv(self.target_channels, 1, activation=None, name='expand')(x, train=train)


class SpineNet(nn.Module):
  """Scale-permuted backbone.

  Attributes:
    model_id: a key of SCALING_MAP ('49S', '49', '96', '143', '143L', '190').
    min_level, max_level: endpoint levels (inclusive); each must have an
      output block in the specs.
    block_specs: None for SPINENET_BLOCK_SPECS, or a sequence of BlockSpec /
      (level, block_fn, input_offsets, is_output).
    spec: '' for `block_specs`; else a name in spinenet_search.NAMED_SPECS
      ('spinenet49', 'r50', 'r0_sp53') or the path of a JSON specification
      (spinenet_search.specs_to_json). Set at most one of spec and block_specs.
    endpoints_num_filters, filter_size_scale, resample_alpha, block_repeats:
      None takes the value of SCALING_MAP[model_id].
    activation: 'relu' | 'swish' (protocol C) | ...; see layers.activation.
    norm_momentum, norm_epsilon: BatchNorm settings.
    stochastic_depth_rate: block group i of the scale-permuted network drops
      its residual branches with probability rate * (i + 1) / len(block_specs)
      (TPU); the stem has none.
    dropblock_keep_prob, dropblock_size: DropBlock on the output of every
      scale-permuted block group ('dropblock' rng); keep_prob 1.0 disables it.
      The paper uses DropBlock in protocol A without giving its settings;
      configs use keep_prob 0.9 and block size 7, the DropBlock paper's
      ResNet-50 values, reached by its linear schedule over the whole run
      (dropblock_warmup_steps, see `layers.DropBlock`).
    dtype: activation dtype.
  """
  model_id: str = '49'
  min_level: int = 3
  max_level: int = 7
  block_specs: Sequence[Any] | None = None
  spec: str = ''
  endpoints_num_filters: int | None = None
  filter_size_scale: float | None = None
  resample_alpha: float | None = None
  block_repeats: int | None = None
  activation: str = 'relu'
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-3
  stochastic_depth_rate: float = 0.0
  dropblock_keep_prob: float = 1.0
  dropblock_size: int = 7
  dropblock_warmup_steps: int = 0
  dtype: Any = jnp.float32

  def _scaling(self, key):
    value = getattr(self, key)
    if value is not None:
      return value
    if self.model_id not in SCALING_MAP:
      raise ValueError(f'Unknown SpineNet model_id {self.model_id!r}; '
                       f'choose one of {list(SCALING_MAP)}.')
    return SCALING_MAP[self.model_id][key]

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array]:
    """Computes the endpoints.

    Args:
      images: [B, H, W, 3] normalized images; H and W multiples of
        2**max(max_level, coarsest block level) (128 for the default specs).
      train: batch statistics, stochastic depth ('drop_path' rng) and
        DropBlock ('dropblock' rng) when True.

    Returns:
      {l: [B, H/2**l, W/2**l, endpoints_num_filters]} for l = min_level..max_level.
    """
    # spinenet_search builds on this module's BlockSpec, hence the late import.
    from jaxdet.models.backbones import spinenet_search  # pylint: disable=g-import-not-at-top
    if self.spec and self.block_specs is not None:
      raise ValueError(f'SpineNet got both spec={self.spec!r} and block_specs; set one.')
    if self.spec:
      specs = spinenet_search.load_spec(self.spec)
    else:
      specs = SPINENET_BLOCK_SPECS if self.block_specs is None else self.block_specs
    specs = spinenet_search.validate(specs, min_level=self.min_level, max_level=self.max_level)
    scale = self._scaling('filter_size_scale')
    alpha = self._scaling('resample_alpha')
    repeats = self._scaling('block_repeats')
    endpoints_num_filters = self._scaling('endpoints_num_filters')

    wanted = list(range(self.min_level, self.max_level + 1))
    # Every level must tile the image exactly, or the cross-scale sums fail
    # deep inside the network with a size mismatch (the "14 vs 16" error of
    # inputs padded to a multiple of 64 only).
    coarsest = max(self.max_level, max(s.level for s in specs))
    height, width = images.shape[1:3]
    if height % 2**coarsest or width % 2**coarsest:
      raise ValueError(
          f'SpineNet needs image height and width divisible by 2**{coarsest} = '
          f'{2**coarsest}; got {height}x{width}. Pad the images to a multiple of '
          f'{2**coarsest} (config.data.size_divisor).')

    common = dict(activation=self.activation, norm_momentum=self.norm_momentum,
                  norm_epsilon=self.norm_epsilon, dtype=self.dtype)

    # Stem (paper Sec. 3.1; TPU _build_stem_network): the 7x7 conv keeps 64
    # channels at every scale; the two L2 groups are scaled and repeated.
    x = layers.ConvNormAct(STEM_FILTERS, 7, 2, padding='FIXED', name='stem', **common)(
        images, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    # Running list of candidate parents: (features, level, block_fn).
    blocks = []
    for g in range(2):
      x = BlockGroup(int(FILTER_SIZE_MAP[2] * scale), 'bottleneck', repeats,
                     name=f'stem_group{g}', **common)(x, train=train)
      blocks.append((x, 2, 'bottleneck'))
    consumers = [0] * len(blocks)

    outputs = {}
    for i, spec in enumerate(specs):
      filters = int(FILTER_SIZE_MAP[spec.level] * scale)
      in_channels = resnet.BLOCK_EXPANSION[spec.block_fn] * filters
      parents = []
      for k, offset in enumerate(spec.input_offsets):
        feat, level, block_fn = blocks[offset]
        parents.append(Resample(level, block_fn, spec.level, in_channels, alpha,
                                name=f'resample{i}_{k}', **common)(feat, train=train))
        consumers[offset] += 1
      if spec.is_output:
        # Blocks without consumers that already have the output block's level
        # and input channels are summed in unresampled (TPU and TF Model
        # Garden; in the default specs block 11 joins the L5 output).
        for j, (feat, level, _) in enumerate(blocks):
          if consumers[j] == 0 and level == spec.level and feat.shape[-1] == in_channels:
            parents.append(feat)
            consumers[j] += 1
      x = layers.activation(self.activation)(sum(parents[1:], parents[0]))
      x = BlockGroup(filters, spec.block_fn, repeats,
                     stochastic_depth_rate=self.stochastic_depth_rate * (i + 1) / len(specs),
                     name=f'group{i}', **common)(x, train=train)
      x = layers.DropBlock(self.dropblock_keep_prob, self.dropblock_size,
                           self.dropblock_warmup_steps, name=f'dropblock{i}')(x, train=train)
      blocks.append((x, spec.level, spec.block_fn))
      consumers.append(0)
      if spec.is_output:
        outputs[spec.level] = x

    return {
        l: layers.ConvNormAct(endpoints_num_filters, 1, name=f'endpoint{l}', **common)(
            outputs[l], train=train)
        for l in wanted
    }


def build(cfg, dtype, name=None) -> SpineNet:
  """SpineNet from `config.model.backbone` (keys: the attributes of `SpineNet`)."""
  return layers.build_module(SpineNet, cfg, dtype, name=name)
