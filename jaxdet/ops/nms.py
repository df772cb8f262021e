"""Static-shape greedy non-maximum suppression and top-k.

`nms` is exact greedy NMS: boxes are visited in descending score order (ties:
lower index first) and a box is dropped when its IoU with an already kept box
is > iou_threshold. It runs with fixed shapes and O(N * T) memory, T the tile
size, following the tiled scheme of TF Model Garden's
`sorted_non_max_suppression_padded`:

1. sort once by score and pad N up to a multiple of T;
2. for tile t, the boxes kept in tiles 0..t-1 (final by then) suppress the
   tile's boxes in one [T, N] IoU matrix op;
3. the surviving boxes of the tile suppress each other through the tile's
   upper-triangular [T, T] IoU matrix, iterated to a fixed point:
   keep = candidates & ~any(suppressor kept & IoU > thr & suppressor earlier).
   Box k's value depends only on boxes before it, so after j iterations the
   first j boxes hold their greedy value and the fixed point is unique and
   equal to greedy NMS; it is usually reached in a few iterations;
4. stop once every image has max_output kept boxes or the tiles run out.

The outputs are the first `max_output` kept indices into the input, in score
order, padded with -1, and the count of valid entries.
"""

import jax
import jax.numpy as jnp

from jaxdet.ops import boxes as box_ops

NMS_TILE_SIZE = 512


def _nms_sorted(boxes, candidates, classes, *, iou_threshold, max_output,
                tile_size):
  """Greedy NMS over score-sorted, tile-padded boxes of a batch.

  Args:
    boxes: [B, P, 4] (x1, y1, x2, y2) sorted by descending score; P is a
      multiple of tile_size.
    candidates: [B, P] bool, False for invalid and padding boxes.
    classes: [B, P] int or None; boxes of different classes never suppress
      each other.
    iou_threshold: suppress at IoU > iou_threshold.
    max_output: number of kept boxes after which the loop may stop.
    tile_size: T.

  Returns:
    [B, P] bool: kept boxes (every kept box up to at least the max_output-th
    one is exact; later tiles may be left unprocessed).
  """
  batch, padded = candidates.shape
  num_tiles = padded // tile_size
  earlier = (jnp.arange(tile_size)[:, None] < jnp.arange(tile_size)[None, :])

  def tile_step(state):
    t, keep, count = state
    start = t * tile_size
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, tile_size, axis=1)
    tile_cand = jax.lax.dynamic_slice_in_dim(candidates, start, tile_size, axis=1)

    # Boxes kept in earlier tiles are final; `keep` is still False from this
    # tile on, so the [B, T, P] product only sees earlier kept boxes.
    cross = (box_ops.pairwise_iou(tile_boxes, boxes) > iou_threshold)
    cross &= keep[:, None, :]
    if classes is not None:
      tile_classes = jax.lax.dynamic_slice_in_dim(classes, start, tile_size, axis=1)
      cross &= tile_classes[:, :, None] == classes[:, None, :]
    tile_cand &= ~jnp.any(cross, axis=2)  # [B, T]

    # [B, T, T]: row r may suppress column c (r before c in score order).
    within = (box_ops.pairwise_iou(tile_boxes, tile_boxes) > iou_threshold)
    within &= earlier[None]
    if classes is not None:
      within &= tile_classes[:, :, None] == tile_classes[:, None, :]

    def refine(inner):
      tile_keep, _ = inner
      new = tile_cand & ~jnp.any(within & tile_keep[:, :, None], axis=1)
      return new, jnp.any(new != tile_keep)

    tile_keep, _ = jax.lax.while_loop(
        lambda inner: inner[1], refine, (tile_cand, jnp.array(True)))
    keep = jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, start, axis=1)
    count = count + jnp.sum(tile_keep, axis=1, dtype=jnp.int32)
    return t + 1, keep, count

  def more_tiles(state):
    t, _, count = state
    return (t < num_tiles) & jnp.any(count < max_output)

  _, keep, _ = jax.lax.while_loop(
      more_tiles, tile_step,
      (jnp.int32(0), jnp.zeros((batch, padded), bool),
       jnp.zeros((batch,), jnp.int32)))
  return keep


