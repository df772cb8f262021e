"""make_optimizer: per-group learning-rate multipliers and gradient clipping by global norm."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import common
from jaxdet import train


def config(**optimizer):
  c = common.base_config()
  c.num_train_steps = 10
  c.optimizer.update(dict(dict(warmup_steps=0, decay_boundaries=(), decay_factors=(),
                               grad_clip_norm=0.0), **optimizer))
  return c


PARAMS = {'backbone': {'stem': {'conv': {'kernel': jnp.ones((2, 3))}},
                       'stage3_block0': {'bn': {'scale': jnp.ones((3,))}}},
          'head': {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}}


def one_update(c, grads):
  tx, _ = train.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_sgd_multipliers_scale_the_learning_rate_per_group():
  c = config(name='sgd', momentum=0.0, learning_rate=0.5, weight_decay=0.0)
  c.optimizer.lr_multipliers = (('^backbone/', 0.1), ('^backbone/stem/', 0.0))
  grads = jax.tree.map(lambda x: 2.0 * jnp.ones_like(x), PARAMS)
  up = one_update(c, grads)
  np.testing.assert_allclose(up['backbone']['stem']['conv']['kernel'], 0.0)
  np.testing.assert_allclose(up['backbone']['stage3_block0']['bn']['scale'], -0.5 * 2 * 0.1,
                             rtol=1e-6)
  np.testing.assert_allclose(up['head']['dense']['kernel'], -0.5 * 2, rtol=1e-6)
  np.testing.assert_allclose(up['head']['dense']['bias'], -0.5 * 2, rtol=1e-6)


def test_mapping_form_and_adamw_decay_scaled_with_the_group():
  # AdamW's first step is lr * (sign(g) + wd * w) on decayed kernels: the multiplier scales
  # the decoupled decay too, as a PyTorch parameter group with its own lr.
  c = config(name='adamw', learning_rate=1e-2, weight_decay=0.5)
  c.optimizer.lr_multipliers = ml_collections.ConfigDict({'backbone': 0.1})
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  up = one_update(c, grads)
  np.testing.assert_allclose(up['backbone']['stem']['conv']['kernel'],
                             -1e-2 * 0.1 * (1 + 0.5), rtol=1e-4)
  np.testing.assert_allclose(up['backbone']['stage3_block0']['bn']['scale'], -1e-2 * 0.1,
                             rtol=1e-4)  # not a kernel: no decay
  np.testing.assert_allclose(up['head']['dense']['kernel'], -1e-2 * 1.5, rtol=1e-4)


def test_no_multipliers_is_the_plain_optimizer():
  c = config(name='sgd', momentum=0.9, learning_rate=0.1, weight_decay=0.0, grad_clip_norm=1.0)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), PARAMS)
  got = one_update(c, grads)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  want, _ = ref.update(grads, ref.init(PARAMS), PARAMS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  tx, _ = train.make_optimizer(c)
  assert len(tx.init(PARAMS)) == 2  # clip + sgd, nothing added


def test_gradient_clipping_by_global_norm():
  c = config(name='sgd', momentum=0.0, learning_rate=1.0, weight_decay=0.0, grad_clip_norm=0.1)
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), PARAMS)
  norm = float(optax.global_norm(grads))   # 3 * sqrt(6 + 3 + 6 + 2)
  up = one_update(c, grads)
  np.testing.assert_allclose(float(optax.global_norm(up)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(up['head']['dense']['bias'], -3.0 * 0.1 / norm, rtol=1e-5)
  # Below the threshold gradients pass unchanged.
  small = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), PARAMS)
  np.testing.assert_allclose(one_update(c, small)['head']['dense']['bias'], -1e-3, rtol=1e-5)
