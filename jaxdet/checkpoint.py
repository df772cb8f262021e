"""orbax checkpoints: periodic async saves of the whole train state, resume, params import.

The train state is one pytree `{params, batch_stats, opt_state, step}`. The input pipeline
is a pure function of (seed, step) (`jaxdet.data.pipeline.train_iterator(start_step=...)`),
so the step is all that is needed to resume the data exactly where it stopped.
"""

import os
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdet import parallel


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tree or shapes do not fit the model being built."""


def manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  return ocp.CheckpointManager(
      directory,
      item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save, create=True))


def _shapes(tree) -> dict:
  """'/'-joined path -> shape, for any tree of arrays, ShapeDtypeStructs or orbax metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[parallel.path_str(path)] = tuple(getattr(leaf, 'shape', np.shape(leaf)))
  return out


def check_fits(saved, abstract, what: str):
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped entries."""
  have, want = _shapes(saved), _shapes(abstract)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(k for k in set(have) & set(want) if have[k] != want[k])
  if missing or unexpected or misshaped:
    lines = [f'{what} does not fit the model built from this config:']
    for title, keys in (('missing', missing), ('unexpected', unexpected)):
      if keys:
        lines.append(f'  {title} ({len(keys)}): ' + ', '.join(keys[:10]) +
                     (' ...' if len(keys) > 10 else ''))
    for k in misshaped[:10]:
      lines.append(f'  shape of {k}: checkpoint {have[k]} vs model {want[k]}')
    lines.append('Use a workdir trained with the same model config, or a fresh --workdir.')
    raise CheckpointMismatchError('\n'.join(lines))


def restore_latest(mgr: ocp.CheckpointManager, abstract_state) -> Optional[Any]:
  """Restores the newest checkpoint into `abstract_state`'s shardings, or None if there is none.

  abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set.
  """
  step = mgr.latest_step()
  if step is None:
    return None
  metadata = mgr.item_metadata(step)
  check_fits(getattr(metadata, 'tree', metadata), abstract_state,
             f'Checkpoint {step} in {mgr.directory}')
  logging.info('Restoring checkpoint %d from %s', step, mgr.directory)
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def save(mgr: ocp.CheckpointManager, step: int, state, *, force: bool = False):
  mgr.save(int(step), args=ocp.args.StandardSave(state), force=force)


def export_params(path: str, variables):
  """Writes a params-only checkpoint (e.g. {'params', 'batch_stats'}) for `init_from`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), variables, force=True)
  checkpointer.wait_until_finished()


def _restrict(abstract, saved):
  """The part of `abstract` that `saved` covers (saved entries the model lacks are left out,
  so that `check_fits` names them as unexpected)."""
  if not isinstance(saved, Mapping) or not isinstance(abstract, Mapping):
    return abstract
  return {k: _restrict(abstract[k], v) for k, v in saved.items() if k in abstract}


def import_params(path: str, abstract_variables, *, partial: bool = False):
  """Loads a params-only checkpoint into the structure and shardings of abstract_variables.

  Every entry must be present with the right shape; anything else is a
  CheckpointMismatchError that lists the offending names. With `partial`, the checkpoint
  may cover only some subtrees (a converted backbone: {'params': {'backbone': ...}}); those
  are returned, and the caller keeps its own values elsewhere. Entries the model lacks, or
  with other shapes, are errors either way.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_from={path} does not exist.')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  saved = getattr(metadata, 'item_metadata', None) or getattr(metadata, 'tree', metadata)
  # orbax wraps the saved tree's metadata; its `.tree` is the nested dict.
  target = (_restrict(abstract_variables, getattr(saved, 'tree', saved)) if partial
            else abstract_variables)
  check_fits(saved, target, f'init_from checkpoint {path}')
  return checkpointer.restore(path, target)
