"""Two processes on one machine train exactly like one process with the same global batch.

launch/local.sh starts two `python -m jaxdet.main` processes joined by jax.distributed,
each with two simulated CPU devices (cross-process reductions go through gloo). The
reference is one process with four devices that reads the same global batches: the two
processes' data shards side by side, in process order, as
`jax.make_array_from_process_local_data` lays them out. The two-process run stops after
its checkpoint at step 3 and a second launch resumes it to step 6; losses, both
checkpoints and the final state must match the reference.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdet.data import pipeline
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, 'launch', 'local.sh')
TIMEOUT_S = 600

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
import tiny


def get_config(arg=None):
  c = tiny.tiny_config({data_dir!r})
  c.checkpoint_every_steps = 3
  # Decay steps given in steps, not fractions of num_train_steps: the compiled step is
  # the same for the 3- and the 6-step launch, so the second finds it in the cache.
  c.optimizer.decay_boundaries = (1000, 2000)
  return c
'''

# One process reading both shards of a two-process run, concatenated in process order.
REFERENCE = '''
import importlib.util
import sys

import numpy as np

sys.path.insert(0, {root!r})
from jaxdet import main
from jaxdet.data import pipeline

config_path, workdir, steps = sys.argv[1:]
spec = importlib.util.spec_from_file_location('mp_config', config_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.num_train_steps = int(steps)
shard_iterator = pipeline.train_iterator


def both_shards(data_cfg, *, batch_size, shard_index, shard_count, **kwargs):
  assert (shard_index, shard_count) == (0, 1)
  streams = [shard_iterator(data_cfg, batch_size=batch_size // 2, shard_index=k,
                            shard_count=2, **kwargs) for k in range(2)]
  while True:
    parts = [next(s) for s in streams]
    yield {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}


pipeline.train_iterator = both_shards
main.run(config, workdir, 'train')
'''


def child_env(devices, **extra):
  """Environment of a jaxdet process with `devices` simulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', **extra)
  # Unoptimised CPU code compiles several times faster, and every run here uses it.
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      '--xla_backend_optimization_level=0')
  for k in ('JAXDET_COORDINATOR', 'JAXDET_NUM_PROCESSES', 'JAXDET_PROCESS_ID'):
    env.pop(k, None)
  return env


def start(args, env, log_path):
  """Starts `args` in its own session (so that its process group can be killed)."""
  log = open(log_path, 'w')
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True), log


def finish(proc, log, log_paths, deadline):
  """Waits until `deadline`; kills the whole process group on timeout or failure."""
  try:
    rc = proc.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    rc = None
  finally:
    log.close()
    if proc.poll() is None or rc:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  if rc != 0:
    tails = []
    for path in log_paths:
      if os.path.exists(path):
        with open(path) as f:
          tails.append(f'--- {path}\n' + ''.join(f.readlines()[-40:]))
    raise AssertionError(f'{proc.args} ended with {rc} (None: timeout)\n' + '\n'.join(tails))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


def saved_state(workdir, step):
  """The checkpointed train state at `step` as numpy, whatever devices wrote it."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, 'item_metadata', None) or getattr(metadata, 'tree', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree_util.tree_map(np.asarray, checkpointer.restore(path, target))


def assert_states_close(a, b):
  """Equal up to float32 summation order: cross-process reductions add in another order,
  so entries that are small against their array (cancelling gradient sums in the momentum
  trace) are compared at the array's scale."""
  np.testing.assert_equal(int(a['step']), int(b['step']))
  for part in ('params', 'batch_stats', 'opt_state'):
    jax.tree_util.tree_map_with_path(
        lambda path, x, y: np.testing.assert_allclose(
            x, y, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(y), initial=0.0)) + 1e-7,
            err_msg=f'{part} {jax.tree_util.keystr(path)}'),
        a[part], b[part])


