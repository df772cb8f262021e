"""Plots and tables for looking inside a model: the pieces the notebooks in notebooks/ share.

* Configs and runs: `load_config` (a config file with variants, or the `config.json` that
  `jaxdet.main` writes into a workdir).
* Detections: `predict_split` (the eval split through `postprocess`), `show_detections`
  (boxes, labels and masks over the network's input canvas).
* COCO evaluation per class: `coco_eval` keeps pycocotools' `COCOeval` object, whose
  `eval['precision']` array [T, R, K, A, M] (IoU thresholds x recall thresholds x classes x
  area ranges x max-detections) holds everything; `per_class_ap` and `pr_curves` read AP and
  precision/recall curves out of it the way `COCOeval.summarize` reads the means.
* Anchors and assignment: `plot_anchors_per_level`, `match_summary` and `plot_matches`
  (what an IoU matcher assigned), `random_proposals` (stand-in RoIs for a sampler),
  `plot_assignment` (a Hungarian matching), all drawn with `draw_boxes`.
* Architecture: `module_costs` (parameters, output shape and XLA cost-analysis FLOPs of
  every direct submodule call), `spinenet_block_table` (the same per SpineNet block).

Boxes are float32 (x1, y1, x2, y2) in continuous pixel coordinates, pixel (i, j) covering
[j, j+1) x [i, i+1), as everywhere in jaxdet. Plotting functions import matplotlib lazily and
return the Figure, so that the module imports on machines without a display.
"""

import contextlib
import importlib.util
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jaxdet import cli

# One colour per class id (tab10), cycled.
_TAB10 = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown',
          'tab:pink', 'tab:gray', 'tab:olive', 'tab:cyan')
# pycocotools' area ranges, in COCOeval.params.areaRngLbl order.
_AREAS = ('all', 'small', 'medium', 'large')


def class_color(class_id: int) -> str:
  return _TAB10[int(class_id) % len(_TAB10)]


# ----------------------------------------------------------------------------- configs


def resolve_path(path: str) -> str:
  """A relative path as given when it exists from the current directory, else from the
  jaxdet checkout's root (notebooks run from notebooks/ or from the root alike)."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  rooted = os.path.join(cli.REPO_ROOT, path)
  return rooted if os.path.exists(rooted) else path


def load_config(spec: str = '', workdir: str = '',
                overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
  """A config from a file with variants, or the one a run saved in its workdir.

  Args:
    spec: 'path/to/config.py[:variants]' as on the command line (a relative path is found
      by `resolve_path`); '' reads `workdir/config.json`, which `jaxdet.main` writes when a
      run starts.
    workdir: the run's directory (used when spec is '').
    overrides: optional {'dotted.name': value}, as `--config.dotted.name=value`; an
      unknown name is an error.

  Returns:
    The ConfigDict.
  """
  if spec:
    path, _, arg = spec.partition(':')
    path = resolve_path(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'No config file {path!r} (from {spec!r}).')
    cli.make_configs_importable()  # Config files import `configs.common`.
    module_spec = importlib.util.spec_from_file_location('_jaxdet_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
  else:
    path = os.path.join(resolve_path(workdir), 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'No {path}: give a config file (CONFIG = "configs/...py:variants") or a workdir '
          'written by `python -m jaxdet.main`.')
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  for name, value in (overrides or {}).items():
    parent, _, leaf = name.rpartition('.')
    node = config
    for part in filter(None, parent.split('.')):
      node = node[part]
    if leaf not in node:
      raise KeyError(f'Unknown config field {name!r}.')
    node[leaf] = value
  return config


# ----------------------------------------------------------------------------- detections


def predict_split(config, model, module, variables, mesh, *,
                  max_images: int = -1) -> List[Dict[str, Dict[str, np.ndarray]]]:
  """Runs the eval split through the model; one {'batch', 'detections'} per batch.

  Uses `evaluate.make_predict_fn` (postprocess under jit) on the batches of
  `pipeline.eval_iterator`, single process. `max_images` > 0 stops after that many images.

  Returns:
    list of dicts: 'batch' (numpy, the data contract) and 'detections' (numpy: boxes
    [B, K, 4] original pixels, scores [B, K], classes [B, K], num [B], masks
    [B, K, M, M] for mask models).
  """
  from jaxdet import evaluate, parallel  # pylint: disable=g-import-not-at-top
  from jaxdet.data import pipeline  # pylint: disable=g-import-not-at-top
  predict = evaluate.make_predict_fn(model, module, config, mesh)
  batch_size = parallel.local_batch_size(config.get('eval_batch_size',
                                                    config.global_batch_size), mesh)
  out, seen = [], 0
  for batch in pipeline.eval_iterator(config.data, batch_size=batch_size):
    detections = parallel.fetch(predict(variables, parallel.global_batch(batch, mesh)))
    out.append({'batch': batch, 'detections': jax.tree_util.tree_map(np.asarray, detections)})
    seen += int(np.sum(batch['image_id'] >= 0))
    if 0 < max_images <= seen:
      break
  return out


def coco_results(predictions, category_ids: Sequence[int]) -> List[Dict[str, Any]]:
  """COCO result dicts of `predict_split`'s output (padding images skipped)."""
  from jaxdet import evaluate  # pylint: disable=g-import-not-at-top
  results = []
  for p in predictions:
    results.extend(evaluate.detections_to_coco(
        p['detections'], p['batch']['image_id'], category_ids, p['batch']['orig_size']))
  return results


