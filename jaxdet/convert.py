r"""Import published PyTorch backbone checkpoints as jaxdet parameters.

  python -m jaxdet.convert --from=hrnet --variant=W32 --src=hrnetv2_w32_imagenet.pth \
      --dst=ckpt/hrnet_w32
  python -m jaxdet.convert --from=torchvision_resnet --src=resnet50-0676ba61.pth \
      --config=configs/retinanet_resnet50.py --dst=ckpt/retinanet_r50_imagenet
  python -m jaxdet.convert --from=swin --variant=T --src=swin_tiny_patch4_window7_224.pth ...

`--src` is a `.pth` (read with `torch.load(weights_only=True)`, never plain pickle), a
`.safetensors` or an `.npz` file of PyTorch-named arrays. A state dict nested under 'model'
or 'state_dict' (the official Swin and mmdet files) is unwrapped; `--strip_prefix=backbone.`
takes the backbone out of a detector checkpoint.

The backbone is built from `--config` (a detector config file; its `model.backbone`) or from
the architecture's default for `--variant`; `jax.eval_shape` of its `init` is the template that
the module's `from_torch(state_dict, template)` fills. A missing, unexpected or mis-shaped key
is a `ConversionError` that lists them all.

What is written (orbax, `checkpoint.export_params`) is what `config.init_from` reads:

  * with `--config`: the whole detector's {'params', 'batch_stats'}, the backbone from the
    checkpoint and every other part (neck, heads) initialised from `config.seed` as a fresh run
    would be. `init_from=DST` then loads it with the same config.
  * without `--config`: only {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}},
    a backbone-only tree for any detector with that backbone, loaded with
    `--config.init_from_partial=True` (the rest of the detector keeps its initialisation).

Layouts: conv weights OIHW -> HWIO kernels, Linear [out, in] -> [in, out], BatchNorm
weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var.
"""

import importlib
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ARCHITECTURES = ('swin', 'mpvit', 'hrnet', 'torchvision_resnet')

# Default variant of each architecture when neither --variant nor --config says.
DEFAULT_VARIANT = {'swin': 'T', 'mpvit': 'S', 'hrnet': 'W32', 'torchvision_resnet': '50'}

# The spatial size of the template's dummy input; parameter shapes do not depend on it.
TEMPLATE_IMAGE_SIZE = 224

PrefixFn = Callable[[Sequence[str]], tuple[str, str]]


class ConversionError(ValueError):
  """A state dict whose keys or shapes do not fit the jaxdet module."""


# ----------------------------------------------------------------------------- layouts


def conv_to_jax(w: np.ndarray) -> np.ndarray:
  """PyTorch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
  """Flax kernel [kh, kw, I, O] -> PyTorch conv weight [O, I, kh, kw]."""
  return np.transpose(k, (3, 2, 0, 1))


def linear_to_jax(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> Flax Dense kernel [in, out] (its own inverse)."""
  return np.transpose(w)


def error_report(what: str, missing=(), unexpected=(), misshaped=()) -> str:
  """The message of a ConversionError: every offending key, grouped.

  misshaped: (key, checkpoint shape, expected shape) triples.
  """
  lines = [f'{what} does not fit the jaxdet module:']
  for title, keys in (('missing', missing), ('unexpected', unexpected)):
    if keys:
      lines.append(f'  {title} keys ({len(keys)}): ' + ', '.join(sorted(keys)))
  if misshaped:
    lines.append(f'  mis-shaped keys ({len(misshaped)}):')
    lines.extend(f'    {k}: checkpoint {tuple(a)} vs expected {tuple(b)}'
                 for k, a, b in sorted(misshaped))
  return '\n'.join(lines)


# Leaf of a ConvNormAct (`layers.ConvNormAct`) -> (which PyTorch module, its tensor name).
_CONV_NORM_LEAVES = {
    ('params', 'conv', 'kernel'): ('conv', 'weight'),
    ('params', 'conv', 'bias'): ('conv', 'bias'),
    ('params', 'bn', 'scale'): ('bn', 'weight'),
    ('params', 'bn', 'bias'): ('bn', 'bias'),
    ('batch_stats', 'bn', 'mean'): ('bn', 'running_mean'),
    ('batch_stats', 'bn', 'var'): ('bn', 'running_var'),
}


def _names(path) -> tuple[str, ...]:
  return tuple(getattr(p, 'key', getattr(p, 'name', str(p))) for p in path)


