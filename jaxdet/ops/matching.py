"""Matchers: assign each anchor / proposal a ground truth and a label.

A matcher maps a similarity matrix (anchors x ground truths) to indices and
labels; it knows nothing about boxes or models. Shapes are static: ground truth
is padded to M with a validity mask, and every output has one entry per
anchor, so the matchers work under `jit` and `vmap` over a batch.
"""

import jax.numpy as jnp

# Labels written by the matchers.
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def argmax_match(similarity, gt_valid, *, positive_threshold, negative_threshold,
                 allow_low_quality=True, gt_ignore=None):
  """Argmax matching with a positive and a negative threshold.

  Each anchor takes the valid, non-ignored ground truth of highest similarity
  (ties: lowest index). Its label is positive when that similarity is
  >= positive_threshold, negative when it is < negative_threshold, and ignore
  in between (Faster R-CNN's 0.7 / 0.3 band; RetinaNet uses 0.5 / 0.5, i.e. no
  band). Ignored ground truths (crowd regions) are never matched: a
  non-positive anchor whose similarity to one of them is >= negative_threshold
  is labelled ignore, so it is neither trained as background nor as object.

  With `allow_low_quality`, every valid non-ignored ground truth whose best
  similarity is > 0 also makes its best anchor(s), all ties included,
  positives matched to it, so that no object is left without an anchor
  (Faster R-CNN section 3.1.2; detectron2 Matcher's low-quality matches; the
  force match of the RetinaNet TPU labeler). When several ground truths force
  the same anchor, it is matched to the one it overlaps most (ties: lowest
  index).

  Args:
    similarity: [N, M] float, e.g. IoU of N anchors with M ground truths.
    gt_valid: [M] bool, False for padding.
    positive_threshold: similarity at or above which an anchor is positive.
    negative_threshold: similarity below which an anchor is negative
      (<= positive_threshold).
    allow_low_quality: force-match every ground truth to its best anchor(s).
    gt_ignore: optional [M] bool, True for crowd / ignored regions.

  Returns:
    matched_gt: [N] int32 index of the matched ground truth; 0 when there is
      none (labels tell whether it means anything).
    labels: [N] int32, 1 positive, 0 negative, -1 ignore.
  """
  similarity = jnp.asarray(similarity, jnp.float32)
  num_anchors, num_gt = similarity.shape
  if num_gt == 0:
    # A static empty ground-truth axis: everything is background.
    return (jnp.zeros((num_anchors,), jnp.int32),
            jnp.full((num_anchors,), NEGATIVE, jnp.int32))
  gt_valid = jnp.asarray(gt_valid, bool)
  if gt_ignore is None:
    gt_ignore = jnp.zeros_like(gt_valid)
  gt_ignore = jnp.asarray(gt_ignore, bool) & gt_valid
  matchable = gt_valid & ~gt_ignore  # [M]

  # -inf keeps padding and crowd columns out of every max / argmax.
  sim = jnp.where(matchable[None, :], similarity, -jnp.inf)  # [N, M]
  matched_gt = jnp.argmax(sim, axis=1).astype(jnp.int32)  # [N]
  best = jnp.max(sim, axis=1)  # [N]

  labels = jnp.where(best >= negative_threshold, IGNORE, NEGATIVE)
  positive = best >= positive_threshold
  labels = jnp.where(positive, POSITIVE, labels)

  # Anchors on a crowd region are not background (COCO does not annotate the
  # individual objects inside it), unless they are positive for a real object.
  ignore_sim = jnp.max(
      jnp.where(gt_ignore[None, :], similarity, -jnp.inf), axis=1)  # [N]
  labels = jnp.where(~positive & (ignore_sim >= negative_threshold), IGNORE, labels)

  if allow_low_quality:
    gt_best = jnp.max(sim, axis=0)  # [M]
    forcing = matchable & (gt_best > 0)  # [M]
    # [N, M]: anchor i is (one of) the best anchors of ground truth j.
    forced = forcing[None, :] & (sim == gt_best[None, :])
    is_forced = jnp.any(forced, axis=1)  # [N]
    forced_gt = jnp.argmax(
        jnp.where(forced, sim, -jnp.inf), axis=1).astype(jnp.int32)
    matched_gt = jnp.where(is_forced, forced_gt, matched_gt)
    labels = jnp.where(is_forced, POSITIVE, labels)

  return matched_gt, labels.astype(jnp.int32)
