r"""Proxy architecture search over SpineNet's scale-permuted search space.

  python -m jaxdet.search --config=configs/spinenet49s.py:demo --workdir=runs/search \
      --algorithm=evolution --num_candidates=40 --config.num_train_steps=300

The paper (Du et al. 2020, Sec. 3.1 and 4.1) searched block orderings, cross-scale connections
and block adjustments with an RL controller, scoring each candidate by the AP of a short proxy
training. This program runs the same loop with the two controllers that need no learned policy:

  random      every candidate is a fresh `spinenet_search.sample_spec`;
  evolution   regularized evolution (Real et al. 2019, "aging evolution"): the first
              `population` candidates are random; after that, `sample_size` members of the
              living population (the last `population` trained) are drawn at random, the best
              of them is mutated (`spinenet_search.mutate`, one change) and trained, and the
              oldest member dies.

Each candidate trains the given config (the proxy task: pick a short, small one, e.g. the CPU
demo recipe with fewer steps; on a pod, SpineNet-49S at 512 px for a few epochs as the paper)
with `model.backbone.spec` replaced by the candidate, then is evaluated on the config's eval
split. Everything lands in --workdir:

  candidates/NNN/spec.json      the candidate's block specification (loads with
                                --config.model.backbone.spec=.../spec.json)
  candidates/NNN/result.json    its AP, parameters, parent and seconds
  candidates/NNN/               the training run itself (metrics.jsonl, checkpoints)
  leaderboard.json / .md        all candidates, best AP first

A rerun with the same flags resumes: finished candidates are read back, not retrained, and the
controller makes the same choices from the same results.
"""

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from jaxdet import cli

cli.make_configs_importable()

ALGORITHMS = ('random', 'evolution')


def define_flags():
  cli.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Search directory (candidates, leaderboard).')
  flags.DEFINE_enum('algorithm', 'evolution', ALGORITHMS, 'Controller.')
  flags.DEFINE_integer('num_candidates', 20, 'Candidates to train in all.')
  flags.DEFINE_integer('population', 8, 'Living population (evolution); also the number of '
                       'random candidates it starts from.')
  flags.DEFINE_integer('sample_size', 3, 'Tournament size (evolution).')
  flags.DEFINE_integer('seed', 0, 'Seed of the controller (specs, tournaments, mutations).')
  flags.DEFINE_string('metric', 'bbox/AP', 'Evaluation metric that ranks candidates.')


# --------------------------------------------------------------------------- controller


def propose(index: int, history: List[Dict[str, Any]], *, algorithm: str, population: int,
            sample_size: int, seed: int, metric: str, space: Dict[str, Any]):
  """The spec of candidate `index` given the results of candidates 0..index-1.

  history: result dicts in training order, each with 'specs' (a spec tuple) and `metric`.
  space: keyword arguments of `sample_spec` / `mutate` (levels, block allocation, ...).
  Returns (specs, parent index or None). Deterministic in (seed, index, history).
  """
  from jaxdet.models.backbones import spinenet_search  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, index])
  mutate_space = {k: v for k, v in space.items() if k != 'block_allocation'}
  if algorithm == 'random' or index < population:
    return spinenet_search.sample_spec(rng, **space), None
  alive = list(range(max(0, index - population), index))
  contenders = rng.choice(alive, size=min(sample_size, len(alive)), replace=False)
  parent = max(contenders, key=lambda i: (history[i][metric], -i))
  return spinenet_search.mutate(history[parent]['specs'], rng, **mutate_space), int(parent)


# --------------------------------------------------------------------------- candidates


