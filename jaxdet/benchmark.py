r"""Throughput, step time, compile time, memory, FLOPs and MFU of a config.

  python -m jaxdet.benchmark --config=configs/spinenet49.py --mode=infer --batch=1
  python -m jaxdet.benchmark --config=configs/spinenet49.py --mode=train --batch=64 \
      --config.dtype=bfloat16
  python -m jaxdet.benchmark --config=configs/spinenet49s.py:shapes --mode=data

Model benchmarks run on random inputs of the config's shape (no dataset needed); `data`
times the input pipeline alone on the host, so a user can tell whether data or model limits
a run. Step time is the median over timed steps after warm-up; FLOPs per step come from
XLA's cost analysis of the compiled step; MFU divides achieved FLOP/s by the device's
peak (bf16 dense) where it is known. Timings are printed, never asserted.
"""

import resource
import time

from absl import app
from absl import flags
import numpy as np

from jaxdet import cli

cli.make_configs_importable()
FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  cli.define_config_flag()
  flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'data'], 'What to time.')
  flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s).')
  flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.mark_flags_as_required(['config'])

# Dense bf16 peak FLOP/s per chip/GPU (vendor figures).
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v5': 459e12, 'A100': 312e12, 'H100': 989e12, 'H200': 989e12,
}


def device_peak(device) -> float:
  kind = getattr(device, 'device_kind', '')
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return float('nan')


def peak_memory_bytes(devices) -> float:
  """Largest peak among devices (allocator stats), or the host's max RSS on CPU."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  if peaks:
    return float(max(peaks))
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def random_batch(config, batch_size, rng):
  """A batch of the data contract's shapes with random images and a few boxes per image."""
  from jaxdet import train  # pylint: disable=g-import-not-at-top
  shapes = train.dummy_batch(config, batch_size)
  size = config.data.image_size
  n = config.data.max_instances
  xy = rng.uniform(0, size * 0.7, (batch_size, n, 2))
  wh = rng.uniform(8, size * 0.3, (batch_size, n, 2))
  valid = np.arange(n)[None, :] < 8
  batch = {
      'image': rng.standard_normal(shapes['image'].shape).astype(np.float32),
      'image_id': np.arange(batch_size).astype(shapes['image_id'].dtype),
      'orig_size': np.full((batch_size, 2), size, np.int32),
      'scale': np.ones((batch_size, 2), np.float32),
      'offset': np.zeros((batch_size, 2), np.float32),
      'boxes': np.where(valid[..., None], np.concatenate([xy, xy + wh], -1), 0).astype(
          np.float32),
      'classes': np.where(valid, rng.integers(0, config.model.num_classes, (batch_size, n)),
                          -1).astype(np.int32),
      'is_crowd': np.zeros((batch_size, n), bool),
  }
  if 'masks' in shapes:
    batch['masks'] = (rng.uniform(size=shapes['masks'].shape) > 0.5).astype(np.uint8)
  return batch


def _time(fn, steps, warmup):
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def benchmark_model(config, mode: str, batch_size: int, steps: int, warmup: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet import evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  config.global_batch_size = batch_size
  config.eval_batch_size = batch_size
  module, model, tx, schedule, mesh = train.build(config)
  init_key, root_key = jax.random.split(jax.random.key(config.seed))
  state, target = train.create_state(model, config, tx, mesh, init_key)
  host = random_batch(config, batch_size, np.random.default_rng(0))
  batch = parallel.global_batch(host, mesh)
  if mode == 'train':
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, target)
    step = train.jit_train_step(
        train.make_train_step(model, module, config, tx, schedule, root_key), shardings, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {'state': state}

    def run():
      holder['state'], metrics = compiled(holder['state'], batch)
      return metrics
  else:
    predict = evaluate.make_predict_fn(model, module, config, mesh)
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    start = time.perf_counter()
    compiled = predict.lower(variables, batch).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(variables, batch)
  step_s = _time(run, steps, warmup)
  flops = _flops(compiled)
  devices = list(mesh.devices.flat)
  achieved = flops / step_s
  peak = device_peak(devices[0]) * len(devices)
  return {
      'config': config.model.name, 'mode': mode, 'batch': batch_size,
      'image_size': config.data.image_size, 'dtype': config.dtype,
      'device': f'{len(devices)} x {devices[0].device_kind}',
      'images/s': batch_size / step_s, 'step_ms': step_s * 1e3, 'compile_s': compile_s,
      'peak_memory_GiB': peak_memory_bytes(devices) / 2**30,
      'GFLOPs/step': flops / 1e9, 'TFLOP/s': achieved / 1e12,
      'MFU': achieved / peak if np.isfinite(peak) else float('nan'),
  }


def benchmark_data(config, batch_size: int, steps: int, warmup: int) -> dict:
  from jaxdet.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.train_iterator(config.data, batch_size=batch_size, seed=config.seed)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  seconds = time.perf_counter() - start
  return {'config': config.data.name, 'mode': 'data', 'batch': batch_size,
          'image_size': config.data.image_size, 'images/s': steps * batch_size / seconds,
          'step_ms': seconds / steps * 1e3}


def format_table(row: dict) -> str:
  cells = [(k, f'{v:.4g}' if isinstance(v, float) else str(v)) for k, v in row.items()]
  widths = [max(len(k), len(v)) for k, v in cells]
  head = ' | '.join(k.ljust(w) for (k, _), w in zip(cells, widths))
  body = ' | '.join(v.ljust(w) for (_, v), w in zip(cells, widths))
  return f'{head}\n{"-" * len(head)}\n{body}'


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  config = FLAGS.config
  batch = FLAGS.batch or config.global_batch_size
  if FLAGS.mode == 'data':
    row = benchmark_data(config, batch, FLAGS.steps, FLAGS.warmup)
  else:
    with config.unlocked():
      row = benchmark_model(config, FLAGS.mode, batch, FLAGS.steps, FLAGS.warmup)
  print(format_table(row))


if __name__ == '__main__':
  define_flags()
  app.run(main)
