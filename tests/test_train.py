"""The train loop: loss falls, one compilation, resume equality, 1 vs 4 devices."""

import json
import os

import jax
import numpy as np
import pytest

from jaxdet import parallel
from jaxdet import train
from jaxdet.data import pipeline
import tiny


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def params_of(state):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(state['params']))


def test_learning_rate_schedule_warmup_and_steps(data_dir):
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 100
  c.optimizer.learning_rate = 0.1
  c.optimizer.warmup_steps = 10
  c.optimizer.warmup_init_lr = 0.0
  c.optimizer.decay_boundaries = (0.5, 0.8)
  lr = train.learning_rate_schedule(c)
  np.testing.assert_allclose(float(lr(0)), 0.0, atol=1e-8)
  np.testing.assert_allclose(float(lr(5)), 0.05, rtol=1e-5)
  np.testing.assert_allclose(float(lr(20)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(float(lr(60)), 0.01, rtol=1e-5)
  np.testing.assert_allclose(float(lr(90)), 0.001, rtol=1e-5)
  c.optimizer.reference_batch_size = 2 * c.global_batch_size
  np.testing.assert_allclose(float(train.learning_rate_schedule(c)(20)), 0.05, rtol=1e-5)


def test_l2_penalty_counts_kernels_only():
  params = {'conv': {'kernel': np.ones((2, 2)), 'bias': np.ones(3)},
            'bn': {'scale': np.ones(4)}}
  np.testing.assert_allclose(float(train.l2_penalty(params, 0.1)), 0.1 * 0.5 * 4)


def test_loss_falls_and_step_compiles_once(data_dir, tmp_path):
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 20
  c.checkpoint_every_steps = 20
  module, model, tx, schedule, mesh = train.build(c)
  init_key, root_key = jax.random.split(jax.random.key(0))
  state, target = train.create_state(model, c, tx, mesh, init_key)
  step = train.jit_train_step(
      train.make_train_step(model, module, c, tx, schedule, root_key),
      jax.tree_util.tree_map(lambda s: s.sharding, target), mesh)
  # Overfit one fixed batch: the loss must fall.
  batch = next(pipeline.train_iterator(c.data, batch_size=4, seed=0))
  losses = []
  for _ in range(20):
    state, metrics = step(state, parallel.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  # Batches with other numbers of objects reuse the same executable.
  for other in [dict(batch, classes=np.full_like(batch['classes'], -1),
                     boxes=np.zeros_like(batch['boxes']))]:
    state, _ = step(state, parallel.global_batch(other, mesh))
  assert step._cache_size() == 1


def test_resume_equals_uninterrupted(data_dir, tmp_path):
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 6
  straight = train.train(c, str(tmp_path / 'straight'))
  c.num_train_steps = 3
  train.train(c, str(tmp_path / 'resumed'))
  c.num_train_steps = 6
  resumed = train.train(c, str(tmp_path / 'resumed'))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         params_of(straight), params_of(resumed))
  a = [m['loss'] for m in read_metrics(tmp_path / 'straight')]
  b = [m['loss'] for m in read_metrics(tmp_path / 'resumed')]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_sigterm_saves_and_resumes(data_dir, tmp_path, monkeypatch):
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 6
  c.checkpoint_every_steps = 100
  straight = train.train(c, str(tmp_path / 'straight'))

  class StopAfterTwo(train._Preemption):  # pylint: disable=protected-access
    reads = 0

    @property
    def requested(self):
      StopAfterTwo.reads += 1
      return StopAfterTwo.reads >= 2

    @requested.setter
    def requested(self, value):
      pass

  monkeypatch.setattr(train, '_Preemption', StopAfterTwo)
  stopped = train.train(c, str(tmp_path / 'preempted'))
  assert int(stopped['step']) == 2
  monkeypatch.undo()
  resumed = train.train(c, str(tmp_path / 'preempted'))
  assert int(resumed['step']) == 6
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         params_of(straight), params_of(resumed))


def test_one_device_equals_four(data_dir, tmp_path):
  assert jax.device_count() >= 4
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 3
  one = train.train(c, str(tmp_path / 'one'), mesh=parallel.make_mesh(c.mesh, jax.devices()[:1]))
  four = train.train(c, str(tmp_path / 'four'), mesh=parallel.make_mesh(c.mesh, jax.devices()[:4]))
  np.testing.assert_allclose([m['loss'] for m in read_metrics(tmp_path / 'one')],
                             [m['loss'] for m in read_metrics(tmp_path / 'four')], rtol=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         params_of(one), params_of(four))


def test_non_finite_loss_stops_with_step(data_dir, tmp_path):
  c = tiny.tiny_config(data_dir)
  c.optimizer.learning_rate = 1e30
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip_norm = 0.0
  c.num_train_steps = 6
  with pytest.raises(train.NonFiniteLossError, match='at step'):
    train.train(c, str(tmp_path / 'nan'))


@pytest.mark.parametrize('mesh_shape,rules,axis', [
    # Tensor-parallel style: kernels split over a 'model' axis beside 'data'.
    ((2, 2), (('kernel$', (None, None, None, 'model')),), 'model'),
    # FSDP: every kernel's output dimension split over the batch's own axis.
    ((4, 1), parallel.FSDP_RULES, 'data'),
])
def test_sharded_parameters_step_equals_replicated(data_dir, tmp_path, mesh_shape, rules, axis):
  c = tiny.tiny_config(data_dir)
  c.num_train_steps = 3
  replicated = train.train(c, str(tmp_path / 'replicated'),
                           mesh=parallel.make_mesh(c.mesh, jax.devices()[:4]))
  c.mesh.data, c.mesh.model = mesh_shape
  c.partition_rules = rules
  sharded = train.train(c, str(tmp_path / 'sharded'),
                        mesh=parallel.make_mesh(c.mesh, jax.devices()[:4]))
  kernel = sharded['params']['head']['class_conv0']['kernel']
  parts = mesh_shape[0] if axis == 'data' else mesh_shape[1]
  assert kernel.sharding.spec[-1] == axis
  assert len(kernel.addressable_shards) == 4
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // parts
  momentum = jax.tree_util.tree_leaves(sharded['opt_state'])
  assert any(getattr(m, 'sharding', None) is not None and axis in tuple(m.sharding.spec)
             for m in momentum)  # The optimizer state is sharded with its parameters.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         params_of(replicated), params_of(sharded))
  np.testing.assert_allclose([m['loss'] for m in read_metrics(tmp_path / 'replicated')],
                             [m['loss'] for m in read_metrics(tmp_path / 'sharded')], rtol=1e-4)
