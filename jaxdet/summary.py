r"""Parameter count and FLOPs of a config's model, without allocating its parameters.

  python -m jaxdet.summary --config=configs/spinenet49.py

Prints `params: N`, then the count per top-level module, then FLOPs per image of the
inference forward pass from XLA's cost analysis of the lowered (not executed) computation.
XLA counts a multiply-add as 2 FLOPs; detection papers usually quote multiply-adds, so both
are printed.
"""

from absl import app
from absl import flags

from jaxdet import cli

cli.make_configs_importable()
FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  cli.define_config_flag()
  flags.mark_flags_as_required(['config'])


def count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_variables(config):
  """ShapeDtypeStructs of the model's variables, via jax.eval_shape."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet import train  # pylint: disable=g-import-not-at-top
  model = train.model_module(config).Model(config)
  return model, jax.eval_shape(lambda: train.init_variables(model, config,
                                                            jax.random.key(0)))


def forward_flops(config, model, variables) -> float:
  """XLA cost-analysis FLOPs of one inference forward pass at batch 1."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet import train  # pylint: disable=g-import-not-at-top
  image = train.dummy_batch(config, 1)['image']
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def summarize(config, with_flops: bool = True) -> dict:
  model, variables = abstract_variables(config)
  params = variables['params']
  out = {'params': count(params),
         'modules': {name: count(sub) for name, sub in params.items()},
         'batch_stats': count(variables.get('batch_stats', {}))}
  if with_flops:
    out['flops'] = forward_flops(config, model, variables)
  return out


def main(argv):
  del argv
  config = FLAGS.config
  s = summarize(config)
  print(f"params: {s['params']}  ({s['params'] / 1e6:.2f}M, num_classes="
        f'{config.model.num_classes})')
  for name, n in s['modules'].items():
    print(f'  {name}: {n} ({n / 1e6:.2f}M)')
  size = config.data.image_size
  print(f"flops per image at {size}x{size}: {s['flops'] / 1e9:.1f} GFLOPs "
        f"({s['flops'] / 2e9:.1f}B multiply-adds)")


if __name__ == '__main__':
  define_flags()
  app.run(main)
