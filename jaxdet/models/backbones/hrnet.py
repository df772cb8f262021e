"""HRNet backbone (Wang, Sun et al., "Deep High-Resolution Representation Learning", 2019).

images [B, H, W, 3] -> {2: [B, H/4, W/4, W], 3: [.., 2W], 4: [.., 4W], 5: [B, H/32, W/32, 8W]}
for width W (18, 32 or 40): the four parallel branches of the last stage, the same level dict
as ResNet. HRNetV2p's neck (upsample and concatenate the branches, then a pyramid) is
jaxdet/models/necks/hrfpn.py.

The network (HRNet-Image-Classification, mmdet `configs/hrnet/*hrnetv2p*`; the project's
reference notes section 6.1 and seed 004):

  stem          two 3x3/2 conv-BN-ReLU (stride 4)
  stage 1       4 bottlenecks of width 64 (256 channels out), one branch
  transition t  a new branch at half resolution from the lowest branch by 3x3/2 conv-BN-ReLU;
                a 3x3 conv-BN-ReLU where a kept branch changes width (only after stage 1)
  stages 2-4    1 / 4 / 3 modules; each runs 4 basic blocks per branch, then fuses: output
                branch i sums every input branch j, brought to its resolution by
                j > i: 1x1 conv + BN, nearest upsampling by 2**(j-i);
                j < i: i-j 3x3/2 conv + BN (ReLU between, not after the last);
                followed by a ReLU.

Parameter names follow the PyTorch layout (timm `hrnet_w32`, HRNet-Image-Classification) so
that `from_torch` / `to_torch` map them mechanically; every conv + BN pair is a
`layers.ConvNormAct`:

  conv1, conv2                          conv{1,2} + bn{1,2}
  layer1_{i}/conv{k}, shortcut          layer1.{i}.conv{k} + bn{k}, .downsample.0 + .1
  transition{t}_{i}[_{j}]               transition{t}.{i}[.{j}].0 + .1
  stage{s}_{m}/branch{b}_{k}/conv{k}    stage{s}.{m}.branches.{b}.{k}.conv{k} + bn{k}
  stage{s}_{m}/fuse{i}_{j}[_{k}]        stage{s}.{m}.fuse_layers.{i}.{j}[.{k}].0 + .1

The ImageNet classification head of those checkpoints (incre_modules, downsamp_modules,
final_layer, classifier) is not part of the detection backbone and is skipped on import.
"""

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import convert
from jaxdet.models import layers
from jaxdet.models.backbones import resnet

Array = jax.Array

# Stages 1-4: (modules, branches, blocks per branch). Stage 1 is made of bottlenecks, the
# others of basic blocks. HRNet-Image-Classification `cls_hrnet_w*` yaml / mmdet hrnetv2p
# configs / timm `cfg_cls['hrnet_w32']`, identical for every width.
HRNET_STAGES = (
    (1, 1, 4),
    (1, 2, 4),
    (4, 3, 4),
    (3, 4, 4),
)

# Branch-1 width of each model (reference section 6.1): branches are W * (1, 2, 4, 8).
VARIANTS = {'W18': 18, 'W32': 32, 'W40': 40}

# PyTorch keys of the ImageNet classifier that a detection backbone does not have.
CLASSIFIER_PREFIXES = ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.')


def _crop_to(x: Array, like: Array) -> Array:
  """x: [B, H', W', C] with H' >= H, W' >= W -> [B, H, W, C] of `like` ([B, H, W, *])."""
  return x[:, :like.shape[1], :like.shape[2]]


