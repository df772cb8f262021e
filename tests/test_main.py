"""End to end: main.run trains, evaluates, predicts; the CLIs fail early and clearly."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxdet import main
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_train_eval_predict(tmp_path):
  config = tiny.tiny_config(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  main.run(config, workdir, 'train_and_eval')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, 7))
  final = [l for l in lines if 'bbox/AP' in l]
  assert len(final) == 1 and final[0]['step'] == 6
  for key in ('bbox/AP', 'bbox/AP50', 'bbox/AP75', 'bbox/APs', 'bbox/APm', 'bbox/APl'):
    assert key in final[0]

  metrics = main.run(config, workdir, 'eval')
  assert metrics['eval/images'] == config.data.num_eval_images

  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (90, 130, 3), np.uint8)).save(images / 'a.png')
  Image.fromarray(rng.integers(0, 255, (60, 60), np.uint8)).save(images / 'gray.jpg')
  (images / 'broken.jpg').write_bytes(b'not an image')
  out = main.run(config, workdir, 'predict', images=str(images), output=str(tmp_path / 'pred'))
  assert sorted(os.path.basename(p) for p in out) == ['a.png', 'gray.jpg']
  assert (tmp_path / 'pred' / 'a.png').exists()
  assert (tmp_path / 'pred' / 'detections.json').exists()
  for dets in out.values():
    for d in dets:
      x1, y1, x2, y2 = d['box']
      assert 0 <= x1 <= x2 and 0 <= y1 <= y2


def test_eval_without_checkpoint_says_what_to_do(tmp_path):
  config = tiny.tiny_config(str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='train first'):
    main.run(config, str(tmp_path / 'empty'), 'eval')


def test_unknown_config_key_is_an_error(tmp_path):
  r = _cli('jaxdet.main', '--config=configs/spinenet49s.py:shapes,runlocal',
           '--config.model.not_a_field=1', f'--workdir={tmp_path}')
  assert r.returncode != 0
  assert 'not_a_field' in r.stderr


def test_unknown_variant_is_an_error(tmp_path):
  r = _cli('jaxdet.main', '--config=configs/spinenet49s.py:shapez', f'--workdir={tmp_path}')
  assert r.returncode != 0
  assert 'shapez' in r.stderr


def test_missing_coco_stops_at_once_with_instructions(tmp_path):
  r = _cli('jaxdet.main', '--config=configs/spinenet49.py:runlocal',
           f'--config.data.data_dir={tmp_path}/nothing', f'--workdir={tmp_path}/run')
  assert r.returncode != 0
  assert 'tfds build coco/2017' in r.stderr + r.stdout
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_summary_cli_prints_params_and_flops():
  r = _cli('jaxdet.summary', '--config=configs/spinenet49s.py:shapes,runlocal')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'params: ' in r.stdout
  assert 'backbone' in r.stdout and 'head' in r.stdout
  assert 'GFLOPs' in r.stdout