def _batched_nms(boxes, scores, classes, valid, *, iou_threshold, max_output,
                 tile_size):
  """Shared body of `nms` and `batched_nms` on [B, N] inputs."""
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  batch, n = scores.shape
  if valid is None:
    valid = jnp.ones((batch, n), bool)
  # A NaN score has no place in the order; such boxes are treated as invalid.
  valid = jnp.asarray(valid, bool) & ~jnp.isnan(scores)
  if n == 0:
    return (jnp.full((batch, max_output), -1, jnp.int32),
            jnp.zeros((batch,), jnp.int32))

  # Valid boxes first, then descending score; lexsort is stable, so equal
  # scores keep the lower index first (the greedy reference order).
  order = jax.vmap(lambda s, v: jnp.lexsort((-s, ~v)))(scores, valid)  # [B, N]
  order = order.astype(jnp.int32)
  take = lambda x: jnp.take_along_axis(x, order, axis=1)
  sorted_boxes = jnp.take_along_axis(boxes, order[:, :, None], axis=1)
  sorted_valid = take(valid)
  sorted_classes = None if classes is None else take(jnp.asarray(classes, jnp.int32))

  tile = min(tile_size, n)
  padded = -(-n // tile) * tile
  pad = padded - n
  sorted_boxes = jnp.pad(sorted_boxes, ((0, 0), (0, pad), (0, 0)))  # [B, P, 4]
  sorted_valid = jnp.pad(sorted_valid, ((0, 0), (0, pad)))  # [B, P]
  if sorted_classes is not None:
    sorted_classes = jnp.pad(sorted_classes, ((0, 0), (0, pad)), constant_values=-1)

  keep = _nms_sorted(sorted_boxes, sorted_valid, sorted_classes,
                     iou_threshold=iou_threshold, max_output=max_output,
                     tile_size=tile)[:, :n]  # [B, N]

  # Scatter the kept boxes, in score order, to slots 0, 1, ...; the rest
  # (and kept boxes past max_output) go to a dropped overflow slot.
  rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1  # [B, N]
  slot = jnp.where(keep & (rank < max_output), rank, max_output)
  rows = jnp.arange(batch)[:, None]
  indices = jnp.full((batch, max_output + 1), -1, jnp.int32)
  indices = indices.at[rows, slot].set(order)[:, :max_output]  # [B, max_output]
  num_valid = jnp.minimum(jnp.sum(keep, axis=1, dtype=jnp.int32), max_output)
  return indices, num_valid


# Compiled once per static configuration, so eager callers do not dispatch the
# tile loop op by op; inside an outer jit this is simply inlined.
_batched_nms_jit = jax.jit(
    _batched_nms, static_argnames=('iou_threshold', 'max_output', 'tile_size'))


def nms(boxes, scores, *, iou_threshold, max_output, valid=None, classes=None,
        tile_size=NMS_TILE_SIZE):
  """Exact greedy NMS with static shapes and O(N * tile_size) memory.

  Args:
    boxes: [N, 4] (x1, y1, x2, y2).
    scores: [N] float; higher is better, ties broken by lower index.
    iou_threshold: a box is suppressed by a kept box when IoU > iou_threshold.
    max_output: static number of output slots.
    valid: optional [N] bool; invalid boxes are never kept and suppress nothing.
    classes: optional [N] int; when given, only boxes of the same class
      suppress each other (class-aware NMS).
    tile_size: static tile size T (512 as TF Model Garden; smaller is fine).

  Returns:
    indices: [max_output] int32 indices into the input of the kept boxes in
      descending score order, -1 past num_valid.
    num_valid: int32 scalar, number of kept boxes (<= max_output).
  """
  indices, num_valid = _batched_nms_jit(
      jnp.asarray(boxes)[None], jnp.asarray(scores)[None],
      None if classes is None else jnp.asarray(classes)[None],
      None if valid is None else jnp.asarray(valid)[None],
      iou_threshold=iou_threshold, max_output=max_output, tile_size=tile_size)
  return indices[0], num_valid[0]


def batched_nms(boxes, scores, classes=None, *, iou_threshold, max_output,
                valid=None, tile_size=NMS_TILE_SIZE):
  """`nms` on every image of a batch, optionally class-aware.

  The batch shares one loop over tiles (as TF Model Garden's padded NMS) rather
  than a vmap of `nms`; the result is the same.

  Args:
    boxes: [B, N, 4] (x1, y1, x2, y2).
    scores: [B, N] float.
    classes: optional [B, N] int; boxes of different classes never suppress
      each other (the IoU is masked to same-class pairs, which is exact).
    iou_threshold: a box is suppressed by a kept box when IoU > iou_threshold.
    max_output: static number of output slots per image.
    valid: optional [B, N] bool; invalid boxes are never kept.
    tile_size: static tile size T.

  Returns:
    indices: [B, max_output] int32 indices into each image's N boxes, in
      descending score order, -1 past num_valid.
    num_valid: [B] int32.
  """
  return _batched_nms_jit(boxes, scores, classes, valid, iou_threshold=iou_threshold,
                      max_output=max_output, tile_size=tile_size)


def top_k(scores, k):
  """The k highest scores along the last axis, padded when k exceeds it.

  A static-shape wrapper of `jax.lax.top_k` (ties: lower index first). When
  the last axis has fewer than k entries (e.g. small test images with a
  pre-NMS top-k of 5000), the output is padded with score -inf and index -1,
  so callers keep one shape for every image size; `values > -inf` marks the
  real entries.

  Args:
    scores: [..., N] float.
    k: static int.

  Returns:
    values: [..., k] float, descending.
    indices: [..., k] int32 into the last axis, -1 for padding.
  """
  scores = jnp.asarray(scores)
  n = scores.shape[-1]
  values, indices = jax.lax.top_k(scores, min(k, n))
  indices = indices.astype(jnp.int32)
  if k > n:
    widths = [(0, 0)] * (scores.ndim - 1) + [(0, k - n)]
    values = jnp.pad(values, widths, constant_values=-jnp.inf)
    indices = jnp.pad(indices, widths, constant_values=-1)
  return values, indices