class HRModule(nn.Module):
  """One high-resolution module: basic blocks per branch, then the all-to-all fuse.

  Attributes:
    channels: width of each branch, highest resolution first (branch b has stride 4 * 2**b).
    num_blocks: basic blocks per branch.
    activation, norm_momentum, norm_epsilon, dtype: as `HRNet`.
  """
  channels: Sequence[int]
  num_blocks: int = 4
  activation: str = 'relu'
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], *, train: bool) -> list[Array]:
    """xs: branch b [B, H_b, W_b, channels[b]], H_b = ceil(H_0 / 2**b) -> same shapes."""
    norm = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
                dtype=self.dtype)
    xs = list(xs)
    for b, c in enumerate(self.channels):
      for k in range(self.num_blocks):
        xs[b] = resnet.ResidualBlock(c, activation=self.activation, name=f'branch{b}_{k}',
                                     **norm)(xs[b], train=train)
    if len(xs) == 1:
      return xs

    act = layers.activation(self.activation)
    out = []
    for i, ci in enumerate(self.channels):
      # Summed in branch order, as the reference, so that float rounding matches it too.
      y = None
      for j, cj in enumerate(self.channels):
        if j == i:
          z = xs[i]
        elif j > i:
          # Lower resolution: 1x1 conv to branch i's width, then nearest upsampling.
          z = layers.ConvNormAct(ci, 1, activation=None, name=f'fuse{i}_{j}', **norm)(
              xs[j], train=train)
          # Crop: ceil-mode strides make a coarse map cover a few pixels more.
          z = _crop_to(layers.upsample_nearest(z, 2**(j - i)), xs[i])
        else:
          # Higher resolution: i-j stride-2 3x3 convs, keeping branch j's width until the last.
          z = xs[j]
          for k in range(i - j):
            last = k == i - j - 1
            z = layers.ConvNormAct(ci if last else cj, 3, 2,
                                   activation=None if last else self.activation,
                                   name=f'fuse{i}_{j}_{k}', **norm)(z, train=train)
        y = z if y is None else y + z
      out.append(act(y))
    return out


class HRNet(nn.Module):
  """HRNetV2 feature extractor: the four branches of the last stage.

  Attributes:
    width: branch-1 width W (18 | 32 | 40 for the published models; any for tests).
    stem_width: channels of both stem convs (64).
    stage1_width: inner width of stage 1's bottlenecks (64; they output 4x that).
    num_modules: modules in stages 1..4; None takes `HRNET_STAGES`' (1, 1, 4, 3).
    num_blocks: blocks per branch in every module; None takes `HRNET_STAGES`' (4).
    activation: see `layers.activation`.
    norm_momentum, norm_epsilon: BatchNorm settings; the defaults are PyTorch's
      (momentum 0.1 in its convention, eps 1e-5) so that imported ImageNet statistics are used
      as they were trained.
    dtype: activation dtype.
  """
  width: int = 32
  stem_width: int = 64
  stage1_width: int = 64
  num_modules: Sequence[int] | None = None
  num_blocks: int | None = None
  activation: str = 'relu'
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[int, Array]:
    """Computes the four branches.

    Args:
      images: [B, H, W, 3] normalized images.
      train: BatchNorm uses batch statistics when True.

    Returns:
      {l: [B, ceil(H/2**l), ceil(W/2**l), width * 2**(l-2)]} for l = 2..5.
    """
    num_modules = self.num_modules or tuple(s[0] for s in HRNET_STAGES)
    if len(num_modules) != len(HRNET_STAGES):
      raise ValueError(f'HRNet num_modules needs {len(HRNET_STAGES)} entries (stages 1..4), '
                       f'got {tuple(num_modules)}.')
    num_blocks = [self.num_blocks or s[2] for s in HRNET_STAGES]
    norm = dict(norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
                dtype=self.dtype)
    conv = lambda *a, **k: layers.ConvNormAct(*a, **k, activation=self.activation, **norm)
    x = conv(self.stem_width, 3, 2, name='conv1')(images, train=train)
    x = conv(self.stem_width, 3, 2, name='conv2')(x, train=train)

    # Stage 1: one branch of bottlenecks (a ResNet layer1 without striding).
    for i in range(num_blocks[0]):
      x = resnet.BottleneckBlock(
          self.stage1_width, use_projection=i == 0 and x.shape[-1] != 4 * self.stage1_width,
          activation=self.activation, name=f'layer1_{i}', **norm)(x, train=train)
    xs = [x]

    for stage in range(2, len(HRNET_STAGES) + 1):
      num_branches = HRNET_STAGES[stage - 1][1]
      channels = [self.width * 2**b for b in range(num_branches)]
      xs = _transition(xs, channels, stage - 1, conv, train)
      for m in range(num_modules[stage - 1]):
        xs = HRModule(channels, num_blocks[stage - 1], self.activation,
                      name=f'stage{stage}_{m}', **norm)(xs, train=train)
    return {b + 2: x for b, x in enumerate(xs)}


