"""The train loop: one state pytree, one jitted step, read top to bottom.

state = {'params', 'batch_stats', 'opt_state', 'step'}; the step's randomness is
fold_in(root_key, step), split by purpose; the step is jitted once with the batch sharded
over the mesh's 'data' axis and the state donated.
"""

import functools
import importlib
import json
import math
import os
import re
import signal
import time
from typing import Any, Callable, Dict, Tuple

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from jaxdet import checkpoint
from jaxdet import parallel

RNG_STREAMS = ('dropout', 'drop_path', 'dropblock', 'sampling')


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the last saved checkpoint is the last good state."""


def model_module(config):
  """`config.model.name` -> the module `jaxdet.models.<name>` (Model, loss, postprocess)."""
  return importlib.import_module(f'jaxdet.models.{config.model.name}')


# ----------------------------------------------------------------------------- optimisation


def learning_rate_schedule(config) -> Callable[[Any], Any]:
  """Linear warmup, then step decay or cosine (optax.schedules); lr scaled by batch size."""
  opt = config.optimizer
  lr = opt.learning_rate
  if opt.reference_batch_size:
    lr *= config.global_batch_size / opt.reference_batch_size
  total = config.num_train_steps
  warmup = min(opt.warmup_steps, max(total - 1, 0))
  init = min(opt.warmup_init_lr, lr)
  if opt.schedule == 'step':
    boundaries = {}
    for fraction, factor in zip(opt.decay_boundaries, opt.decay_factors):
      # Factors are cumulative (0.1 then 0.01 of the base lr), as the SpineNet recipe.
      step = int(round(fraction * total)) if fraction <= 1 else int(fraction)
      boundaries[max(step - warmup, 1)] = factor / (
          math.prod(boundaries.values()) if boundaries else 1.0)
    after = optax.schedules.piecewise_constant_schedule(lr, boundaries)
  elif opt.schedule == 'cosine':
    after = optax.schedules.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; use 'step' or 'cosine'.")
  if warmup <= 0:
    return after
  return optax.schedules.join_schedules(
      [optax.schedules.linear_schedule(init, lr, warmup), after], [warmup])


def describe_schedule(config, schedule) -> str:
  """One line with the learning rate at the schedule's turning points."""
  opt = config.optimizer
  total = config.num_train_steps
  points = sorted({0, min(opt.warmup_steps, total), total - 1} | {
      int(round(f * total)) if f <= 1 else int(f) for f in opt.decay_boundaries
      if opt.schedule == 'step'})
  return (f'{opt.name} {opt.schedule}, {total} steps, warmup {opt.warmup_steps}; lr ' +
          ', '.join(f'{float(schedule(p)):.4g}@{p}' for p in points if 0 <= p < total))


def is_kernel(path) -> bool:
  return parallel.path_str(path).endswith('kernel')


def lr_multiplier(path, rules) -> float:
  """Product of the multipliers of every (regex, factor) rule that matches the path.

  path: a parameter's key path (its '/'-joined form is matched with re.search, e.g.
  'backbone/stage3_block0/conv1/conv/kernel'). Multiplying all matches makes the result
  independent of the rules' order: ('backbone', 0.1) with ('backbone/stem', 0.0) freezes
  the stem and slows the rest of the backbone.
  """
  name = parallel.path_str(path)
  return math.prod(float(f) for pattern, f in rules if re.search(pattern, name))


def scale_by_lr_multipliers(rules) -> optax.GradientTransformation:
  """Multiplies each parameter's final update by `lr_multiplier(path, rules)`.

  Applied after the optimizer, so a factor m acts as the learning rate lr * m for those
  parameters, decoupled weight decay included (DETR's backbone at 1e-5 beside 1e-4, as
  separate PyTorch parameter groups); m = 0 freezes them.
  """
  rules = tuple(rules)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u if (m := lr_multiplier(p, rules)) == 1.0 else u * m, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _multiplier_rules(opt):
  """optimizer.lr_multipliers as (regex, factor) pairs: a mapping or a sequence of pairs."""
  rules = opt.get('lr_multipliers', None) or ()
  if hasattr(rules, 'items'):
    rules = tuple(rules.items())
  return tuple((str(pattern), float(factor)) for pattern, factor in rules)


