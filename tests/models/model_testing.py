"""Helpers shared by the model tests: real variables and compiles without Flax init cost."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(shapes, seed=0):
  """Real variables for `shapes` without compiling Flax's init (slow on CPU).

  Kernels ~ N(0, 1/fan_in) as the real initializer; BN at identity.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def num_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def compile_quickly(lowered):
  """Compiles without XLA's CPU code optimizations: these tests check numbers,
  not speed, and the optimizations triple the compile time of a full network."""
  for options in ({'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False},
                  {'xla_backend_optimization_level': 0}):
    try:
      return lowered.compile(compiler_options=options)
    except Exception:  # pylint: disable=broad-except  (an option this XLA lacks)
      continue
  return lowered.compile()