def _torch_key(collection: str, path: tuple[str, ...], prefix_fn: PrefixFn) -> str:
  """The PyTorch key of one leaf of a tree made of ConvNormAct modules."""
  entry = _CONV_NORM_LEAVES.get((collection,) + path[-2:])
  if entry is None:
    raise ConversionError(f'No PyTorch name for {collection}/{"/".join(path)}: only '
                          'ConvNormAct (conv + bn) leaves are mapped.')
  conv_prefix, bn_prefix = prefix_fn(path[:-2])
  module, tensor = entry
  return f'{conv_prefix if module == "conv" else bn_prefix}.{tensor}'


def from_torch_conv_norm(state_dict: dict[str, np.ndarray], template, prefix_fn: PrefixFn,
                         ignore_prefixes: Sequence[str] = ()) -> dict:
  """Fills a tree of ConvNormAct variables from a PyTorch state dict.

  Args:
    state_dict: PyTorch key -> array (convs OIHW, BatchNorm weight/bias/running stats).
    template: {'params': ..., 'batch_stats': ...} (arrays or ShapeDtypeStructs).
    prefix_fn: Flax path of a ConvNormAct -> (PyTorch conv prefix, BN prefix).
    ignore_prefixes: PyTorch keys starting with one of these are not expected to match (for
      example an ImageNet classifier); `num_batches_tracked` is always ignored.

  Returns:
    {'params', 'batch_stats'} with the template's structure, numpy arrays of its dtypes.

  Raises:
    ConversionError listing every missing, unexpected and mis-shaped key.
  """
  used, missing, misshaped = set(), [], []

  def fill(collection):
    def one(path, leaf):
      key = _torch_key(collection, _names(path), prefix_fn)
      if key not in state_dict:
        missing.append(key)
        return None
      used.add(key)
      value = np.asarray(state_dict[key])
      if _names(path)[-1] == 'kernel':
        value = conv_to_jax(value) if value.ndim == 4 else value
      if value.shape != tuple(leaf.shape):
        misshaped.append((key, np.shape(state_dict[key]), _torch_shape(_names(path), leaf.shape)))
        return None
      return value.astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(one, template.get(collection, {}))

  out = {'params': fill('params'), 'batch_stats': fill('batch_stats')}
  unexpected = [k for k in state_dict if k not in used and not k.endswith('num_batches_tracked')
                and not k.startswith(tuple(ignore_prefixes))]
  if missing or unexpected or misshaped:
    raise ConversionError(error_report('The PyTorch state dict', missing, unexpected, misshaped))
  return out


def _torch_shape(path, shape):
  """The PyTorch shape that a Flax leaf of `shape` comes from (for error messages)."""
  return tuple(conv_to_torch(np.empty(shape, np.uint8)).shape) if (
      path[-1] == 'kernel' and len(shape) == 4) else tuple(shape)


def to_torch_conv_norm(variables, prefix_fn: PrefixFn) -> dict[str, np.ndarray]:
  """The inverse of `from_torch_conv_norm`: {'params', 'batch_stats'} -> PyTorch state dict."""
  out = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      names = _names(path)
      value = np.asarray(leaf)
      if names[-1] == 'kernel' and value.ndim == 4:
        value = conv_to_torch(value)
      out[_torch_key(collection, names, prefix_fn)] = value
  return out


# ----------------------------------------------------------------------------- torchvision ResNet


def torchvision_resnet_prefixes(path: Sequence[str]) -> tuple[str, str]:
  """jaxdet ResNet ConvNormAct path -> torchvision (conv prefix, BN prefix).

  ('stem',) -> ('conv1', 'bn1'); ('stage3_block1', 'conv2') -> ('layer2.1.conv2',
  'layer2.1.bn2'); ('stage2_block0', 'shortcut') -> ('layer1.0.downsample.0', '...1').
  """
  if tuple(path) == ('stem',):
    return 'conv1', 'bn1'
  if len(path) != 2 or not path[0].startswith('stage'):
    raise ConversionError(f'No torchvision name for ResNet module {"/".join(path)}.')
  stage, block = path[0][len('stage'):].split('_block')
  layer = f'layer{int(stage) - 1}.{int(block)}'
  if path[1] == 'shortcut':
    return f'{layer}.downsample.0', f'{layer}.downsample.1'
  k = path[1][len('conv'):]
  return f'{layer}.conv{k}', f'{layer}.bn{k}'


def torchvision_resnet_from_torch(state_dict, params_template) -> dict:
  """torchvision ResNet state dict -> jaxdet `resnet.ResNet` variables (the ImageNet `fc.*`
  classifier is skipped). See `from_torch_conv_norm` for the arguments and errors."""
  return from_torch_conv_norm(state_dict, params_template, torchvision_resnet_prefixes,
                              ignore_prefixes=('fc.',))


