r"""jaxdet entry point.

  python -m jaxdet.main --config=configs/spinenet49.py --workdir=runs/sn49
  python -m jaxdet.main --config=configs/spinenet49s.py:shapes --workdir=runs/demo
  python -m jaxdet.main --config=configs/spinenet49.py:shapes,runlocal --workdir=/tmp/smoke
  python -m jaxdet.main --config=... --workdir=DIR --mode=eval
  python -m jaxdet.main --config=... --workdir=DIR --mode=predict --images=photos/

`--config.a.b=value` overrides any field of the config; an unknown field is an error.
Training resumes from the newest checkpoint in --workdir.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from jaxdet import cli

cli.make_configs_importable()
FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  cli.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl, TensorBoard, predictions.')
  flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval', 'predict'],
                    'What to run.')
  flags.DEFINE_string('images', None, 'predict: an image file, a directory or a glob.')
  flags.DEFINE_string('output', None, 'predict: output directory (default WORKDIR/predictions).')
  flags.mark_flags_as_required(['config', 'workdir'])


def restore_for_inference(config, workdir, mesh):
  """Model pieces and {'params', 'batch_stats'} of the newest checkpoint in workdir."""
  from jaxdet import checkpoint, train  # pylint: disable=g-import-not-at-top
  module, model, tx, _, mesh = train.build(config, mesh)
  target = train.abstract_state(model, config, tx, mesh)
  state = checkpoint.restore_latest(checkpoint.manager(workdir, keep=config.keep_checkpoints),
                                    target)
  if state is None:
    raise FileNotFoundError(
        f'No checkpoint in {os.path.join(workdir, "checkpoints")}: train first '
        '(--mode=train) or point --workdir at a trained run.')
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return module, model, variables, int(state['step'])


def run(config, workdir, mode, images=None, output=None):
  """Everything main does, callable from Python (tests, notebooks)."""
  # TensorFlow is only the input pipeline: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet import evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  from jaxdet.data import pipeline  # pylint: disable=g-import-not-at-top

  parallel.initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh(config.mesh)

  if mode in ('train', 'train_and_eval'):
    # Fail on a missing dataset before compiling anything.
    pipeline.check_available(config.data, config.data.train_split)
    evaluate_fn = None  # Training alone.
    if mode == 'train_and_eval':
      pipeline.check_available(config.data, config.data.eval_split)
      module = train.model_module(config)
      evaluator = evaluate.make_evaluator(config, module.Model(config), module, mesh)

      def evaluate_fn(state, step):
        del step
        return evaluator({'params': state['params'], 'batch_stats': state['batch_stats']})
    train.train(config, workdir, mesh=mesh, evaluate_fn=evaluate_fn)
    return None
  if mode == 'eval':
    pipeline.check_available(config.data, config.data.eval_split)
    module, model, variables, step = restore_for_inference(config, workdir, mesh)
    metrics = evaluate.evaluate(config, model, module, variables, mesh)
    train.MetricWriter(workdir).write(step, metrics)
    print(json.dumps({'step': step, **metrics}, indent=1))
    return metrics
  if mode == 'predict':
    from jaxdet import predict  # pylint: disable=g-import-not-at-top
    if not images:
      raise app.UsageError('--mode=predict needs --images=FILE|DIR|GLOB')
    module, model, variables, _ = restore_for_inference(config, workdir, mesh)
    return predict.predict_files(config, model, module, variables, mesh, images,
                                 output or os.path.join(workdir, 'predictions'))
  raise ValueError(mode)


class _QuietLibraries:
  """Keeps orbax's and tfds' per-step INFO chatter out of the console; warnings pass."""

  def filter(self, record):
    return record.levelno >= 30 or not any(
        lib in record.pathname for lib in ('orbax', 'tensorflow_datasets'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  logging.get_absl_handler().addFilter(_QuietLibraries())
  run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.images, FLAGS.output)


if __name__ == '__main__':
  define_flags()
  app.run(main)
