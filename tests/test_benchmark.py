"""The benchmark CLI's pieces run on a tiny config and report every column (no timing asserted)."""

import math

from jaxdet import benchmark
import tiny

MODEL_COLUMNS = ('images/s', 'step_ms', 'compile_s', 'peak_memory_GiB', 'GFLOPs/step',
                 'TFLOP/s', 'MFU')


def test_train_and_infer_rows(tmp_path):
  for mode in ('train', 'infer'):
    config = tiny.tiny_config(str(tmp_path / 'tfds'))
    row = benchmark.benchmark_model(config, mode, 4, steps=1, warmup=0)
    for column in MODEL_COLUMNS:
      assert column in row
    assert row['images/s'] > 0 and row['GFLOPs/step'] > 0
    assert math.isnan(row['MFU'])  # No known peak for a CPU.
    table = benchmark.format_table(row)
    assert all(column in table for column in MODEL_COLUMNS)


def test_data_row(tmp_path):
  config = tiny.tiny_config(str(tmp_path / 'tfds'))
  row = benchmark.benchmark_data(config, 4, steps=2, warmup=1)
  assert row['images/s'] > 0


def test_device_peaks():
  class Fake:
    device_kind = 'NVIDIA H100 80GB HBM3'
  assert benchmark.device_peak(Fake()) == 989e12


def test_matching_row_for_detr():
  from configs import detr_r50
  config = detr_r50.get_config('runlocal')
  row = benchmark.benchmark_matching(config, 4, steps=1, warmup=0)
  assert row['match_ms'] > 0 and row['step_ms'] > 0
  assert 0 < row['share'] < 10 and row['layers'] == 1 and row['queries'] == 10


def test_matching_mode_refuses_other_models(tmp_path):
  from absl import app
  import pytest
  config = tiny.tiny_config(str(tmp_path / 'tfds'))
  with pytest.raises(app.UsageError, match='matching'):
    benchmark.benchmark_matching(config, 4, steps=1, warmup=0)


def test_backbone_row(tmp_path):
  config = tiny.tiny_config(str(tmp_path / 'tfds'))
  row = benchmark.benchmark_backbone(config, 4, steps=1, warmup=0)
  for column in ('forward_ms', 'train_ms', 'forward_GFLOPs', 'train_GFLOPs'):
    assert row[column] > 0
  assert row['train_GFLOPs'] > row['forward_GFLOPs']