def denormalize(image: np.ndarray) -> np.ndarray:
  """[H, W, 3] ImageNet-normalised float -> uint8 RGB (the pipeline's normalisation undone)."""
  from jaxdet.data import transforms  # pylint: disable=g-import-not-at-top
  rgb = (np.asarray(image, np.float32) * np.asarray(transforms.IMAGENET_STD, np.float32)
         + np.asarray(transforms.IMAGENET_MEAN, np.float32))
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def to_input_pixels(boxes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """boxes: [..., 4] original-image pixels -> input pixels (input = original * scale - offset).

  scale: [2] (sy, sx); offset: [2] (oy, ox) of the same image.
  """
  boxes = np.asarray(boxes, np.float32)
  sy, sx = (float(v) for v in np.asarray(scale).reshape(2))
  oy, ox = (float(v) for v in np.asarray(offset).reshape(2))
  return np.stack([boxes[..., 0] * sx - ox, boxes[..., 1] * sy - oy,
                   boxes[..., 2] * sx - ox, boxes[..., 3] * sy - oy], -1)


def draw_boxes(ax, boxes, *, colors='tab:orange', labels=None, linestyle='-', linewidth=1.5,
               alpha=1.0):
  """Draws boxes [N, 4] (x1, y1, x2, y2) pixels on a matplotlib Axes showing the image.

  colors: one colour or one per box; labels: optional strings drawn at the top-left corners.
  """
  import matplotlib.patches as patches  # pylint: disable=g-import-not-at-top
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if isinstance(colors, str):
    colors = [colors] * len(boxes)
  for i, (x1, y1, x2, y2) in enumerate(boxes):
    ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                   edgecolor=colors[i], linestyle=linestyle,
                                   linewidth=linewidth, alpha=alpha))
    if labels is not None:
      ax.text(x1, y1, labels[i], fontsize=7, color='white', va='bottom',
              bbox=dict(facecolor=colors[i], alpha=0.7, pad=1, edgecolor='none'))


def detection_overlay(detections: Dict[str, np.ndarray], b: int, batch: Dict[str, np.ndarray],
                      min_score: float = 0.3, top_k: int = 20):
  """Image b's kept detections on the input canvas.

  Returns (boxes [n, 4] input pixels, scores [n], classes [n], masks [n, H, W] uint8 or
  None): the at most top_k detections with score >= min_score among the first num[b]
  (postprocess sorts them by score).
  """
  from jaxdet.ops import masks as mask_ops  # pylint: disable=g-import-not-at-top
  n = int(detections['num'][b])
  keep = np.flatnonzero(np.asarray(detections['scores'][b, :n]) >= min_score)[:top_k]
  boxes = to_input_pixels(detections['boxes'][b, keep], batch['scale'][b], batch['offset'][b])
  masks = None
  if 'masks' in detections:
    canvas = batch['image'].shape[1:3]
    masks = np.stack([mask_ops.paste_mask_numpy(detections['masks'][b, k], box, canvas)
                      for k, box in zip(keep, boxes)]) if len(keep) else np.zeros(
                          (0,) + tuple(canvas), np.uint8)
  return (boxes, np.asarray(detections['scores'][b, keep]),
          np.asarray(detections['classes'][b, keep]), masks)


