r"""Throughput, step time, compile time, memory, FLOPs and MFU of a config.

  python -m jaxdet.benchmark --config=configs/spinenet49.py --mode=infer --batch=1
  python -m jaxdet.benchmark --config=configs/spinenet49.py --mode=train --batch=64 \
      --config.dtype=bfloat16
  python -m jaxdet.benchmark --config=configs/spinenet49s.py:shapes --mode=data
  python -m jaxdet.benchmark --config=configs/detr_r50.py:shapes --mode=match --batch=8
  python -m jaxdet.benchmark --config=configs/retinanet_swin.py --mode=backbone --batch=1

Model benchmarks run on random inputs of the config's shape (no dataset needed); `data`
times the input pipeline alone on the host, so a user can tell whether data or model limits
a run; `match` times DETR's Hungarian matching alone (jitted, the config's matcher) next
to the whole training step; `backbone` times the config's backbone alone (forward, and a
training step of forward, backward and an SGD update of a sum-of-squares loss). Step time
is the median over timed steps after warm-up; FLOPs per step come from
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
  flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'data', 'match', 'backbone'],
                    'What to time.')
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
      'valid_size': np.full((batch_size, 2), size, np.float32),
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


def benchmark_backbone(config, batch_size: int, steps: int, warmup: int) -> dict:
  """The backbone of `config.model` alone on random images of the config's canvas."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxdet.models import backbones  # pylint: disable=g-import-not-at-top
  from jaxdet import train  # pylint: disable=g-import-not-at-top
  from jaxdet.data import transforms  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(config.dtype)
  module = backbones.build(config.model, dtype)
  size = transforms.padded_size(config.data.image_size, config.data.size_divisor)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (batch_size, size, size, 3)), jnp.float32)
  key = jax.random.key(config.seed)
  variables = jax.jit(lambda k: module.init(k, images, train=False))(key)
  params, state = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  rngs = {k: jax.random.fold_in(key, i) for i, k in enumerate(train.RNG_STREAMS)}
  tx = optax.sgd(1e-3)
  opt_state = tx.init(params)

  def forward(params, state, images):
    return module.apply({'params': params, **state}, images, train=False)

  def train_step(params, state, opt_state, images):
    def loss_fn(p):
      out, new_state = module.apply({'params': p, **state}, images, train=True, rngs=rngs,
                                    mutable=list(state))
      return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in out.values()), new_state
    (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state

  row = {'config': config.model.backbone.name, 'mode': 'backbone', 'batch': batch_size,
         'image_size': size, 'dtype': config.dtype,
         'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}
  for name, fn, args in (('forward', forward, (params, state, images)),
                         ('train', train_step, (params, state, opt_state, images))):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    row[f'{name}_compile_s'] = time.perf_counter() - start
    row[f'{name}_ms'] = _time(lambda: compiled(*args), steps, warmup) * 1e3
    row[f'{name}_GFLOPs'] = _flops(compiled) / 1e9
  return row


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


def benchmark_matching(config, batch_size: int, steps: int, warmup: int) -> dict:
  """DETR: the matching of every decoder layer (one jitted call, as in the loss) against
  the whole training step, on random predictions of the model's shapes."""
  if config.model.name != 'detr':
    raise app.UsageError(f'--mode=match times DETR\'s matching; {config.model.name!r} '
                         f'has none.')
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet.models import detr  # pylint: disable=g-import-not-at-top
  step = benchmark_model(config, 'train', batch_size, steps, warmup)
  t = config.model.transformer
  layers = t.num_decoder_layers if config.model.loss.aux_loss else 1
  rng = np.random.default_rng(1)
  shape = (layers, batch_size, t.num_queries)
  logits = rng.standard_normal(shape + (config.model.num_classes + 1,)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, shape + (2,)),
                          rng.uniform(0.02, 0.3, shape + (2,))], -1).astype(np.float32)
  host = random_batch(config, batch_size, rng)
  targets = detr.normalized_targets(host, host['image'].shape, config.data)
  fn = jax.jit(lambda lg, bx, *gt: detr.match(lg, bx, *gt, config.model))
  match_s = _time(lambda: fn(logits, boxes, *targets), steps, warmup)
  return {'config': 'detr', 'matcher': config.model.matcher, 'batch': batch_size,
          'layers': layers, 'queries': t.num_queries, 'targets': config.data.max_instances,
          'match_ms': match_s * 1e3, 'step_ms': step['step_ms'],
          'share': match_s * 1e3 / step['step_ms']}


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
  elif FLAGS.mode == 'backbone':
    row = benchmark_backbone(config, batch, FLAGS.steps, FLAGS.warmup)
  elif FLAGS.mode == 'match':
    with config.unlocked():
      row = benchmark_matching(config, batch, FLAGS.steps, FLAGS.warmup)
  else:
    with config.unlocked():
      row = benchmark_model(config, FLAGS.mode, batch, FLAGS.steps, FLAGS.warmup)
  print(format_table(row))


if __name__ == '__main__':
  define_flags()
  app.run(main)