def test_two_processes_match_one_and_resume(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  config_path = tmp_path / 'mp_config.py'
  config_path.write_text(CONFIG.format(tests=os.path.dirname(__file__), data_dir=data_dir))
  reference_path = tmp_path / 'reference.py'
  reference_path.write_text(REFERENCE.format(root=ROOT))
  # Built here once, so the three processes below only read it.
  pipeline.check_available(tiny.tiny_config(data_dir).data, 'train')

  cache = str(tmp_path / 'jax_cache')
  # Process 0 of the resumed launch finds its executables in the cache. (CPU cache keys
  # differ between processes and only process 0 writes, so process 1 compiles again.)
  multi_env = child_env(2, JAX_COMPILATION_CACHE_DIR=cache)
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  deadline = time.time() + TIMEOUT_S

  started = []

  def launch(steps, name):
    logdir = tmp_path / name
    args = ['bash', LOCAL_SH, '2', '--', f'--config={config_path}', f'--workdir={two}',
            '--mode=train', f'--config.num_train_steps={steps}']
    env = dict(multi_env, JAXDET_LOGDIR=str(logdir), JAXDET_KILL_GRACE='2')
    started.append(start(args, env, tmp_path / f'{name}.out'))
    return started[-1] + ([str(logdir / f'process_{i}.log') for i in range(2)] +
                          [str(tmp_path / f'{name}.out')],)

  try:
    # The reference overlaps the first launch, whose processes often wait for each other.
    started.append(start([sys.executable, str(reference_path), str(config_path), one, '6'],
                         child_env(4), tmp_path / 'reference.log'))
    reference = started[-1] + ([str(tmp_path / 'reference.log')],)
    finish(*launch(3, 'first'), deadline)
    finish(*launch(6, 'second'), deadline)
    finish(*reference, deadline)
  finally:
    for proc, log in started:
      log.close()
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

  for name in ('first', 'second'):
    for i in range(2):
      with open(tmp_path / name / f'process_{i}.log') as f:
        assert f'process {i} of 2, 2 local / 4 global devices' in f.read(), (name, i)

  # Only process 0 writes metrics: one line per step, none twice; and the second launch
  # went on from step 3 instead of starting again.
  two_metrics = read_metrics(two)
  assert [m['step'] for m in two_metrics] == [1, 2, 3, 4, 5, 6]
  one_metrics = read_metrics(one)
  assert [m['step'] for m in one_metrics] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'cls_loss', 'box_loss', 'grad_norm'):
    np.testing.assert_allclose([m[key] for m in two_metrics], [m[key] for m in one_metrics],
                               rtol=1e-4, err_msg=key)
  # Step 3 was written by the first launch, step 6 by the resumed one.
  for step in (3, 6):
    assert_states_close(saved_state(two, step), saved_state(one, step))


def test_local_launcher_stops_all_when_one_fails(tmp_path):
  # A stand-in interpreter: process 1 fails at once, process 0 would run for a minute.
  fake = tmp_path / 'fake_python.sh'
  fake.write_text(textwrap.dedent('''\
      #!/usr/bin/env bash
      if [[ "$1" == -c ]]; then exec {python} "$@"; fi  # local.sh picking a free port
      echo "process $JAXDET_PROCESS_ID of $JAXDET_NUM_PROCESSES at $JAXDET_COORDINATOR: $*"
      survivor="$(dirname "$0")/survivor.pid"
      if [[ "$JAXDET_PROCESS_ID" == 1 ]]; then
        while [[ ! -s "$survivor" ]]; do sleep 0.1; done
        exit 3
      fi
      echo $$ > "$survivor"
      exec sleep 60
      '''.format(python=sys.executable)))
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), JAXDET_LOGDIR=str(tmp_path / 'logs'),
             JAXDET_KILL_GRACE='2')
  begin = time.time()
  r = subprocess.run(['bash', LOCAL_SH, '2', '--', '--workdir=w'], env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 3, r.stderr
  assert time.time() - begin < 20
  assert 'process 1 failed with status 3' in r.stderr
  for i in range(2):
    with open(tmp_path / 'logs' / f'process_{i}.log') as f:
      assert f'process {i} of 2 at 127.0.0.1:' in f.read()
  survivor = int((tmp_path / 'survivor.pid').read_text())
  try:
    os.kill(survivor, 0)
    raise AssertionError(f'process 0 (pid {survivor}) still runs after process 1 failed')
  except ProcessLookupError:
    pass
