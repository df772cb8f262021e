"""The notebooks run top to bottom on a freshly trained tiny run; the helpers they share.

Each notebook is executed headless (nbclient, one python3 kernel each, matplotlib's Agg
backend) with its `parameters` cell overridden papermill-style by a cell inserted after it.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import nbformat
import numpy as np
from pycocotools.coco import COCO
import pytest

from jaxdet import inspect as ji

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
NOTEBOOKS = ('inspect_detections', 'anchors_and_matching', 'spinenet_architecture')

# The notebook runs check that the code works, not its speed: XLA's CPU optimisations
# cost more than half of every compile of the tiny model (as model_testing.compile_quickly).
QUICK_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLBACKEND='Agg', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=QUICK_XLA,
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache
  return env


def _path(name):
  return os.path.join(ROOT, 'notebooks', f'{name}.ipynb')


def execute(name, **params):
  """Runs notebook `name` with `params` replacing its parameters; returns its text output."""
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(_path(name), as_version=4)
  where = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(where) == 1, f'{name}: one cell must be tagged "parameters"'
  injected = nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in params.items()))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(where[0] + 1, injected)
  # Every figure the notebook drew is still open under Agg: count them.
  nb.cells.append(nbformat.v4.new_code_cell(
      'import matplotlib.pyplot as plt\nprint("figures:", len(plt.get_fignums()))'))
  client = NotebookClient(nb, kernel_name='python3', timeout=300,
                          resources={'metadata': {'path': ROOT}})
  client.execute(env=_env())
  return '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs if o.output_type == 'stream')


def figures(text):
  return int(text.rsplit('figures:', 1)[1].split()[0])


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A 6-step tiny RetinaNet run (checkpoint + config.json), trained as `jaxdet.main` does."""
  root = tmp_path_factory.mktemp('notebook_run')
  workdir = str(root / 'run')
  script = (f'import sys\nsys.path[:0] = [{ROOT!r}, {TESTS!r}]\n'
            'import tiny\nfrom jaxdet import main\n'
            f'main.run(tiny.tiny_config({str(root / "tfds")!r}), {workdir!r}, "train")\n')
  # A separate process, so that the quick XLA flags apply (they are read at start-up).
  r = subprocess.run([sys.executable, '-c', script], env=_env(), capture_output=True,
                     text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


# ----------------------------------------------------------------------------- notebooks


def test_inspect_detections_runs(trained_run):
  # Six steps leave every score near the 0.01 prior: keep them all so that there is
  # something to draw and to score.
  text = execute('inspect_detections', CONFIG='', WORKDIR=trained_run,
                 OVERRIDES={'model.postprocess.score_threshold': 0.0}, MIN_SCORE=0.0,
                 TOP_K=5, NUM_IMAGES=4)
  assert 'retinanet / resnet at step 6' in text
  assert '16 validation images' in text
  for name in ('circle', 'square', 'triangle', 'ellipse', 'star', 'cross', 'mean'):
    assert f'| {name} |' in text
  assert 'COCOeval summary: AP' in text
  assert 'Masks (segm)' not in text  # A box model's results carry no masks.
  assert figures(text) == 2


def test_anchors_and_matching_runs():
  text = execute('anchors_and_matching', IMAGE_INDEX=1, NUM_PROPOSALS=100)
  assert 'P3: grid 16x16, 9 anchors per location' in text
  assert 'P7: grid 1x1, 9 anchors per location' in text
  assert '| gt | class | size | best_iou | positives |' in text
  assert 'sampled' in text and 'foreground' in text
  assert text.count('target -> query') == 2
  assert figures(text) == 4


def test_spinenet_architecture_runs():
  text = execute('spinenet_architecture', CONFIG='configs/spinenet49s.py:runlocal')
  for level in range(3, 8):
    assert f'level {level} (stride {2**level}): (1, {128 // 2**level}, {128 // 2**level}, 32)' \
        in text
  assert '| 16 | 6 | bottleneck (output) | 12,14 |' in text
  assert 'GFLOPs' in text and 'multiply-adds' in text
  assert figures(text) == 2


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_notebooks_are_clean(name):
  nb = nbformat.read(_path(name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
  assert 'pip' in code[0].source  # The first code cell installs jaxdet where it is missing.
  assert 'parameters' in code[1].metadata.get('tags', [])


# ----------------------------------------------------------------------------- helpers


def _quiet_coco(dataset):
  gt = COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def test_per_class_ap_and_curves_on_a_hand_made_case():
  gt = _quiet_coco({
      'images': [{'id': 1, 'width': 100, 'height': 100}, {'id': 2, 'width': 100, 'height': 100}],
      'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}, {'id': 3, 'name': 'c'}],
      'annotations': [
          {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 40, 30], 'area': 1200,
           'iscrowd': 0},
          {'id': 2, 'image_id': 2, 'category_id': 2, 'bbox': [50, 20, 30, 30], 'area': 900,
           'iscrowd': 0},
          {'id': 3, 'image_id': 2, 'category_id': 2, 'bbox': [10, 60, 20, 20], 'area': 400,
           'iscrowd': 0},
      ]})
  results = [
      # Class a: exact.
      {'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 40, 30], 'score': 0.9},
      # Class b: a false positive ranked first, then a box with IoU 720 / 1080 = 2/3 with the
      # first object; the second object is missed.
      {'image_id': 2, 'category_id': 2, 'bbox': [80, 80, 10, 10], 'score': 0.95},
      {'image_id': 2, 'category_id': 2, 'bbox': [56, 20, 30, 30], 'score': 0.8},
  ]
  evaluator = ji.coco_eval(gt, results, 'bbox')
  assert 'segmentation' not in results[0]
  ap = ji.per_class_ap(evaluator)
  # Class b where the match counts: precision 0 then 1/2 at recall 1/2; COCO's envelope is
  # 1/2 for the 51 recall thresholds 0..0.5 and 0 above, so 51 * 0.5 / 101.
  b = 51 * 0.5 / 101
  # IoU 2/3 passes the thresholds 0.5, 0.55, 0.6, 0.65: 4 of 10.
  np.testing.assert_allclose(ap['AP'], [1.0, 0.4 * b, -1.0], atol=1e-9)
  np.testing.assert_allclose(ap['AP50'], [1.0, b, -1.0], atol=1e-9)
  np.testing.assert_allclose(ap['AP75'], [1.0, 0.0, -1.0], atol=1e-9)
  np.testing.assert_allclose(ap['AR'], [1.0, 0.4 * 0.5, -1.0], atol=1e-9)
  np.testing.assert_array_equal(ap['num_gt'], [1, 2, 0])
  np.testing.assert_allclose(np.mean(ap['AP'][:2]), evaluator.stats[0], atol=1e-9)

  recall, precision = ji.pr_curves(evaluator, 0.5)
  np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
  np.testing.assert_allclose(precision[0], 1.0)
  np.testing.assert_allclose(precision[1], np.where(np.arange(101) <= 50, 0.5, 0.0))
  np.testing.assert_allclose(precision[2], -1.0)
  _, mean_curve = ji.pr_curves(evaluator, None)
  np.testing.assert_allclose(mean_curve[1], np.where(np.arange(101) <= 50, 0.2, 0.0))
  with pytest.raises(ValueError, match='not one of the thresholds'):
    ji.pr_curves(evaluator, 0.52)
  table = ji.per_class_table(evaluator, ['a', 'b', 'c'])
  assert '| b | 0.101 | 0.252 | 0.000 | 0.200 | 2 |' in table
  assert '| mean | 0.550 | 0.626 | 0.500 | 0.600 | 3 |' in table
  with pytest.raises(ValueError, match='score_threshold'):
    ji.coco_eval(gt, [], 'bbox')


def _valid_taps(size, kernel):
  """Output positions x kernel taps that land inside the input, SAME padding, stride 1."""
  pad = kernel // 2
  return sum(1 for o in range(size) for k in range(kernel) if 0 <= o + k - pad < size)


def test_module_costs_counts_each_child_in_closed_form():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, *, train):
      del train
      x = nn.Conv(4, (3, 3), padding='SAME', use_bias=False, name='conv')(x)
      x = jax.nn.relu(x).reshape(x.shape[0], -1)  # [B, H*W*4]
      return nn.Dense(5, name='dense')(x)

  net = Net()
  x = jax.ShapeDtypeStruct((2, 8, 6, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
  costs = ji.module_costs(net, variables, x, train=False)
  conv, dense = costs['children']
  assert (conv['name'], conv['type'], conv['inputs'], conv['output']) == (
      'conv', 'Conv', [(2, 8, 6, 3)], (2, 8, 6, 4))
  assert (dense['inputs'], dense['output']) == ([(2, 192)], (2, 5))
  assert (conv['params'], dense['params'], costs['params']) == (108, 965, 1073)
  # XLA counts the multiply-adds of the taps that fall inside the image (2 FLOPs each).
  assert conv['flops'] == 2 * 2 * 3 * 4 * _valid_taps(8, 3) * _valid_taps(6, 3)
  assert dense['flops'] >= 2 * 2 * 192 * 5
  assert costs['flops'] >= conv['flops'] + dense['flops']
  assert costs['output'] == (2, 5)


def test_spinenet_block_table_accounts_for_every_parameter():
  from jaxdet.models.backbones import spinenet  # pylint: disable=g-import-not-at-top
  net = spinenet.SpineNet(model_id='49')
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
  costs = ji.module_costs(net, variables, x, train=False, flops=False)
  rows = ji.spinenet_block_table(spinenet.SPINENET_BLOCK_SPECS, costs)
  assert len(rows) == 2 + 15 + 5 + 1
  assert rows[-1]['block'] == 'other' and rows[-1]['params'] == 0
  assert sum(r['params'] for r in rows) == costs['params']
  np.testing.assert_allclose(costs['params'], 21.83e6, rtol=1e-3)  # spinenet.py docstring
  # The last spec is block 16, the L6 output fed by blocks 12 and 14.
  last = rows[16]
  assert (last['block'], last['level'], last['parents'], last['output']) == (
      16, 6, '12,14', (1, 4, 4, 1024))
  assert {r['block']: r['output'] for r in rows[17:22]} == {
      f'endpoint{l}': (1, 256 // 2**l, 256 // 2**l, 256) for l in range(3, 8)}


def test_input_pixels_and_denormalize_undo_the_pipeline():
  boxes = np.array([[10.0, 20.0, 30.0, 60.0]], np.float32)
  out = ji.to_input_pixels(boxes, scale=np.array([0.5, 2.0]), offset=np.array([3.0, 4.0]))
  np.testing.assert_allclose(out, [[10 * 2 - 4, 20 * 0.5 - 3, 30 * 2 - 4, 60 * 0.5 - 3]])
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_array_equal(ji.denormalize((rgb / 255.0 - mean) / std), rgb)


def test_random_proposals_lie_inside_the_image():
  rng = np.random.default_rng(0)
  gt = np.array([[10, 10, 50, 40], [60, 70, 120, 126]], np.float32)
  for boxes in (gt, np.zeros((0, 4), np.float32)):
    p = ji.random_proposals(rng, boxes, 101, (128, 100))
    assert p.shape == (101, 4) and p.dtype == np.float32
    assert np.all(p[:, 0] >= 0) and np.all(p[:, 2] <= 100)
    assert np.all(p[:, 1] >= 0) and np.all(p[:, 3] <= 128)
    assert np.all(p[:, 2] - p[:, 0] >= 2 - 1e-5) and np.all(p[:, 3] - p[:, 1] >= 2 - 1e-5)


def test_match_summary_counts_positives_per_level():
  # Five anchors: three on level 3, two on level 4; two objects.
  labels = np.array([1, 0, 1, 1, -1])
  matched = np.array([0, 0, 1, 1, 0])
  iou = np.array([[0.6, 0.1], [0.2, 0.0], [0.1, 0.7], [0.0, 0.55], [0.45, 0.0]])
  rows = ji.match_summary(labels, matched, iou, level_sizes=[3, 2], levels=[3, 4])
  assert rows == [{'gt': 0, 'best_iou': 0.6, 'positives': 1, 'P3': 1, 'P4': 0},
                  {'gt': 1, 'best_iou': 0.7, 'positives': 2, 'P3': 1, 'P4': 1}]


def test_show_detections_draws_boxes_and_masks():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  batch = {'image': np.zeros((2, 64, 64, 3), np.float32), 'image_id': np.array([5, -1]),
           'orig_size': np.array([[32, 48], [64, 64]]), 'scale': np.array([[1.0, 1.0]] * 2),
           'offset': np.zeros((2, 2)), 'boxes': np.zeros((2, 3, 4), np.float32),
           'classes': np.array([[0, -1, -1], [-1, -1, -1]])}
  batch['boxes'][0, 0] = [4, 4, 20, 20]
  detections = {'boxes': np.array([[[2, 2, 10, 12], [5, 5, 30, 30], [0, 0, 0, 0]]] * 2, float),
                'scores': np.array([[0.9, 0.2, 0.0]] * 2), 'classes': np.array([[1, 0, -1]] * 2),
                'num': np.array([2, 2]), 'masks': np.ones((2, 3, 4, 4), np.float32)}
  fig = ji.show_detections(batch, detections, ['x', 'y'], min_score=0.1, columns=2)
  ax = fig.axes[0]
  # The image, then one shaded mask per kept detection; one rectangle per box (1 gt + 2).
  assert len(ax.images) == 3
  assert len(ax.patches) == 3
  assert [t.get_text() for t in ax.texts] == ['y 0.90', 'x 0.20']
  assert ax.images[0].get_array().shape[:2] == (32, 48)  # Padding cropped away.
  mask = ax.images[1].get_array()[..., 3] > 0
  assert mask[2:12, 2:10].all() and not mask[13:].any()  # Pasted inside its box only.
  plt.close(fig)
  overlay = ji.detection_overlay(detections, 0, batch, min_score=0.5)
  assert overlay[0].shape == (1, 4) and overlay[3].shape == (1, 64, 64)


def test_load_config_from_a_file_with_variants_and_from_a_workdir(tmp_path):
  config = ji.load_config('configs/spinenet49s.py:shapes,runlocal',
                          overrides={'model.head.num_filters': 8})
  assert config.data.name == 'shapes' and config.data.image_size == 128
  assert config.model.head.num_filters == 8
  with pytest.raises(KeyError, match='not_a_field'):
    ji.load_config('configs/spinenet49s.py', overrides={'model.not_a_field': 1})
  with pytest.raises(FileNotFoundError, match='config.json'):
    ji.load_config('', str(tmp_path))
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort())
  again = ji.load_config('', str(tmp_path))
  assert isinstance(again, ml_collections.ConfigDict)
  assert json.loads(again.to_json()) == json.loads(config.to_json_best_effort())


def test_detr_targets_pad_and_normalise():
  boxes, classes, valid = ji.detr_targets(
      [np.array([[0, 0, 50, 20], [10, 30, 30, 40]]), np.zeros((0, 4))],
      [np.array([3, 1]), np.zeros((0,))], image_size=(40, 100))
  np.testing.assert_allclose(boxes[0], [[0.25, 0.25, 0.5, 0.5], [0.2, 0.875, 0.2, 0.25]])
  np.testing.assert_array_equal(boxes[1], 0.0)
  np.testing.assert_array_equal(classes, [[3, 1], [-1, -1]])
  np.testing.assert_array_equal(valid, [[True, True], [False, False]])
  logits, pred = ji.random_detr_outputs(np.random.default_rng(0), 2, 7, 3)
  assert logits.shape == (2, 7, 4) and pred.shape == (2, 7, 4)
  assert np.all((pred[..., :2] >= 0.1) & (pred[..., :2] <= 0.9))