def train_candidate(config, workdir: str, mesh=None) -> Dict[str, float]:
  """Trains `config` in workdir (resuming) and returns its final evaluation metrics."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdet import evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
  module = train.model_module(config)
  evaluator = evaluate.make_evaluator(config, module.Model(config), module, mesh)
  state = train.train(config, workdir, mesh=mesh)
  metrics = evaluator({'params': state['params'], 'batch_stats': state['batch_stats']})
  metrics['params'] = float(sum(x.size for x in jax.tree_util.tree_leaves(state['params'])))
  return metrics


def leaderboard(history: List[Dict[str, Any]], metric: str) -> List[Dict[str, Any]]:
  """Rows of the finished candidates, best `metric` first (ties: earlier first)."""
  rows = [{k: v for k, v in r.items() if k != 'specs'} for r in history]
  return sorted(rows, key=lambda r: (-r[metric], r['candidate']))


def write_leaderboard(workdir: str, rows: List[Dict[str, Any]], metric: str):
  with open(os.path.join(workdir, 'leaderboard.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  lines = [f'| rank | candidate | parent | {metric} | AP50 | params (M) | seconds | spec |',
           '|---:|---:|---:|---:|---:|---:|---:|---|']
  for rank, r in enumerate(rows, 1):
    parent = '' if r['parent'] is None else f"{r['parent']:03d}"
    lines.append(f"| {rank} | {r['candidate']:03d} | {parent} | {r[metric]:.4f} | "
                 f"{r.get('bbox/AP50', float('nan')):.4f} | {r['params'] / 1e6:.2f} | "
                 f"{r['seconds']:.0f} | {r['spec_file']} |")
  with open(os.path.join(workdir, 'leaderboard.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def search(config, workdir: str, *, algorithm: str = 'evolution', num_candidates: int = 20,
           population: int = 8, sample_size: int = 3, seed: int = 0,
           metric: str = 'bbox/AP',
           train_fn: Optional[Callable[[Any, str], Dict[str, float]]] = None):
  """Runs the search; returns the leaderboard rows (best first).

  config: the proxy task; its `model.backbone` must be a SpineNet (`name='spinenet'`), whose
    min/max levels bound the search space.
  train_fn(config, candidate_workdir) -> metrics: trains and evaluates one candidate
    (default `train_candidate`).
  """
  from jaxdet.models.backbones import spinenet_search  # pylint: disable=g-import-not-at-top
  if algorithm not in ALGORITHMS:
    raise ValueError(f'algorithm must be one of {ALGORITHMS}, got {algorithm!r}.')
  if config.model.backbone.get('name') != 'spinenet':
    raise ValueError('The search space is SpineNet\'s: use a config whose '
                     f'model.backbone.name is "spinenet" (got {config.model.backbone.name!r}).')
  if algorithm == 'evolution' and sample_size < 1:
    raise ValueError(f'sample_size must be >= 1, got {sample_size}.')
  train_fn = train_fn or train_candidate
  backbone = config.model.backbone
  space = dict(min_level=backbone.get('min_level', 3), max_level=backbone.get('max_level', 7))
  os.makedirs(workdir, exist_ok=True)
  history: List[Dict[str, Any]] = []
  for index in range(num_candidates):
    cand_dir = os.path.join(workdir, 'candidates', f'{index:03d}')
    spec_file = os.path.join(cand_dir, 'spec.json')
    result_file = os.path.join(cand_dir, 'result.json')
    if os.path.exists(result_file):  # Finished earlier: the controller sees the same history.
      with open(result_file) as f:
        result = json.load(f)
      result['specs'] = spinenet_search.load_spec(spec_file)
      history.append(result)
      continue
    specs, parent = propose(index, history, algorithm=algorithm, population=population,
                            sample_size=sample_size, seed=seed, metric=metric, space=space)
    os.makedirs(cand_dir, exist_ok=True)
    with open(spec_file, 'w') as f:
      f.write(spinenet_search.specs_to_json(specs))
    cand_config = config.copy_and_resolve_references()
    with cand_config.unlocked():
      cand_config.model.backbone.spec = spec_file
    start = time.time()
    metrics = train_fn(cand_config, cand_dir)
    if metric not in metrics:
      raise KeyError(f'The evaluation returned no {metric!r} (got {sorted(metrics)}); '
                     'pass --metric with one of them.')
    result = {'candidate': index, 'parent': parent, 'spec_file': spec_file,
              'seconds': time.time() - start,
              **{k: float(v) for k, v in metrics.items()}}
    with open(result_file, 'w') as f:
      json.dump(result, f, indent=1)
    logging.info('Candidate %03d (parent %s): %s %.4f', index, parent, metric, result[metric])
    history.append(dict(result, specs=specs))
    write_leaderboard(workdir, leaderboard(history, metric), metric)
  rows = leaderboard(history, metric)
  write_leaderboard(workdir, rows, metric)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from jaxdet import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  f = flags.FLAGS
  rows = search(f.config, f.workdir, algorithm=f.algorithm, num_candidates=f.num_candidates,
                population=f.population, sample_size=f.sample_size, seed=f.seed,
                metric=f.metric)
  best = rows[0]
  print(f"Best of {len(rows)}: candidate {best['candidate']:03d} {f.metric} "
        f"{best[f.metric]:.4f}, spec {best['spec_file']}; "
        f"leaderboard: {os.path.join(f.workdir, 'leaderboard.md')}")


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
