"""Proxy search: controllers, leaderboard, resume, and one real candidate trained."""

import json
import os

import ml_collections
import pytest

from jaxdet import search
from jaxdet.models.backbones import spinenet_search
import tiny


def spinenet_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(backbone=dict(
      name='spinenet', min_level=3, max_level=7, spec='')))
  return c


def fake_train(scores):
  """A train_fn whose AP is read from `scores` by candidate directory; records its calls."""
  calls = []

  def train_fn(config, workdir):
    index = int(os.path.basename(workdir))
    calls.append((index, config.model.backbone.spec))
    # The candidate's spec must load and validate.
    spinenet_search.load_spec(config.model.backbone.spec)
    return {'bbox/AP': scores[index], 'bbox/AP50': 2 * scores[index], 'params': 1e6}

  return train_fn, calls


def test_random_search_writes_sorted_leaderboard(tmp_path):
  scores = [0.1, 0.5, 0.3, 0.2]
  train_fn, calls = fake_train(scores)
  rows = search.search(spinenet_config(), str(tmp_path), algorithm='random',
                       num_candidates=4, train_fn=train_fn)
  assert [r['candidate'] for r in rows] == [1, 2, 3, 0]
  assert all(r['parent'] is None for r in rows)
  specs = [spinenet_search.load_spec(spec) for _, spec in calls]
  assert len(set(specs)) == 4  # Four different random architectures.
  with open(tmp_path / 'leaderboard.json') as f:
    assert [r['candidate'] for r in json.load(f)] == [1, 2, 3, 0]
  table = (tmp_path / 'leaderboard.md').read_text().splitlines()
  assert table[2].startswith('| 1 | 001 |') and '0.5000' in table[2]


def test_evolution_mutates_the_tournament_winner_and_ages(tmp_path):
  population, sample_size = 3, 3
  scores = [0.2, 0.9, 0.4, 0.1, 0.3, 0.5, 0.6]
  train_fn, calls = fake_train(scores)
  rows = search.search(spinenet_config(), str(tmp_path), algorithm='evolution',
                       num_candidates=len(scores), population=population,
                       sample_size=sample_size, train_fn=train_fn)
  by_index = {r['candidate']: r for r in rows}
  specs = [spinenet_search.load_spec(spec) for _, spec in calls]
  for i in range(population):
    assert by_index[i]['parent'] is None
  for i in range(population, len(scores)):
    # The tournament holds the whole living population (sample_size == population): the
    # parent is the best of the last `population` candidates, so the old best dies out.
    alive = range(i - population, i)
    assert by_index[i]['parent'] == max(alive, key=lambda j: scores[j])
    parent = specs[by_index[i]['parent']]
    changed = sum(a != b for a, b in zip(parent, specs[i]))
    assert specs[i] != parent and changed <= 2  # One mutation (a swap touches two blocks).
  assert by_index[4]['parent'] == 1 and by_index[5]['parent'] == 2  # 1 has aged out at 5.


def test_rerun_resumes_without_retraining(tmp_path):
  scores = [0.3, 0.1, 0.6, 0.2, 0.4]
  train_fn, calls = fake_train(scores)
  kwargs = dict(algorithm='evolution', population=2, sample_size=2, train_fn=train_fn)
  search.search(spinenet_config(), str(tmp_path), num_candidates=3, **kwargs)
  first = list(calls)
  rows = search.search(spinenet_config(), str(tmp_path), num_candidates=5, **kwargs)
  assert [i for i, _ in calls[len(first):]] == [3, 4]
  assert len(rows) == 5

  # The same flags from scratch make the same choices.
  train_fn2, calls2 = fake_train(scores)
  search.search(spinenet_config(), str(tmp_path / 'again'), num_candidates=5,
                **dict(kwargs, train_fn=train_fn2))
  read = lambda calls: [spinenet_search.load_spec(s) for _, s in calls]
  assert read(calls2) == read(calls)


def test_rejects_other_backbones_and_bad_flags(tmp_path):
  c = spinenet_config()
  c.model.backbone.name = 'resnet'
  with pytest.raises(ValueError, match='spinenet'):
    search.search(c, str(tmp_path), train_fn=lambda *_: {})
  with pytest.raises(ValueError, match='algorithm'):
    search.search(spinenet_config(), str(tmp_path), algorithm='rl', train_fn=lambda *_: {})
  with pytest.raises(KeyError, match='segm/AP'):
    search.search(spinenet_config(), str(tmp_path), num_candidates=1, metric='segm/AP',
                  train_fn=lambda *_: {'bbox/AP': 0.0})


def test_a_random_candidate_trains_and_is_ranked(tmp_path):
  """One real candidate: a random spec trains a few steps on shapes and gets an AP."""
  c = tiny.tiny_config(str(tmp_path / 'tfds'), backbone='spinenet')
  c.num_train_steps = 2
  c.checkpoint_every_steps = 2
  c.data.shapes.num_validation = 8
  c.eval_batch_size = 8
  rows = search.search(c, str(tmp_path / 'search'), algorithm='random', num_candidates=1)
  (row,) = rows
  assert 0.0 <= row['bbox/AP'] <= 1.0 and row['params'] > 0
  metrics_file = tmp_path / 'search' / 'candidates' / '000' / 'metrics.jsonl'
  steps = [json.loads(line)['step'] for line in metrics_file.read_text().splitlines()]
  assert steps[-1] == 2