def _transition(xs, channels, t, conv, train):
  """Branches of stage t -> inputs of stage t+1, which has one more branch at half resolution.

  xs: branch b [B, H_b, W_b, C_b]; channels: widths of stage t+1's branches; conv: the
  ConvNormAct-ReLU constructor. Returns the list of stage t+1's input branches.
  """
  out = []
  for i, c in enumerate(channels):
    if i < len(xs):
      out.append(xs[i] if xs[i].shape[-1] == c else
                 conv(c, 3, 1, name=f'transition{t}_{i}')(xs[i], train=train))
    else:
      # The new branch grows from the lowest-resolution one (the reference code, not the
      # paper's figure, which sums all branches).
      z = xs[-1]
      for j in range(i + 1 - len(xs)):
        last = j == i - len(xs)
        z = conv(c if last else xs[-1].shape[-1], 3, 2,
                 name=f'transition{t}_{i}_{j}')(z, train=train)
      out.append(z)
  return out


def build(cfg, dtype, name=None) -> HRNet:
  """HRNet from `config.model.backbone` (keys: the attributes of `HRNet`)."""
  return layers.build_module(HRNet, cfg, dtype, name=name)


# ----------------------------------------------------------------------------- checkpoints


def _torch_module(name: str) -> str:
  """A Flax module name -> its PyTorch module path ('branch1_3' -> 'branches.1.3')."""
  m = re.fullmatch(r'(branch|fuse)(\d+)((?:_\d+)*)', name)
  if m:  # 'fuse2_0_1' -> 'fuse_layers.2.0.1': the number after the word is an index.
    head = {'branch': 'branches', 'fuse': 'fuse_layers'}[m.group(1)]
    return '.'.join([head, m.group(2), *m.group(3).split('_')[1:]])
  return name.replace('_', '.')  # 'transition1_1_0' -> 'transition1.1.0'.


def torch_prefixes(path: Sequence[str]) -> tuple[str, str]:
  """Flax path of a ConvNormAct -> (PyTorch conv prefix, PyTorch BN prefix).

  ('stage3_1', 'branch2_0', 'conv1') -> ('stage3.1.branches.2.0.conv1', '... .bn1');
  ('transition1_1_0',) -> ('transition1.1.0.0', 'transition1.1.0.1').
  """
  *parents, leaf = path
  parent = '.'.join(_torch_module(p) for p in parents)
  join = lambda *parts: '.'.join(p for p in parts if p)
  m = re.fullmatch(r'conv(\d+)', leaf)
  if m:  # Inside a block (or the stem): conv{k} pairs with bn{k}.
    return join(parent, leaf), join(parent, f'bn{m.group(1)}')
  if leaf == 'shortcut':
    return join(parent, 'downsample.0'), join(parent, 'downsample.1')
  # An nn.Sequential(conv, bn[, relu]).
  module = join(parent, _torch_module(leaf))
  return module + '.0', module + '.1'


def from_torch(state_dict: dict[str, np.ndarray], params_template,
               skip_classifier: bool = True) -> dict:
  """PyTorch HRNet state dict (timm / HRNet-Image-Classification keys) -> jaxdet variables.

  Args:
    state_dict: key -> array (conv weights OIHW, BN weight/bias/running_mean/running_var).
    params_template: {'params': ..., 'batch_stats': ...} of an `HRNet` (arrays or
      ShapeDtypeStructs, e.g. from `jax.eval_shape` of `init`).
    skip_classifier: ignore the ImageNet head's keys (`CLASSIFIER_PREFIXES`).

  Returns:
    {'params': ..., 'batch_stats': ...} numpy float32 trees with the template's structure.

  Raises:
    convert.ConversionError listing missing, unexpected and mis-shaped keys.
  """
  ignore = CLASSIFIER_PREFIXES if skip_classifier else ()
  return convert.from_torch_conv_norm(state_dict, params_template, torch_prefixes,
                                      ignore_prefixes=ignore)


def to_torch(params) -> dict[str, np.ndarray]:
  """jaxdet variables {'params', 'batch_stats'} of an `HRNet` -> PyTorch state dict."""
  return convert.to_torch_conv_norm(params, torch_prefixes)
