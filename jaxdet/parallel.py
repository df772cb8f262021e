"""Meshes, shardings and host-local <-> global arrays.

One code path from a laptop CPU to a pod: a 2-D mesh with axes ('data', 'model'); batches
are sharded over 'data', parameters are replicated unless a partition rule (a regex on the
'/'-joined parameter path -> PartitionSpec) says otherwise. BatchNorm statistics are taken
over the global batch because the jitted step sees global arrays (no pmap, no axis_name).
"""

import os
import re
from typing import Any, Sequence, Tuple

from absl import logging
import flax
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed():
  """Starts jax.distributed when launched as one of several processes.

  An explicit coordinator is given by JAXDET_COORDINATOR (host:port), JAXDET_NUM_PROCESSES
  and JAXDET_PROCESS_ID (launch/local.sh, launch/slurm_gpu.sbatch); each process then sees
  all local devices unless JAX_LOCAL_DEVICE_IDS (comma-separated) restricts it.
  JAXDET_DISTRIBUTED=auto lets jax detect everything (Cloud TPU VMs, Slurm, Open MPI, GKE;
  launch/tpu_pod.sh sets it). Without either, Slurm/MPI jobs of more than one task and
  TPU hosts that name their peers (TPU_WORKER_HOSTNAMES) are detected as well.
  Single-process runs do nothing.
  """
  # Cross-process collectives of the CPU backend (several processes on one or more CPU
  # hosts) need an implementation; gloo over TCP is jax's own default from 0.5 on, older
  # versions had none and fail at the first cross-process reduction.
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  coordinator = os.environ.get('JAXDET_COORDINATOR')
  if coordinator:
    # Read here as well: jax itself reads JAX_LOCAL_DEVICE_IDS only from 0.4.32 on.
    local = os.environ.get('JAX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ['JAXDET_NUM_PROCESSES']),
        process_id=int(os.environ['JAXDET_PROCESS_ID']),
        local_device_ids=[int(i) for i in local.split(',')] if local else None,
        # Everything is given: no guessing from the environment. Inside a Slurm job, jax's
        # detection would otherwise restrict each process to GPU number SLURM_LOCALID.
        cluster_detection_method='deactivate')
  elif os.environ.get('JAXDET_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()
  elif any(k in os.environ for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                                     'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')):
    if int(os.environ.get('SLURM_NTASKS', os.environ.get('OMPI_COMM_WORLD_SIZE', '2'))) > 1:
      jax.distributed.initialize()
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(mesh_cfg, devices: Sequence[Any] = None) -> Mesh:
  """A ('data', 'model') mesh; mesh_cfg.data == -1 takes all devices left by 'model'."""
  devices = list(devices) if devices is not None else jax.devices()
  model = int(mesh_cfg.model)
  data = int(mesh_cfg.data)
  if data == -1:
    if len(devices) % model:
      raise ValueError(f'{len(devices)} devices do not split into model={model} groups.')
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f'mesh data={data} x model={model} needs {data * model} devices, '
                     f'{len(devices)} are available; set --config.mesh.data/model.')
  return Mesh(np.asarray(devices).reshape(data, model), ('data', 'model'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over 'data', everything else whole."""
  return NamedSharding(mesh, P('data'))


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


# Fully sharded data parallelism: every kernel's output dimension split over the devices that
# also split the batch; XLA gathers a layer's weights where they are used and reduce-scatters
# their gradients. For models whose parameters and Adam/momentum state do not fit one device
# (SpineNet-190, Swin-L): set `config.partition_rules = parallel.FSDP_RULES`.
FSDP_RULES = (('kernel$', ('...', 'data')),)


def shardings_from_rules(abstract_tree, mesh: Mesh,
                         rules: Sequence[Tuple[str, Tuple]] = ()) -> Any:
  """NamedShardings for a pytree of ShapeDtypeStructs from (regex, spec) rules.

  The first rule whose regex matches the '/'-joined path wins; no match means replicated.
  A spec that starts with '...' is aligned to the last dimensions, whatever the rank:
  ('...', 'data') shards the output dimension of every conv and dense kernel (FSDP).
  A spec axis is dropped (replicated) when the dimension does not divide the mesh axis.
  """
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        if spec and spec[0] in ('...', Ellipsis):
          spec = (None,) * max(len(leaf.shape) - len(spec) + 1, 0) + spec[1:]
        spec = tuple(
            axis if axis is None or i >= len(leaf.shape)
            or leaf.shape[i] % mesh.shape[axis] == 0 else None
            for i, axis in enumerate(spec))
        return NamedSharding(mesh, P(*spec[:len(leaf.shape)]))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch (this process's share) -> global jax arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of the global batch; checks that the batch fits the mesh."""
  data = mesh.shape['data']
  if global_batch_size % data:
    raise ValueError(f'global batch {global_batch_size} does not divide over {data} '
                     'data-parallel devices; change --config.global_batch_size.')
  if global_batch_size % jax.process_count():
    raise ValueError(f'global batch {global_batch_size} does not divide over '
                     f'{jax.process_count()} processes.')
  return global_batch_size // jax.process_count()


def fetch(tree):
  """Global arrays -> numpy on every process (all-gather across hosts when needed)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def unfreeze(tree):
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