def torchvision_resnet_to_torch(variables) -> dict[str, np.ndarray]:
  """jaxdet ResNet {'params', 'batch_stats'} -> torchvision state dict (without `fc`)."""
  return to_torch_conv_norm(variables, torchvision_resnet_prefixes)


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str, strip_prefix: str = '') -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict from .pth / .pt / .bin, .safetensors or .npz.

  .pth goes through `torch.load(weights_only=True)`, which refuses arbitrary pickled code.
  Returns key -> float32/int numpy array, with `strip_prefix` removed from the keys that
  have it (the others dropped) when given.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'--src={path} does not exist.')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as f:
      sd = {k: f[k] for k in f.files}
  elif ext == '.safetensors':
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('Reading .safetensors needs the safetensors package '
                        '(pip install safetensors).') from e
    sd = load_file(path)
  elif ext in ('.pth', '.pt', '.bin', '.ckpt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path} needs PyTorch (pip install torch); or convert it to '
                        '.safetensors / .npz where torch is installed.') from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    # Official Swin / MPViT files wrap the weights in {'model': ...}, mmdet in {'state_dict'}.
    for wrapper in ('model', 'state_dict'):
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
    # numpy has no bfloat16: widen every floating tensor to float32.
    sd = {k: (v.float() if v.is_floating_point() else v).cpu().numpy()
          for k, v in obj.items() if hasattr(v, 'cpu')}
  else:
    raise ValueError(f'Unknown checkpoint format {ext!r} for {path}: '
                     'expected .pth, .safetensors or .npz.')
  if strip_prefix:
    sd = {k[len(strip_prefix):]: v for k, v in sd.items() if k.startswith(strip_prefix)}
    if not sd:
      raise ConversionError(f'No key of {path} starts with --strip_prefix={strip_prefix!r}.')
  return sd


# ----------------------------------------------------------------------------- backbones


def backbone_module(arch: str):
  """The jaxdet module that builds `arch`'s backbone (has `build`)."""
  if arch not in ARCHITECTURES:
    raise ValueError(f'Unknown --from={arch!r}; choose one of {ARCHITECTURES}.')
  name = 'resnet' if arch == 'torchvision_resnet' else arch
  return importlib.import_module(f'jaxdet.models.backbones.{name}')


def default_backbone_config(arch: str, variant: str = '') -> ml_collections.ConfigDict:
  """`config.model.backbone` of the published model `variant` of `arch`."""
  variant = variant or DEFAULT_VARIANT[arch]
  if arch == 'hrnet':
    from jaxdet.models.backbones import hrnet  # pylint: disable=g-import-not-at-top
    if variant not in hrnet.VARIANTS:
      raise ValueError(f'Unknown HRNet variant {variant!r}; choose one of '
                       f'{sorted(hrnet.VARIANTS)}.')
    return ml_collections.ConfigDict(dict(name='hrnet', width=hrnet.VARIANTS[variant]))
  if arch == 'torchvision_resnet':
    # torchvision's BatchNorm: eps 1e-5, momentum 0.1 (0.9 in Flax's convention).
    return ml_collections.ConfigDict(dict(name='resnet', depth=int(variant), width=64,
                                          norm_momentum=0.9, norm_epsilon=1e-5))
  # Swin and MPViT pick their table row with a `variant` attribute.
  return ml_collections.ConfigDict(dict(name=arch, variant=variant))


