"""Instance masks: Mask R-CNN's training targets, pasting into images, mask IoU, COCO RLE.

jaxdet keeps every instance mask box-relative: the data pipeline crops an instance's mask to
its own box and resizes it to M x M (DESIGN.md, the data contract), and the mask head
predicts M x M probabilities for its RoI. Cell (i, j) of a box-relative mask of box
(x1, y1, x2, y2) covers [x1 + j w / M, x1 + (j + 1) w / M) x [y1 + i h / M, ...) and its value
lives at the cell centre (the aligned, half-pixel convention of RoIAlignV2).

  * `mask_targets`: Mask R-CNN's target (He et al. 2017, sec. 3) is the ground truth mask
    cropped to the RoI and resized to S x S (28). Here it is resampled from the ground truth's
    box-relative mask: each of the RoI's S x S bin centres is mapped into the ground truth
    box's M x M frame and bilinearly sampled; outside the ground truth box the object is
    absent, so the target is 0 there. Then thresholded at 0.5, as detectron2's
    `BitMasks.crop_and_resize`.
  * `paste_masks` / `paste_mask_numpy`: box-relative probabilities back to image pixels as
    detectron2's `paste_masks_in_image`: pixel centre (x + 0.5, y + 0.5) sampled bilinearly
    (grid_sample, align_corners=False) with zero padding outside the M x M grid.
  * `mask_iou`, and `encode_rle` for pycocotools' segm evaluation.

The JAX functions have static shapes and work under `jit` and `vmap`; `paste_mask_numpy`
and `encode_rle` run on the host for evaluation.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Bilinear weights are float32 numbers, not bf16 (the TPU default for matmul inputs).
_HIGHEST = jax.lax.Precision.HIGHEST

# Guards divisions by zero-size (padding) boxes; such boxes then map every sample far
# outside their frame, which gives empty masks.
_EPS = 1e-6


def _target_axis(roi_lo, roi_hi, gt_lo, gt_hi, out, m):
  """Bilinear taps along one axis for sampling a box-relative mask at RoI bin centres.

  Args:
    roi_lo, roi_hi: [R] RoI extent along the axis, input pixels.
    gt_lo, gt_hi: [R] extent of each RoI's ground truth box, input pixels.
    out: S, output bins.
    m: M, cells of the box-relative mask.

  Returns:
    (idx [R, S, 2] int32 low/high cells, weight [R, S, 2] float32); weights are 0 for bin
    centres outside the ground truth box.
  """
  centres = (jnp.arange(out, dtype=jnp.float32) + 0.5) / out  # [S]
  p = roi_lo[:, None] + centres * (roi_hi - roi_lo)[:, None]  # [R, S] input pixels
  size = jnp.maximum(gt_hi - gt_lo, _EPS)[:, None]
  u = (p - gt_lo[:, None]) / size * m  # [R, S] in cells; cell k spans [k, k + 1)
  inside = (u >= 0.0) & (u <= m)
  # Value of cell k sits at k + 0.5; between the outermost centre and the box edge the edge
  # cell's value holds (the object reaches the edge of its own box).
  c = jnp.clip(u - 0.5, 0.0, m - 1.0)
  low = jnp.floor(c)
  high = jnp.minimum(low + 1.0, m - 1.0)
  frac = c - low
  weight = jnp.stack([1.0 - frac, frac], axis=-1) * inside[..., None]
  idx = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  return idx, weight


def mask_targets(gt_masks, gt_boxes, rois, matched, *, output_size=28, threshold=0.5):
  """Mask R-CNN mask targets of RoIs from box-relative ground truth masks.

  For RoI r matched to ground truth g, bin (i, j) of the S x S target samples g's mask at the
  bin centre (rx1 + (j + 0.5) rw / S, ry1 + (i + 0.5) rh / S): mapped into g's box frame and
  interpolated bilinearly between cell centres; 0 outside g's box. When the RoI is g's box
  and S == M, the target is g's mask itself.

  Args:
    gt_masks: [N, M, M] uint8 (or bool / float), non-zero inside the instance, each cropped to
      its own box (the batch's `masks` of one image).
    gt_boxes: [N, 4] float32 (x1, y1, x2, y2) input pixels.
    rois: [R, 4] float32 (x1, y1, x2, y2) input pixels.
    matched: [R] int32 index of each RoI's ground truth (clipped to [0, N - 1]; targets of
      RoIs that are not positive are meaningless and must be masked by the caller).
    output_size: S (28 in Mask R-CNN).
    threshold: binarise the sampled values at this level (detectron2 uses 0.5); None keeps
      the soft bilinear values.

  Returns:
    [R, S, S] float32 targets in [0, 1].
  """
  gt_masks = jnp.asarray(gt_masks)
  n, m = gt_masks.shape[0], gt_masks.shape[1]
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  rois = jnp.asarray(rois, jnp.float32)
  matched = jnp.clip(jnp.asarray(matched, jnp.int32), 0, max(n - 1, 0))
  if n == 0:
    return jnp.zeros((rois.shape[0], output_size, output_size), jnp.float32)
  g = gt_boxes[matched]  # [R, 4]
  yi, wy = _target_axis(rois[:, 1], rois[:, 3], g[:, 1], g[:, 3], output_size, m)
  xi, wx = _target_axis(rois[:, 0], rois[:, 2], g[:, 0], g[:, 2], output_size, m)
  binary = (gt_masks > 0).astype(jnp.float32).reshape(n * m * m)  # [N*M*M]
  rows = matched[:, None, None] * (m * m) + yi * m  # [R, S, 2]
  index = rows[:, :, :, None, None] + xi[:, None, None, :, :]  # [R, S, 2, S, 2]
  values = binary[index]  # [R, S, 2, S, 2]
  out = jnp.einsum('ria,rjb,riajb->rij', wy, wx, values, precision=_HIGHEST)  # [R, S, S]
  if threshold is not None:
    out = (out >= threshold).astype(jnp.float32)
  return out


def _paste_weights(lo, hi, m, n):
  """Bilinear (zero-padded) weights from the M cells of a box to the n image pixels.

  Pixel p's centre p + 0.5 sits at u = (p + 0.5 - lo) / (hi - lo) * M - 0.5 in cell-index
  coordinates (grid_sample, align_corners=False); bilinear interpolation with zeros outside
  the grid is the tent max(0, 1 - |u - k|) on cell k.

  Args:
    lo, hi: [...] box extent along the axis, pixels.
    m: M cells.
    n: image extent in pixels.

  Returns:
    [..., n, M] weights.
  """
  pixel = jnp.arange(n, dtype=jnp.float32) + 0.5  # [n]
  size = jnp.maximum(hi - lo, _EPS)[..., None]
  u = (pixel - lo[..., None]) / size * m - 0.5  # [..., n]
  cells = jnp.arange(m, dtype=jnp.float32)
  return jnp.maximum(0.0, 1.0 - jnp.abs(u[..., None] - cells))  # [..., n, M]


def paste_masks(masks, boxes, height: int, width: int):
  """Pastes box-relative mask probabilities into an image, as detectron2.

  detectron2 `paste_masks_in_image` (before its threshold): every image pixel centre is
  mapped into its box's M x M frame and sampled bilinearly, with zeros outside the frame, so
  the result fades to 0 within half a cell of the box edge and is 0 beyond it. (detectron2's
  GPU path samples the whole image like this; its CPU path samples only the box +- 1 pixel,
  which differs only where the probability is below 0.5, so not after thresholding.)

  Args:
    masks: [K, M, M] float probabilities (box-relative).
    boxes: [K, 4] float32 (x1, y1, x2, y2) pixels of the target image.
    height: H, static.
    width: W, static.

  Returns:
    [K, H, W] float32 probabilities; threshold at 0.5 for binary masks.
  """
  masks = jnp.asarray(masks, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  m = masks.shape[-1]
  wy = _paste_weights(boxes[:, 1], boxes[:, 3], masks.shape[-2], height)  # [K, H, M]
  wx = _paste_weights(boxes[:, 0], boxes[:, 2], m, width)  # [K, W, M]
  # Separable: rows of the mask to image rows, then columns to image columns.
  return jnp.einsum('khi,kij,kwj->khw', wy, masks, wx, precision=_HIGHEST)


def _paste_weights_numpy(lo, hi, m, start, stop):
  pixel = np.arange(start, stop, dtype=np.float64) + 0.5
  u = (pixel - lo) / max(hi - lo, _EPS) * m - 0.5
  return np.maximum(0.0, 1.0 - np.abs(u[:, None] - np.arange(m)))  # [n, M]


def paste_mask_numpy(mask, box, image_size, threshold=0.5):
  """Host version of `paste_masks` for one mask, thresholded (evaluation).

  Only the box's pixels +- 1 are computed (the rest is 0), as detectron2 does on the CPU.

  Args:
    mask: [M, M] box-relative probabilities.
    box: [4] (x1, y1, x2, y2) pixels of the target image.
    image_size: (h, w) of the target image.
    threshold: pixels with probability >= threshold are inside.

  Returns:
    [h, w] uint8 in {0, 1}.
  """
  h, w = int(image_size[0]), int(image_size[1])
  out = np.zeros((h, w), np.uint8)
  mask = np.asarray(mask, np.float64)
  x1, y1, x2, y2 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
  if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
    return out
  # Pixels whose centres are more than a cell outside the box get zero weight anyway.
  c0 = int(np.clip(np.floor(x1) - 1, 0, w))
  c1 = int(np.clip(np.ceil(x2) + 1, 0, w))
  r0 = int(np.clip(np.floor(y1) - 1, 0, h))
  r1 = int(np.clip(np.ceil(y2) + 1, 0, h))
  if c1 <= c0 or r1 <= r0:
    return out
  wy = _paste_weights_numpy(y1, y2, mask.shape[0], r0, r1)  # [rows, M]
  wx = _paste_weights_numpy(x1, x2, mask.shape[1], c0, c1)  # [cols, M]
  probs = wy @ mask @ wx.T  # [rows, cols]
  out[r0:r1, c0:c1] = probs >= threshold
  return out


def encode_rle(binary_mask):
  """COCO run-length encoding of one binary mask, json-serialisable.

  Args:
    binary_mask: [h, w] uint8 / bool, non-zero inside.

  Returns:
    {'size': [h, w], 'counts': str}, as COCO results files hold segmentations.
  """
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  # pycocotools reads column-major (Fortran-order) uint8 arrays.
  rle = mask_utils.encode(np.asfortranarray(np.asarray(binary_mask) > 0, dtype=np.uint8))
  counts = rle['counts']
  return {'size': [int(v) for v in rle['size']],
          'counts': counts.decode('ascii') if isinstance(counts, bytes) else counts}


def mask_iou(a, b, *, threshold=0.5):
  """IoU of every pair of masks of the same image.

  Args:
    a: [K, H, W] masks (bool, {0, 1} or probabilities).
    b: [L, H, W] masks.
    threshold: values >= threshold are inside.

  Returns:
    [K, L] float32 IoU; 0 where both masks are empty.
  """
  a = (jnp.asarray(a, jnp.float32) >= threshold).astype(jnp.float32)
  b = (jnp.asarray(b, jnp.float32) >= threshold).astype(jnp.float32)
  a = a.reshape(a.shape[0], -1)  # [K, H*W]
  b = b.reshape(b.shape[0], -1)  # [L, H*W]
  inter = a @ b.T  # [K, L]
  union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)