def show_detections(batch, detections, class_names: Sequence[str], *, images: int = 4,
                    min_score: float = 0.3, top_k: int = 20, ground_truth: bool = True,
                    columns: int = 4):
  """One panel per image: detections (solid, coloured by class, masks shaded) and, dashed
  white, the ground truth, over the network's input canvas (padding cropped away).

  batch: an eval batch (data contract); detections: `postprocess` output for it (numpy).
  Returns the matplotlib Figure.
  """
  from matplotlib import colors as mcolors  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  real = [b for b in range(len(batch['image_id'])) if batch['image_id'][b] >= 0][:images]
  rows = max(1, -(-len(real) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, b in zip(axes.flat, real):
    # The image occupies orig_size * scale of the padded canvas.
    h, w = np.ceil(np.asarray(batch['orig_size'][b]) * np.asarray(batch['scale'][b])).astype(int)
    ax.imshow(denormalize(batch['image'][b][:h, :w]))
    boxes, scores, classes, masks = detection_overlay(detections, b, batch, min_score, top_k)
    if masks is not None:
      for mask, c in zip(masks, classes):
        rgba = np.zeros(mask[:h, :w].shape + (4,), np.float32)
        rgba[..., :3] = mcolors.to_rgb(class_color(c))
        rgba[..., 3] = 0.45 * mask[:h, :w]
        ax.imshow(rgba)
    if ground_truth:
      valid = batch['classes'][b] >= 0
      draw_boxes(ax, batch['boxes'][b][valid], colors='white', linestyle='--', linewidth=1.0)
    draw_boxes(ax, boxes, colors=[class_color(c) for c in classes],
               labels=[f'{class_names[c]} {s:.2f}' for c, s in zip(classes, scores)])
    ax.set_title(f"image {int(batch['image_id'][b])}: {len(boxes)} det.", fontsize=9)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------- COCO per class


def coco_eval(ground_truth, results: List[Dict[str, Any]], iou_type: str = 'bbox',
              image_ids: Optional[Sequence[int]] = None):
  """pycocotools COCOeval after evaluate() and accumulate() (and summarize(), quietly).

  The same scoring as `evaluate.coco_evaluate`, keeping the object: `eval['precision']`
  [T, R, K, A, M] and `eval['recall']` [T, K, A, M] hold the per-class numbers (-1 where a
  class has no ground truth). Raises ValueError when there are no results (pycocotools
  cannot load an empty result list).
  """
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  if not results:
    raise ValueError('No detections to score: every score is below '
                     'model.postprocess.score_threshold (a barely trained model?).')
  with contextlib.redirect_stdout(io.StringIO()):
    # loadRes adds keys ('segmentation', 'area', 'id') to the dicts it is given: copies keep
    # the caller's results as they were (a bbox result must not look like a mask result).
    evaluator = COCOeval(ground_truth, ground_truth.loadRes([dict(r) for r in results]),
                         iou_type)
    if image_ids is not None:
      evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator


def _mean_valid(x, axis=None):
  """Mean of the entries > -1 (COCOeval's "no ground truth" marker); -1 when there are none."""
  x = np.asarray(x, np.float64)
  valid = x > -1
  total = np.where(valid, x, 0.0).sum(axis=axis)
  count = valid.sum(axis=axis)
  return np.where(count > 0, total / np.maximum(count, 1), -1.0)


def per_class_ap(evaluator, area: str = 'all', max_dets: int = 100) -> Dict[str, np.ndarray]:
  """AP, AP50, AP75 and recall per class, read from `evaluator.eval` like `summarize()`.

  AP of class k is the mean of precision[t, r, k, area, max_dets] over IoU thresholds t and
  the 101 recall thresholds r; the mean of the valid per-class APs is COCOeval's AP
  (`stats[0]` for area 'all', 100 detections). Classes without ground truth get -1.

  Returns:
    dict of [K] arrays in `evaluator.params.catIds` order: 'category_id', 'AP', 'AP50',
    'AP75', 'AR' (recall at max_dets averaged over IoU thresholds) and 'num_gt'.
  """
  p = evaluator.params
  a = _AREAS.index(area)
  m = list(p.maxDets).index(max_dets)
  precision = evaluator.eval['precision'][:, :, :, a, m]  # [T, R, K]
  recall = evaluator.eval['recall'][:, :, a, m]  # [T, K]
  t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
  t75 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.75)))
  gts = evaluator._gts  # pylint: disable=protected-access  ((image, category) -> annotations)
  num_gt = np.array([sum(1 for img in p.imgIds for g in gts.get((img, c), [])
                         if not g.get('iscrowd', 0)) for c in p.catIds])
  return {'category_id': np.asarray(p.catIds),
          'AP': _mean_valid(precision, axis=(0, 1)),
          'AP50': _mean_valid(precision[t50], axis=0),
          'AP75': _mean_valid(precision[t75], axis=0),
          'AR': _mean_valid(recall, axis=0),
          'num_gt': num_gt}