def backbone_template(backbone_cfg, dtype='float32') -> dict:
  """{'params', 'batch_stats'} ShapeDtypeStructs of the backbone `backbone_cfg` describes."""
  module = backbone_module('torchvision_resnet' if backbone_cfg.name == 'resnet'
                           else backbone_cfg.name)
  model = module.build(backbone_cfg, dtype)
  images = jnp.zeros((1, TEMPLATE_IMAGE_SIZE, TEMPLATE_IMAGE_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def backbone_from_torch(arch: str, state_dict, template) -> dict:
  """Dispatches to the module's `from_torch`; returns {'params', 'batch_stats'}."""
  if arch == 'torchvision_resnet':
    return torchvision_resnet_from_torch(state_dict, template)
  module = backbone_module(arch)
  if not hasattr(module, 'from_torch'):
    raise NotImplementedError(f'jaxdet.models.backbones.{arch} has no from_torch yet.')
  if arch == 'swin':
    # Swin has no BatchNorm: its from_torch takes and returns the params tree.
    return {'params': module.from_torch(state_dict, template['params']), 'batch_stats': {}}
  out = module.from_torch(state_dict, template)  # HRNet, MPViT: {'params', 'batch_stats'}.
  return {'params': out['params'], 'batch_stats': out.get('batch_stats', {})}


def convert(arch: str, src: str, dst: str | None = None, *, variant: str = '',
            config: ml_collections.ConfigDict | None = None, strip_prefix: str = '',
            backbone_config: ml_collections.ConfigDict | None = None) -> dict:
  """Reads `src`, converts it for `arch` and (if `dst`) saves it for `config.init_from`.

  Args:
    arch: one of ARCHITECTURES.
    src: the PyTorch state dict file (see `load_state_dict`).
    dst: output directory, or None to only return the tree.
    variant: the published model (e.g. 'W32', 'T', '50') when there is no config.
    config: a detector config; its `model.backbone` is converted and the whole detector saved.
    strip_prefix: see `load_state_dict`.
    backbone_config: a `model.backbone` sub-config to use instead of the variant's (without
      `config`; e.g. a narrow network).

  Returns:
    The saved {'params', 'batch_stats'} tree of numpy arrays.
  """
  if config is not None:
    backbone_cfg = config.model.backbone
  else:
    backbone_cfg = backbone_config or default_backbone_config(arch, variant)
  expected = 'resnet' if arch == 'torchvision_resnet' else arch
  if backbone_cfg.name != expected:
    raise ValueError(f'--from={arch} converts {expected!r} backbones, but the config builds '
                     f'{backbone_cfg.name!r}.')
  template = backbone_template(backbone_cfg)
  state_dict = load_state_dict(src, strip_prefix)
  backbone = backbone_from_torch(arch, state_dict, template)
  backbone = jax.tree_util.tree_map(np.asarray, backbone)
  if config is None:
    variables = {'params': {'backbone': backbone['params']},
                 'batch_stats': {'backbone': backbone['batch_stats']}}
  else:
    variables = detector_variables(config, backbone)
  if dst:
    from jaxdet import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.export_params(dst, variables)
  return variables


def detector_variables(config, backbone) -> dict:
  """A freshly initialised detector (seed `config.seed`) with `backbone` put in its place."""
  from jaxdet import train  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  # Parameter shapes do not depend on the canvas; a small one keeps init quick.
  config.data.image_size = min(config.data.image_size, 256)
  model = importlib.import_module(f'jaxdet.models.{config.model.name}').Model(config)
  init = jax.jit(lambda key: train.init_variables(model, config, key))
  key = jax.random.key(config.seed)
  variables = _compile_once(init.lower(key))(key)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  for collection in ('params', 'batch_stats'):
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype),
                                  variables.get(collection, {}).get('backbone', {}))
    have = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), backbone[collection])
    if want != have:
      raise ConversionError(f'The converted backbone {collection} do not fit the detector '
                            'built from --config (a different backbone config?).')
    if backbone[collection]:
      variables[collection]['backbone'] = backbone[collection]
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _compile_once(lowered):
  """Compiles a function that runs once without XLA's code optimizations, which on a CPU
  take minutes for a whole detector (and op-by-op execution longer still)."""
  for options in ({'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False},
                  {'xla_backend_optimization_level': 0}):
    try:
      return lowered.compile(compiler_options=options)
    except Exception:  # pylint: disable=broad-except  (an option this backend lacks)
      continue
  return lowered.compile()


# ----------------------------------------------------------------------------- CLI


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config  # None without --config: a backbone-only tree.
  variables = convert(f['from'].value, f.src, f.dst, variant=f.variant, config=config,
                      strip_prefix=f.strip_prefix)
  n = sum(np.size(x) for x in jax.tree.leaves(variables['params']))
  use = f'--config.init_from={os.path.abspath(f.dst)}'
  if config is None:  # Only the backbone: the detector keeps its own initialisation elsewhere.
    use += ' --config.init_from_partial=True'
  print(f'Wrote {f.dst}: {n:,} parameters; use it with {use}')


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxdet import cli  # pylint: disable=g-import-not-at-top
  cli.make_configs_importable()
  cli.define_config_flag()
  flags.DEFINE_enum('from', None, list(ARCHITECTURES), 'Architecture of the checkpoint.')
  flags.DEFINE_string('src', None, '.pth, .safetensors or .npz PyTorch state dict.')
  flags.DEFINE_string('dst', None, 'Output directory (orbax) for config.init_from.')
  flags.DEFINE_string('variant', '', 'Model variant when there is no --config '
                      '(hrnet W18|W32|W40, swin T|S|B|L, mpvit T|XS|S|B, resnet depth).')
  flags.DEFINE_string('strip_prefix', '', "Keep only keys with this prefix, removed "
                      "(e.g. 'backbone.' in a detector checkpoint).")
  flags.mark_flags_as_required(['from', 'src', 'dst'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
