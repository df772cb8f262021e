"""init_from: whole and partial (backbone-only) parameter imports, and their errors."""

import jax
import numpy as np
import pytest

from jaxdet import checkpoint
from jaxdet import train
import tiny


def _build(tmp_path):
  c = tiny.tiny_config(str(tmp_path / 'tfds'))
  _, model, tx, _, mesh = train.build(c)
  return c, model, tx, mesh


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def test_backbone_only_checkpoint_loads_with_partial_and_keeps_the_rest(tmp_path):
  c, model, tx, mesh = _build(tmp_path)
  fresh, _ = train.create_state(model, c, tx, mesh, jax.random.key(1))
  donor, _ = train.create_state(model, c, tx, mesh, jax.random.key(2))
  backbone = {'params': {'backbone': donor['params']['backbone']},
              'batch_stats': {'backbone': donor['batch_stats']['backbone']}}
  checkpoint.export_params(str(tmp_path / 'backbone'), backbone)

  c.init_from = str(tmp_path / 'backbone')
  with pytest.raises(checkpoint.CheckpointMismatchError, match='missing'):
    train.create_state(model, c, tx, mesh, jax.random.key(1))  # Strict by default.

  c.init_from_partial = True
  state, _ = train.create_state(model, c, tx, mesh, jax.random.key(1))
  jax.tree_util.tree_map(np.testing.assert_array_equal, _host(state['params']['backbone']),
                         _host(donor['params']['backbone']))
  jax.tree_util.tree_map(np.testing.assert_array_equal, _host(state['params']['head']),
                         _host(fresh['params']['head']))
  jax.tree_util.tree_map(np.testing.assert_array_equal, _host(state['batch_stats']['backbone']),
                         _host(donor['batch_stats']['backbone']))


def test_partial_checkpoint_with_foreign_or_misshaped_entries_is_an_error(tmp_path):
  c, model, tx, mesh = _build(tmp_path)
  state, _ = train.create_state(model, c, tx, mesh, jax.random.key(1))
  stem = _host(state['params']['backbone'])
  first = sorted(stem)[0]
  bad = {'params': {'backbone': dict(stem, extra_layer={'kernel': np.zeros((3,), np.float32)})}}
  checkpoint.export_params(str(tmp_path / 'extra'), bad)
  c.init_from, c.init_from_partial = str(tmp_path / 'extra'), True
  with pytest.raises(checkpoint.CheckpointMismatchError, match='unexpected.*extra_layer'):
    train.create_state(model, c, tx, mesh, jax.random.key(1))

  wrong = jax.tree_util.tree_map(lambda x: np.zeros(x.shape + (2,), x.dtype), stem[first])
  checkpoint.export_params(str(tmp_path / 'shape'), {'params': {'backbone': {first: wrong}}})
  c.init_from = str(tmp_path / 'shape')
  with pytest.raises(checkpoint.CheckpointMismatchError, match='shape of'):
    train.create_state(model, c, tx, mesh, jax.random.key(1))