def pr_curves(evaluator, iou: Optional[float] = 0.5, area: str = 'all', max_dets: int = 100):
  """Interpolated precision/recall curves per class, as COCOeval samples them.

  iou: one of the evaluator's IoU thresholds, or None for the mean over thresholds.
  Returns (recall [R] (the 101 thresholds 0, 0.01, ..., 1), precision [K, R]); precision
  is -1 for classes without ground truth and 0 beyond the highest recall reached.
  """
  p = evaluator.params
  precision = evaluator.eval['precision'][:, :, :, _AREAS.index(area),
                                          list(p.maxDets).index(max_dets)]  # [T, R, K]
  if iou is None:
    curve = _mean_valid(precision, axis=0)  # [R, K]
  else:
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - iou)))
    if abs(p.iouThrs[t] - iou) > 1e-6:
      raise ValueError(f'iou={iou} is not one of the thresholds {list(p.iouThrs)}.')
    curve = precision[t]
  return np.asarray(p.recThrs), np.asarray(curve).T


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str],
                 formats: Optional[Dict[str, str]] = None) -> str:
  """Plain-text table (a markdown pipe table) of dict rows; formats: column -> '{:.3f}'."""
  formats = formats or {}

  def cell(row, c):
    v = row.get(c, '')
    return formats[c].format(v) if c in formats and v != '' else str(v)

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(cell(r, c) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def per_class_table(evaluator, class_names: Sequence[str]) -> str:
  """The per-class AP table as text.

  class_names: one per contiguous class id; jaxdet's contiguous ids follow the sorted
  category ids, which is the order of `evaluator.params.catIds`.
  """
  ap = per_class_ap(evaluator)
  if len(class_names) != len(ap['AP']):
    raise ValueError(f'{len(class_names)} class names for {len(ap["AP"])} categories.')
  rows = [{'class': name, **{k: ap[k][i] for k in ('AP', 'AP50', 'AP75', 'AR', 'num_gt')}}
          for i, name in enumerate(class_names)]
  rows.append({'class': 'mean', 'AP': float(_mean_valid(ap['AP'])),
               'AP50': float(_mean_valid(ap['AP50'])), 'AP75': float(_mean_valid(ap['AP75'])),
               'AR': float(_mean_valid(ap['AR'])), 'num_gt': int(ap['num_gt'].sum())})
  f = '{:.3f}'
  return format_table(rows, ['class', 'AP', 'AP50', 'AP75', 'AR', 'num_gt'],
                      {'AP': f, 'AP50': f, 'AP75': f, 'AR': f})


def plot_pr_curves(evaluator, class_names: Sequence[str], ious=(0.5, 0.75, None)):
  """One panel per IoU threshold (None: mean over 0.5:0.95), one curve per class."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(ious), figsize=(4.2 * len(ious), 3.6), squeeze=False)
  for ax, iou in zip(axes[0], ious):
    recall, precision = pr_curves(evaluator, iou)
    for k, name in enumerate(class_names):
      if np.all(precision[k] < 0):
        continue  # No ground truth of this class.
      ax.plot(recall, precision[k], color=class_color(k), label=name)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title('IoU 0.50:0.95 (mean)' if iou is None else f'IoU {iou:.2f}')
  axes[0, -1].legend(fontsize=7, loc='lower left')
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------- anchors


def plot_anchors_per_level(image: np.ndarray, anchors_by_level: Dict[int, np.ndarray], *,
                           at=None):
  """One panel per level: the grid of anchor centres, and the A anchors of one location.

  image: [H, W, 3] uint8, the input canvas; anchors_by_level: {level: [H_l, W_l, A, 4]}
  input pixels (`retinanet.anchors_by_level`); at: (y, x) pixel whose nearest location's
  anchors are drawn (default: the image centre).
  Returns the matplotlib Figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  levels = sorted(anchors_by_level)
  height, width = image.shape[:2]
  y, x = at if at is not None else (height / 2, width / 2)
  fig, axes = plt.subplots(1, len(levels), figsize=(3.0 * len(levels), 3.2), squeeze=False)
  for ax, level in zip(axes[0], levels):
    a = anchors_by_level[level]  # [H_l, W_l, A, 4]
    centres = (a[:, :, 0, :2] + a[:, :, 0, 2:]) / 2  # [H_l, W_l, 2] (x, y)
    i = int(np.clip(y // 2**level, 0, a.shape[0] - 1))
    j = int(np.clip(x // 2**level, 0, a.shape[1] - 1))
    ax.imshow(image)
    ax.plot(centres[..., 0].ravel(), centres[..., 1].ravel(), '.', color='yellow',
            markersize=max(0.5, 4.0 - 0.6 * (7 - level)))
    draw_boxes(ax, a[i, j], colors=[_TAB10[k % len(_TAB10)] for k in range(a.shape[2])],
               linewidth=1.0)
    ax.set_title(f'P{level}: stride {2**level}, {a.shape[0]}x{a.shape[1]}x{a.shape[2]}',
                 fontsize=9)
    # Anchors of the coarse levels reach beyond the image.
    ax.set_xlim(min(0, a[i, j, :, 0].min()) - 2, max(width, a[i, j, :, 2].max()) + 2)
    ax.set_ylim(max(height, a[i, j, :, 3].max()) + 2, min(0, a[i, j, :, 1].min()) - 2)
    ax.axis('off')
  fig.tight_layout()
  return fig


def match_summary(labels: np.ndarray, matched: np.ndarray, iou: np.ndarray,
                  level_sizes: Sequence[int], levels: Sequence[int]) -> List[Dict[str, Any]]:
  """Per ground truth: its positive anchors per level and its best IoU with any anchor.

  labels: [A] 1 / 0 / -1 from a matcher; matched: [A] ground-truth index; iou: [A, N];
  level_sizes / levels: anchors per level in the flattened order (`anchors.level_sizes`).
  Returns one dict per ground truth: 'gt', 'best_iou', 'positives', and 'P<l>' counts.
  """
  labels, matched, iou = np.asarray(labels), np.asarray(matched), np.asarray(iou)
  level_of = np.repeat(np.asarray(levels), np.asarray(level_sizes))  # [A]
  rows = []
  for n in range(iou.shape[1]):
    mine = (labels == 1) & (matched == n)
    row = {'gt': n, 'best_iou': float(iou[:, n].max()) if len(iou) else 0.0,
           'positives': int(mine.sum())}
    row.update({f'P{l}': int((mine & (level_of == l)).sum()) for l in levels})
    rows.append(row)
  return rows


def plot_matches(ax, anchors: np.ndarray, labels: np.ndarray, matched: np.ndarray,
                 gt_boxes: np.ndarray, gt_classes: Optional[np.ndarray] = None):
  """Positive anchors drawn in the colour of the object they are assigned to (thin), the
  objects thick; ignored anchors (-1) are not drawn. anchors: [A, 4]; labels, matched: [A];
  gt_boxes: [N, 4]; gt_classes: optional [N] (colours by class, else by object)."""
  colour = lambda n: class_color(gt_classes[n] if gt_classes is not None else n)
  positive = np.flatnonzero(np.asarray(labels) == 1)
  draw_boxes(ax, np.asarray(anchors)[positive],
             colors=[colour(int(matched[a])) for a in positive], linewidth=0.7, alpha=0.8)
  draw_boxes(ax, gt_boxes, colors=[colour(n) for n in range(len(gt_boxes))], linewidth=2.5)


# ----------------------------------------------------------------------------- assignment


def random_proposals(rng: np.random.Generator, gt_boxes: np.ndarray, num: int,
                     image_size) -> np.ndarray:
  """Stand-in region proposals: half jittered copies of the ground truth, half random boxes.

  gt_boxes: [N, 4] pixels (N may be 0); image_size: (height, width).
  Returns float32 [num, 4] (x1, y1, x2, y2) clipped to the image, each at least 2 px wide.
  """
  h, w = (float(v) for v in image_size)
  gt = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
  near = num // 2 if len(gt) else 0
  out = []
  if near:
    src = gt[rng.integers(0, len(gt), near)]
    size = np.concatenate([src[:, 2:] - src[:, :2]] * 2, 1)
    out.append(src + rng.normal(0.0, 0.15, (near, 4)) * size)
  centre = rng.uniform((0, 0), (w, h), (num - near, 2))
  half = np.exp(rng.uniform(np.log(2), np.log(max(h, w) / 3), (num - near, 2)))
  out.append(np.concatenate([centre - half, centre + half], 1))
  boxes = np.concatenate(out, 0)
  x1, x2 = np.sort(np.clip(boxes[:, [0, 2]], 0, w), 1).T
  y1, y2 = np.sort(np.clip(boxes[:, [1, 3]], 0, h), 1).T
  x2, y2 = np.maximum(x2, np.minimum(x1 + 2, w)), np.maximum(y2, np.minimum(y1 + 2, h))
  x1, y1 = np.minimum(x1, x2 - 2), np.minimum(y1, y2 - 2)
  return np.stack([x1, y1, x2, y2], 1).astype(np.float32)


def detr_targets(boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray], image_size):
  """Ground truth of B images padded to N = the largest count (at least 1), DETR's format.

  boxes[b]: [n_b, 4] (x1, y1, x2, y2) pixels; classes[b]: [n_b]; image_size: (height, width).
  Returns (boxes [B, N, 4] float32 (cx, cy, w, h) divided by the image size, zeros for
  padding; classes [B, N] int32, -1 for padding; valid [B, N] bool).
  """
  h, w = (float(v) for v in image_size)
  n = max([1] + [len(b) for b in boxes])
  out = np.zeros((len(boxes), n, 4), np.float32)
  cls = np.full((len(boxes), n), -1, np.int32)
  for i, (b, c) in enumerate(zip(boxes, classes)):
    b = np.asarray(b, np.float32).reshape(-1, 4) / np.array([w, h, w, h], np.float32)
    out[i, :len(b)] = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
    cls[i, :len(b)] = c
  return out, cls, cls >= 0


def random_detr_outputs(rng: np.random.Generator, batch_size: int, num_queries: int,
                        num_classes: int):
  """Stand-in DETR predictions: logits [B, Q, C + 1] ~ N(0, 2^2) ("no object" last) and boxes
  [B, Q, 4] normalised (cx, cy, w, h), centres uniform in [0.1, 0.9], sides in [0.05, 0.4]."""
  logits = rng.normal(0.0, 2.0, (batch_size, num_queries, num_classes + 1))
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (batch_size, num_queries, 2)),
                          rng.uniform(0.05, 0.4, (batch_size, num_queries, 2))], -1)
  return logits.astype(np.float32), boxes.astype(np.float32)


def plot_assignment(ax, pred_boxes: np.ndarray, gt_boxes: np.ndarray, pred_idx: np.ndarray,
                    matched: np.ndarray, gt_classes: Optional[np.ndarray] = None):
  """Hungarian assignment: unmatched predictions faint grey, matched ones coloured like their
  target, and a line from each target's centre to its prediction's centre.

  pred_boxes: [Q, 4] pixels; gt_boxes: [N, 4] pixels; pred_idx: [N] query of target n;
  matched: [N] bool (False for padded targets); gt_classes: optional [N] for colours.
  """
  pred_boxes = np.asarray(pred_boxes, np.float32)
  gt_boxes = np.asarray(gt_boxes, np.float32)
  used = set(int(pred_idx[n]) for n in np.flatnonzero(matched))
  draw_boxes(ax, pred_boxes[[q for q in range(len(pred_boxes)) if q not in used]],
             colors='0.6', linewidth=0.6, alpha=0.6)
  for n in np.flatnonzero(matched):
    color = class_color(gt_classes[n] if gt_classes is not None else n)
    q = int(pred_idx[n])
    draw_boxes(ax, gt_boxes[n], colors=color, linewidth=2.0)
    draw_boxes(ax, pred_boxes[q], colors=color, linestyle='--', linewidth=1.2)
    (gx, gy), (px, py) = ((b[:2] + b[2:]) / 2 for b in (gt_boxes[n], pred_boxes[q]))
    ax.plot([gx, px], [gy, py], color=color, linewidth=1.2)
    ax.plot([px], [py], 'o', color=color, markersize=3)


# ----------------------------------------------------------------------------- architecture


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def xla_flops(fn, *args) -> float:
  """FLOPs of jit(fn)(*args) from XLA's cost analysis of the lowered (not compiled) program.

  args may be ShapeDtypeStructs. A multiply-add counts 2 FLOPs.
  """
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def module_costs(module, variables, *args, flops: bool = True, **kwargs) -> Dict[str, Any]:
  """Parameters, shapes and FLOPs of a Flax module and of each of its direct submodule calls.

  Nothing is allocated: the module runs under `jax.eval_shape` with `nn.intercept_methods`
  recording every call of a direct child; each child is then lowered on its own, with its
  variables and recorded inputs, for XLA's cost analysis. Work done in the parent's own
  code (pooling, sums of parents, activations between children) is in 'total' only.

  Args:
    module: an unbound Flax module.
    variables: its variables (arrays or ShapeDtypeStructs), e.g. from jax.eval_shape(init).
    *args, **kwargs: the call's arguments (arrays or ShapeDtypeStructs); keyword arguments
      must be static (e.g. train=False).
    flops: False skips the cost analyses (shapes and parameters only).

  Returns:
    {'children': [{'name', 'type', 'inputs': [shapes], 'output': shape or {key: shape},
    'params', 'flops'}] in call order, 'output': the module's output shapes,
    'params': total, 'flops': total of the whole call}.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  variables = _abstract(variables)
  args = _abstract(args)
  calls = []

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    m = context.module
    if context.method_name == '__call__' and len(m.path) == 1:
      calls.append((m.path[0], m.clone(parent=None, name=None), _abstract(call_args),
                    dict(call_kwargs), jax.tree_util.tree_map(np.shape, out)))
    return out

  def run(v, *a):
    with nn.intercept_methods(record):
      return module.apply(v, *a, **kwargs)

  output = jax.tree_util.tree_map(lambda s: s.shape, jax.eval_shape(run, variables, *args))
  children = []
  for name, child, child_args, child_kwargs, out in calls:
    child_vars = {col: tree[name] for col, tree in variables.items() if name in tree}
    apply = lambda v, *a, c=child, k=child_kwargs: c.apply(v, *a, **k)
    children.append({
        'name': name, 'type': type(child).__name__,
        'inputs': [tuple(a.shape) for a in jax.tree_util.tree_leaves(child_args)],
        'output': out, 'params': _count(child_vars.get('params', {})),
        'flops': xla_flops(apply, child_vars, *child_args) if flops else float('nan')})
  total = xla_flops(lambda v, *a: module.apply(v, *a, **kwargs), variables, *args) \
      if flops else float('nan')
  return {'children': children, 'output': output,
          'params': _count(variables.get('params', {})), 'flops': total}


def spinenet_block_table(specs, costs: Dict[str, Any],
                         num_stem_blocks: int = 2) -> List[Dict[str, Any]]:
  """Per-block rows of a SpineNet from `module_costs(spinenet, ...)`.

  Block b < num_stem_blocks is the stem (block 0 also holds the 7x7 stem conv); block
  num_stem_blocks + i is spec i: its parents' resampling connections plus its block group.
  Endpoint convs get one row per level, and 'other' is the total minus everything listed
  (pooling, parent sums and activations in SpineNet's own code).

  Args:
    specs: the BlockSpec sequence the network was built from.
    costs: `module_costs` of that SpineNet.

  Returns:
    list of dicts: 'block', 'level', 'kind', 'parents', 'output' (shape), 'params', 'flops'.
  """
  by_name = {c['name']: c for c in costs['children']}

  def summed(names):
    found = [by_name[n] for n in names if n in by_name]
    return sum(c['params'] for c in found), sum(c['flops'] for c in found)

  rows = []
  for b in range(num_stem_blocks):
    names = (['stem'] if b == 0 else []) + [f'stem_group{b}']
    params, flops = summed(names)
    rows.append({'block': b, 'level': 2, 'kind': 'stem bottleneck', 'parents': '',
                 'output': by_name[f'stem_group{b}']['output'], 'params': params,
                 'flops': flops})
  for i, spec in enumerate(specs):
    names = [n for n in by_name if n.startswith(f'resample{i}_')] + [f'group{i}']
    params, flops = summed(names)
    rows.append({'block': num_stem_blocks + i, 'level': spec.level,
                 'kind': spec.block_fn + (' (output)' if spec.is_output else ''),
                 'parents': ','.join(str(o) for o in spec.input_offsets),
                 'output': by_name[f'group{i}']['output'], 'params': params, 'flops': flops})
  for name in by_name:
    if name.startswith('endpoint'):
      rows.append({'block': name, 'level': int(name[len('endpoint'):]), 'kind': '1x1 conv',
                   'parents': '', 'output': by_name[name]['output'],
                   'params': by_name[name]['params'], 'flops': by_name[name]['flops']})
  listed_params = sum(r['params'] for r in rows)
  listed_flops = sum(r['flops'] for r in rows)
  rows.append({'block': 'other', 'level': '', 'kind': 'pooling, sums, activations',
               'parents': '', 'output': '', 'params': costs['params'] - listed_params,
               'flops': costs['flops'] - listed_flops})
  return rows


def plot_block_costs(rows: Sequence[Dict[str, Any]]):
  """Bar charts of parameters and GFLOPs per row of `spinenet_block_table`, by level."""
  import matplotlib.patches as mpatches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in rows if r['block'] != 'other']
  names = [str(r['block']) for r in rows]
  colors = [_TAB10[int(r['level']) % len(_TAB10)] for r in rows]
  fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
  axes[0].bar(names, [r['params'] / 1e6 for r in rows], color=colors)
  axes[0].set_ylabel('parameters (M)')
  axes[1].bar(names, [r['flops'] / 1e9 for r in rows], color=colors)
  axes[1].set_ylabel('GFLOPs')
  axes[1].set_xlabel('block')
  axes[1].tick_params(axis='x', labelrotation=90)
  levels = sorted({int(r['level']) for r in rows})
  axes[0].legend(handles=[mpatches.Patch(color=_TAB10[l % len(_TAB10)], label=f'level {l}')
                          for l in levels], fontsize=7, ncol=len(levels), loc='upper left')
  fig.tight_layout()
  return fig