def make_optimizer(config) -> Tuple[optax.GradientTransformation, Callable]:
  """SGD+momentum (L2 in the loss, as the TPU reference) or AdamW (decoupled decay).

  Gradients are clipped by their global norm first (optimizer.grad_clip_norm; 0 turns it
  off); optimizer.lr_multipliers, (regex, factor) pairs on the parameter path, scale the
  learning rate of parameter groups (see `scale_by_lr_multipliers`).
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config)
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  elif opt.name == 'adamw':
    mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: is_kernel(p), params)
    parts.append(optax.adamw(schedule, weight_decay=opt.weight_decay, mask=mask))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; use 'sgd' or 'adamw'.")
  rules = _multiplier_rules(opt)
  if rules:
    parts.append(scale_by_lr_multipliers(rules))
  return optax.chain(*parts), schedule


def l2_penalty(params, weight_decay: float):
  """weight_decay * sum(½‖w‖²) over conv/dense kernels only (not BN, not biases)."""
  leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if is_kernel(p)]
  return weight_decay * 0.5 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


# ----------------------------------------------------------------------------- state


def dummy_batch(config, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a training batch (DESIGN.md data contract), for init and eval_shape."""
  size = config.data.image_size
  n = config.data.max_instances
  batch = {
      'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
      'image_id': jax.ShapeDtypeStruct((batch_size,), jnp.int64 if jax.config.jax_enable_x64
                                       else jnp.int32),
      'orig_size': jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
      'scale': jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      'offset': jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      'valid_size': jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      'boxes': jax.ShapeDtypeStruct((batch_size, n, 4), jnp.float32),
      'classes': jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
      'is_crowd': jax.ShapeDtypeStruct((batch_size, n), jnp.bool_),
  }
  if config.data.with_masks:
    m = config.data.mask_size
    batch['masks'] = jax.ShapeDtypeStruct((batch_size, n, m, m), jnp.uint8)
  return batch


def init_variables(model, config, rng, batch_size: int = 1):
  """Model variables {'params', 'batch_stats', ...} for the config's input size."""
  batch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 dummy_batch(config, batch_size))
  rngs = {'params': rng, **{k: jax.random.fold_in(rng, i + 1)
                            for i, k in enumerate(RNG_STREAMS)}}
  variables = model.init(rngs, batch['image'], train=False, targets=batch)
  return parallel.unfreeze(variables)


def make_state(model, config, tx, rng):
  variables = init_variables(model, config, rng)
  params = variables.pop('params')
  return {'params': params, 'batch_stats': variables.get('batch_stats', {}),
          'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}


def abstract_state(model, config, tx, mesh):
  """ShapeDtypeStructs of the state with their shardings (no memory allocated)."""
  shapes = jax.eval_shape(functools.partial(make_state, model, config, tx),
                          jax.random.key(0))
  shardings = parallel.shardings_from_rules(
      shapes, mesh, tuple(config.partition_rules))
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_state(model, config, tx, mesh, rng):
  """Parameters created already sharded: jit(init, out_shardings=...)."""
  target = abstract_state(model, config, tx, mesh)
  shardings = jax.tree_util.tree_map(lambda s: s.sharding, target)
  state = jax.jit(functools.partial(make_state, model, config, tx),
                  out_shardings=shardings)(rng)
  if config.init_from:
    partial = config.get('init_from_partial', False)
    loaded = checkpoint.import_params(
        config.init_from, {'params': target['params'], 'batch_stats': target['batch_stats']},
        partial=partial)
    for name in ('params', 'batch_stats'):
      # A partial checkpoint (e.g. a converted backbone) replaces only what it holds.
      merged = traverse_util.flatten_dict(state[name])
      merged.update(traverse_util.flatten_dict(loaded.get(name, {})))
      state[name] = traverse_util.unflatten_dict(merged)
    state['opt_state'] = jax.jit(tx.init, out_shardings=shardings['opt_state'])(
        state['params'])
    logging.info('Initialised parameters from %s', config.init_from)
  return state, target


# ----------------------------------------------------------------------------- the step


def make_train_step(model, module, config, tx, schedule, root_key):
  """The pure step: (state, batch) -> (state, metrics). Jitted by the caller."""

  def train_step(state, batch):
    step_key = jax.random.fold_in(root_key, state['step'])
    rngs = {k: jax.random.fold_in(step_key, i) for i, k in enumerate(RNG_STREAMS)}

    def loss_fn(params):
      outputs, mutated = model.apply(
          {'params': params, 'batch_stats': state['batch_stats']}, batch['image'],
          train=True, targets=batch, rngs=rngs, mutable=['batch_stats'])
      task_loss, metrics = module.loss(outputs, batch, config)
      total = task_loss
      if config.optimizer.name == 'sgd' and config.optimizer.weight_decay:
        total = total + l2_penalty(params, config.optimizer.weight_decay)
      return total, (mutated.get('batch_stats', {}), task_loss, metrics)

    (total, (batch_stats, task_loss, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, loss=total, task_loss=task_loss,
                   grad_norm=optax.global_norm(grads), learning_rate=schedule(state['step']))
    new_state = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state,
                 'step': state['step'] + 1}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings, mesh):
  batch_sharding = parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------- metrics


