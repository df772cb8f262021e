"""Partition rules -> shardings, without running a model."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from jaxdet import parallel


def abstract(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_rules_match_first_and_drop_axes_that_do_not_divide():
  mesh = jax.make_mesh((2, 2), ('data', 'model'), devices=jax.devices()[:4])
  tree = {'conv': {'kernel': abstract(3, 3, 8, 6), 'bias': abstract(6)},
          'odd': {'kernel': abstract(3, 3, 8, 5)}}
  rules = (('conv/kernel', (None, None, 'data', 'model')), ('kernel$', (None, None, None, 'model')))
  shardings = parallel.shardings_from_rules(tree, mesh, rules)
  assert tuple(shardings['conv']['kernel'].spec) == (None, None, 'data', 'model')
  assert tuple(shardings['conv']['bias'].spec) == ()               # No rule: replicated.
  assert tuple(shardings['odd']['kernel'].spec) == (None, None, None, None)  # 5 % 2 != 0.


def test_fsdp_rules_shard_the_last_dimension_of_any_rank():
  mesh = jax.make_mesh((4, 1), ('data', 'model'), devices=jax.devices()[:4])
  assert common.FSDP_RULES == parallel.FSDP_RULES
  tree = {'conv': {'kernel': abstract(3, 3, 16, 32)}, 'dense': {'kernel': abstract(64, 8)},
          'norm': {'scale': abstract(32)}}
  shardings = parallel.shardings_from_rules(tree, mesh, parallel.FSDP_RULES)
  assert tuple(shardings['conv']['kernel'].spec) == (None, None, None, 'data')
  assert tuple(shardings['dense']['kernel'].spec) == (None, 'data')
  assert tuple(shardings['norm']['scale'].spec) == ()
  x = jax.device_put(np.zeros((64, 8), np.float32), shardings['dense']['kernel'])
  assert x.addressable_shards[0].data.shape == (64, 2)


def test_spinenet190_config_is_fully_sharded():
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('configs.spinenet190').get_config()
  assert tuple(config.partition_rules) == tuple(parallel.FSDP_RULES)