class MetricWriter:
  """metrics.jsonl + TensorBoard events in the workdir; only process 0 writes."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.set_visible_devices([], 'GPU')
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('TensorBoard events disabled: %s', e)

  def write(self, step: int, metrics: Dict[str, float]):
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in metrics.items():
          tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and leaves at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. inside a notebook kernel thread).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def build(config, mesh=None):
  """Model module, Flax model, optimizer, schedule and mesh for a config."""
  mesh = mesh or parallel.make_mesh(config.mesh)
  module = model_module(config)
  model = module.Model(config)
  tx, schedule = make_optimizer(config)
  return module, model, tx, schedule, mesh


def train(config, workdir: str, *, mesh=None, evaluate_fn=None) -> Dict[str, Any]:
  """Trains for config.num_train_steps, resuming from workdir; returns the final state.

  evaluate_fn(state, step) -> metrics dict, called every eval_every_steps and at the end.
  """
  module, model, tx, schedule, mesh = build(config, mesh)
  init_key, root_key = jax.random.split(jax.random.key(config.seed))
  local_batch = parallel.local_batch_size(config.global_batch_size, mesh)

  mgr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  state, target = create_state(model, config, tx, mesh, init_key)
  restored = checkpoint.restore_latest(mgr, target)
  if restored is not None:
    state = restored
  start_step = int(jax.device_get(state['step']))
  shardings = jax.tree_util.tree_map(lambda s: s.sharding, target)
  step_fn = jit_train_step(make_train_step(model, module, config, tx, schedule, root_key),
                           shardings, mesh)
  writer = MetricWriter(workdir)
  total = config.num_train_steps
  if start_step >= total:
    logging.info('Training already finished at step %d.', start_step)
    return state

  from jaxdet.data import pipeline  # pylint: disable=g-import-not-at-top  (TF: only when training)
  batches = pipeline.train_iterator(
      config.data, batch_size=local_batch, seed=config.seed, start_step=start_step,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  logging.info('Training steps %d..%d, global batch %d on %s', start_step, total,
               config.global_batch_size, dict(mesh.shape))
  logging.info('Schedule: %s', describe_schedule(config, schedule))

  pending = None          # (step, metrics) of the previous step: checked one step late.
  window_start, window_step = time.time(), start_step
  loop_start = time.time()
  with _Preemption() as preemption:
    for step in range(start_step, total):
      batch = parallel.global_batch(next(batches), mesh)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        _check_finite(*pending)
      done = step + 1
      host = None  # This step's metrics on the host, once fetched (and checked).
      if done % config.log_every_steps == 0 or done == total:
        host = jax.device_get(metrics)
        _check_finite(done, host)
        elapsed = time.time() - window_start
        rate = (done - window_step) * config.global_batch_size / max(elapsed, 1e-9)
        eta = (total - done) * config.global_batch_size / max(rate, 1e-9)
        logging.info('step %d/%d loss %.4f lr %.4g  %.1f img/s  ETA %s', done, total,
                     float(host['loss']), float(host['learning_rate']), rate,
                     time.strftime('%H:%M:%S', time.gmtime(eta)))
        writer.write(done, dict(host, images_per_sec=rate))
        window_start, window_step = time.time(), done
      # Read once: a signal may land at any point of the step. With several processes they
      # must agree on the step to stop at, or one saves while another steps and both hang:
      # jax's preemption sync point (via orbax) gives every process the same answer.
      stop = (mgr.reached_preemption(done) if jax.process_count() > 1
              else preemption.requested)
      if done % config.checkpoint_every_steps == 0 or done == total or stop:
        if host is None:  # Never save a state whose loss is not finite.
          host = jax.device_get(metrics)
          _check_finite(done, host)
        checkpoint.save(mgr, done, state, force=stop)
      # Unchecked metrics are checked next step, while that step runs on the device.
      pending = (done, metrics) if host is None else None
      if evaluate_fn is not None and config.eval_every_steps and (
          done % config.eval_every_steps == 0) and done != total:
        writer.write(done, evaluate_fn(state, done))
      if stop:
        mgr.wait_until_finished()
        logging.warning('Stopped at step %d after SIGTERM; rerun to resume.', done)
        return state
  mgr.wait_until_finished()
  logging.info('Trained %d steps in %.1f s', total - start_step, time.time() - loop_start)
  if evaluate_fn is not None:
    writer.write(total, evaluate_fn(state, total))
  return state


def _check_finite(step, metrics):
  loss = float(jax.device_get(metrics['loss']))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'Loss is {loss} at step {step}. The last checkpoint in the workdir is the last good '
        'state; lower optimizer.learning_rate or raise warmup_steps and rerun.')
