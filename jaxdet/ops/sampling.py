"""Fixed-size samplers of training examples for two-stage detectors, and SNIP validity.

A sampler maps per-candidate labels (1 positive, 0 negative, -1 ignore; the output of
`ops/matching.py`) to a fixed number S of candidate indices, so that the RPN (256 anchors,
half positive) and the RoI head (512 RoIs, a quarter positive) see batches of static shape:

  * `sample_fixed`: Faster R-CNN's random sampler (detectron2 `subsample_labels`): up to
    floor(S * fraction) positives drawn uniformly, the rest of the S slots negatives drawn
    uniformly; slots left over when there are too few candidates are marked invalid.
  * `iou_balanced_negatives`: Libra R-CNN's IoU-balanced negative sampling (Pang et al. 2019,
    sec. 3.1; mmdetection `IoUBalancedNegSampler`): negatives spread evenly over K IoU bins.
  * `instance_balanced_positives`: Libra R-CNN's instance-balanced positives (mmdetection
    `InstanceBalancedPosSampler`): each ground truth gets a similar share of the positives.
  * `libra_sample`: both at once, Libra R-CNN's RoI sampler (`CombinedSampler`).

Every draw is "sort by a random priority and take the first k", done with `jax.lax.top_k` on
uniform keys: the first k of a random permutation of a set are a uniformly random k-subset.
Balanced samplers raise the priority of the candidates inside their per-bin quota by a whole
tier, so one top-k takes the quota first and fills the shortfall at random, with no loops.
Shapes are static; each function handles one image and is `vmap`-ed over the batch.

Output convention (all samplers): `indices [S] int32` into the candidates, positives first;
`sampled_labels [S] int32` (1 / 0, -1 for unfilled slots); `valid [S] bool`. Unfilled slots
hold index 0.

`snip_valid` and `snip_anchor_labels` implement SNIP's scale-specific training (Singh & Davis
2018, sec. 6.1 and 7.2): objects outside a resolution's valid size range do not train it.
"""

import math

import jax
import jax.numpy as jnp

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def _num_positives(num_samples, positive_fraction):
  # detectron2 `subsample_labels`: int(num_samples * positive_fraction).
  return int(math.floor(num_samples * positive_fraction))


def _tier_ranks(key, group, eligible, quota):
  """Marks, per group, a uniformly random subset of at most `quota` eligible members.

  The members of each group are ranked by a random key; a member is inside the quota when
  its rank within its group is < quota.

  Args:
    key: PRNG key.
    group: [N] int32 group of each candidate (bin, ground truth), >= 0.
    eligible: [N] bool, candidates that take part.
    quota: scalar int (may be traced), members per group.

  Returns:
    [N] bool, True for the eligible candidates inside their group's quota.
  """
  n = group.shape[0]
  u = jax.random.uniform(key, (n,), jnp.float32)
  # Ineligible candidates go to a group past every real one so they rank last.
  big = jnp.max(jnp.where(eligible, group, 0)) + 1
  group = jnp.where(eligible, group, big)
  # Sort by (group, random key); a member's rank is its sorted position minus the first
  # sorted position of its group, found by a running max over the group starts.
  order = jnp.lexsort((u, group))  # [N]
  sorted_group = group[order]
  position = jnp.arange(n, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones((1,), bool), sorted_group[1:] != sorted_group[:-1]])
  first = jax.lax.cummax(jnp.where(starts, position, 0))  # [N]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(position - first)
  return eligible & (rank < quota)


def _draw(key, eligible, count, k, preferred=None):
  """Order in which `count` of the eligible candidates are drawn, as `k` padded slots.

  Args:
    key: PRNG key.
    eligible: [N] bool.
    count: scalar int32 (traced), number drawn, <= number eligible and <= k.
    k: static number of output slots.
    preferred: optional [N] bool or float tier (0, 1, 2); eligible candidates of a higher
      tier are drawn before those of a lower one, each tier in uniformly random order.

  Returns:
    [k] int32: the drawn candidates in slots 0..count-1, 0 after them.
  """
  n = eligible.shape[0]
  priority = jax.random.uniform(key, (n,), jnp.float32)
  if preferred is not None:
    priority = priority + preferred.astype(jnp.float32)
  priority = jnp.where(eligible, priority, -1.0)
  if n < k:
    priority = jnp.concatenate([priority, jnp.full((k - n,), -1.0)])
  _, idx = jax.lax.top_k(priority, k)
  ok = jnp.arange(k) < count
  return jnp.where(ok, idx, 0).astype(jnp.int32)


def _combine(labels, num_samples, positive_fraction, key, pos_preferred=None,
             neg_preferred=None):
  """Positives then negatives into S slots (the shared body of every sampler)."""
  labels = jnp.asarray(labels, jnp.int32)
  s = num_samples
  positive = labels == POSITIVE
  negative = labels == NEGATIVE
  num_pos = jnp.minimum(jnp.sum(positive), _num_positives(s, positive_fraction))
  num_neg = jnp.minimum(jnp.sum(negative), s - num_pos)
  key_pos, key_neg = jax.random.split(key)
  pos_idx = _draw(key_pos, positive, num_pos, s, pos_preferred)
  neg_idx = _draw(key_neg, negative, num_neg, s, neg_preferred)
  # Slot i holds positive i while i < num_pos, then negative i - num_pos.
  slot = jnp.arange(s)
  neg_slot = jnp.clip(slot - num_pos, 0, s - 1)
  is_pos = slot < num_pos
  valid = slot < num_pos + num_neg
  indices = jnp.where(is_pos, pos_idx, neg_idx[neg_slot])
  indices = jnp.where(valid, indices, 0).astype(jnp.int32)
  sampled = jnp.where(is_pos, POSITIVE, NEGATIVE)
  sampled = jnp.where(valid, sampled, IGNORE).astype(jnp.int32)
  return indices, sampled, valid


def sample_fixed(key, labels, *, num_samples: int, positive_fraction: float):
  """Random fixed-size sampling of positives and negatives (Faster R-CNN, sec. 3.1.3).

  Draws min(#positives, floor(S * positive_fraction)) positives uniformly at random, then
  min(#negatives, S - drawn positives) negatives uniformly at random (detectron2
  `subsample_labels`): an image with few positives is padded with negatives, an image with
  no objects trains on negatives only. Ignored candidates (-1) are never drawn.

  Args:
    key: PRNG key.
    labels: [N] int32, 1 positive, 0 negative, -1 ignore (also padding).
    num_samples: S, static output size (RPN 256, RoI head 512).
    positive_fraction: target share of positives (RPN 0.5, RoI head 0.25).

  Returns:
    indices: [S] int32 into labels; positives first, then negatives, then 0 for unfilled.
    sampled_labels: [S] int32, 1 / 0 for sampled slots, -1 for unfilled ones.
    valid: [S] bool, True for filled slots.
  """
  return _combine(labels, num_samples, positive_fraction, key)


def _iou_balanced_preference(key, negative, max_overlaps, count, *, num_bins,
                             floor_threshold, floor_fraction):
  """Which negatives Libra R-CNN's IoU-balanced sampler draws first.

  Follows mmdetection `IoUBalancedNegSampler` (reference/rcnn_family.md sec. 1.2): the
  negatives with IoU >= floor_threshold form the IoU set; with floor_threshold == 0 the IoU
  set is IoU > 0; with floor_threshold < 0 it is every negative and the bins start at 0 (the
  Libra default). From the IoU set, at most int(count * (1 - floor_fraction)) are drawn: if it
  holds more, [floor, max IoU over all candidates) is cut into num_bins equal bins, each gives
  up to int(budget / num_bins) random members and the shortfall is filled at random from the
  rest of the IoU set. The floor set (the other negatives) then fills up to `count`, and any
  remaining shortfall comes from all negatives at random.

  Returns:
    [N] float32 tier of each negative (higher is drawn first; ties at random).
  """
  n = negative.shape[0]
  floor = max(float(floor_threshold), 0.0)
  if floor_threshold < 0:
    iou_set = negative
  elif floor_threshold == 0:
    iou_set = negative & (max_overlaps > 0)
  else:
    iou_set = negative & (max_overlaps >= floor_threshold)
  floor_set = negative & ~iou_set
  budget = jnp.floor(count * (1.0 - floor_fraction)).astype(jnp.int32)
  key_bins, key_rest = jax.random.split(key)

  if num_bins >= 2:
    max_iou = jnp.max(max_overlaps)
    interval = (max_iou - floor) / num_bins
    bins = jnp.floor((max_overlaps - floor) / jnp.maximum(interval, 1e-12))
    # Bin i is [floor + i * interval, floor + (i + 1) * interval): an IoU equal to the
    # maximum falls in no bin and is only drawn as fill, as in mmdetection.
    binned = iou_set & (bins >= 0) & (bins < num_bins)
    bins = jnp.clip(bins, 0, num_bins - 1).astype(jnp.int32)
    quota = budget // num_bins
    in_quota = _tier_ranks(key_bins, bins, binned, quota)
  else:
    in_quota = jnp.zeros((n,), bool)
  # Order inside the IoU set: quota members first, then the others, each at random; the
  # first `budget` of that order are the IoU-sampled negatives.
  u = jax.random.uniform(key_rest, (n,), jnp.float32) + in_quota
  u = jnp.where(iou_set, u, -1.0)
  order = jnp.argsort(-u)
  iou_rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  iou_taken = iou_set & (iou_rank < budget)
  return 2.0 * iou_taken + 1.0 * floor_set


def _instance_balanced_preference(key, positive, matched_gt, count):
  """Which positives Libra R-CNN's instance-balanced sampler draws first.

  mmdetection `InstanceBalancedPosSampler` (reference/rcnn_family.md sec. 1.3): each ground
  truth with positives may give round(count / #such gts) + 1 of them (at random); the count is
  then filled at random from the unused positives, or cut at random when over. When all
  positives fit into `count`, every one is taken anyway.

  Returns:
    [N] bool, True for positives inside their ground truth's quota.
  """
  matched_gt = jnp.asarray(matched_gt, jnp.int32)
  # Number of distinct ground truths with at least one positive: the value changes along
  # the sorted ids of the positives' ground truths (non-positives sort first as -1).
  ids = jnp.sort(jnp.where(positive, matched_gt, -1))  # [N]
  starts = ids != jnp.concatenate([jnp.full((1,), -1, jnp.int32), ids[:-1]])
  num_gts = jnp.sum(starts & (ids >= 0))
  # Python's round (halves to even), as mmdetection; jnp.round rounds halves to even too.
  per_gt = jnp.round(count / jnp.maximum(num_gts, 1)).astype(jnp.int32) + 1
  return _tier_ranks(key, matched_gt, positive, per_gt)


def iou_balanced_negatives(key, labels, max_overlaps, *, num_samples: int,
                           positive_fraction: float, num_bins: int = 3,
                           floor_threshold: float = -1.0, floor_fraction: float = 0.0):
  """Random positives, IoU-balanced negatives (Libra R-CNN, sec. 3.1, eq. 1).

  Random sampling draws most negatives from the many easy ones at IoU ~0; Libra R-CNN splits
  the negatives' IoU range into K bins and draws N / K from each, so hard negatives
  (IoU in [0.05, 0.5)) are sampled in proportion to their share of informative examples.
  Counts are as in `sample_fixed`; only which negatives are drawn changes.

  Args:
    key: PRNG key.
    labels: [N] int32, 1 positive, 0 negative, -1 ignore.
    max_overlaps: [N] float32 IoU of each candidate with its best ground truth (0 without
      ground truth).
    num_samples: S.
    positive_fraction: target share of positives.
    num_bins: K (Libra default 3).
    floor_threshold: negatives below it are drawn only after the IoU-balanced ones; -1 (the
      Libra default) puts every negative in the bins, which then start at IoU 0.
    floor_fraction: share of the negatives reserved for the floor set (default 0).

  Returns:
    (indices [S] int32, sampled_labels [S] int32, valid [S] bool) as `sample_fixed`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  max_overlaps = jnp.asarray(max_overlaps, jnp.float32)
  key, key_neg = jax.random.split(key)
  s = num_samples
  num_pos = jnp.minimum(jnp.sum(labels == POSITIVE), _num_positives(s, positive_fraction))
  num_neg = jnp.minimum(jnp.sum(labels == NEGATIVE), s - num_pos)
  tier = _iou_balanced_preference(
      key_neg, labels == NEGATIVE, max_overlaps, num_neg, num_bins=num_bins,
      floor_threshold=floor_threshold, floor_fraction=floor_fraction)
  return _combine(labels, s, positive_fraction, key, neg_preferred=tier)


def instance_balanced_positives(key, labels, matched_gt, *, num_samples: int,
                                positive_fraction: float):
  """Instance-balanced positives, random negatives (Libra R-CNN, sec. 3.1; mmdetection).

  Large objects overlap many proposals and would dominate random positive sampling; here each
  ground truth contributes at most round(P / #gts) + 1 of the P positives before the rest is
  filled at random. Counts are as in `sample_fixed`.

  Args:
    key: PRNG key.
    labels: [N] int32, 1 positive, 0 negative, -1 ignore.
    matched_gt: [N] int32 index of each candidate's ground truth (read for positives).
    num_samples: S.
    positive_fraction: target share of positives.

  Returns:
    (indices [S] int32, sampled_labels [S] int32, valid [S] bool) as `sample_fixed`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  key, key_pos = jax.random.split(key)
  positive = labels == POSITIVE
  num_pos = jnp.minimum(jnp.sum(positive), _num_positives(num_samples, positive_fraction))
  preferred = _instance_balanced_preference(key_pos, positive, matched_gt, num_pos)
  return _combine(labels, num_samples, positive_fraction, key, pos_preferred=preferred)


def libra_sample(key, labels, max_overlaps, matched_gt, *, num_samples: int,
                 positive_fraction: float, num_bins: int = 3,
                 floor_threshold: float = -1.0, floor_fraction: float = 0.0):
  """Libra R-CNN's RoI sampler: instance-balanced positives and IoU-balanced negatives.

  The combination of mmdetection's Libra config (`CombinedSampler`, 512 RoIs, 0.25 positive,
  `InstanceBalancedPosSampler` + `IoUBalancedNegSampler(floor_thr=-1, num_bins=3)`).
  Arguments and outputs as `iou_balanced_negatives` and `instance_balanced_positives`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  max_overlaps = jnp.asarray(max_overlaps, jnp.float32)
  key, key_pos, key_neg = jax.random.split(key, 3)
  s = num_samples
  positive = labels == POSITIVE
  num_pos = jnp.minimum(jnp.sum(positive), _num_positives(s, positive_fraction))
  num_neg = jnp.minimum(jnp.sum(labels == NEGATIVE), s - num_pos)
  pos_pref = _instance_balanced_preference(key_pos, positive, matched_gt, num_pos)
  neg_tier = _iou_balanced_preference(
      key_neg, labels == NEGATIVE, max_overlaps, num_neg, num_bins=num_bins,
      floor_threshold=floor_threshold, floor_fraction=floor_fraction)
  return _combine(labels, s, positive_fraction, key, pos_preferred=pos_pref,
                  neg_preferred=neg_tier)


def snip_valid(boxes, valid_range, *, scale=None):
  """SNIP validity of boxes at one training resolution (Singh & Davis 2018, sec. 6.1).

  A box is valid at a resolution when its size, sqrt(w * h) measured in the original image,
  lies in [lo, hi] (both ends inclusive); invalid ground truth and proposals are left out of
  that resolution's training. Paper ranges (sqrt-area, original pixels): (1400, 2000) ->
  [0, 80], (800, 1200) -> [40, 160], (480, 800) -> [120, inf]; the RPN at (800, 1200) uses
  [0, 160].

  Args:
    boxes: [..., 4] (x1, y1, x2, y2); original-image pixels, or input pixels with `scale`.
    valid_range: (lo, hi) sqrt-area in original pixels; hi < 0 or inf means unbounded, as
      the SNIPER configs write (-1, 80).
    scale: optional [..., 2] (sy, sx) input pixels per original pixel (the batch's `scale`,
      broadcast against boxes[..., 0]); boxes are mapped back to original pixels first.

  Returns:
    [...] bool.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  if scale is not None:
    scale = jnp.asarray(scale, jnp.float32)
    w = w / scale[..., 1]
    h = h / scale[..., 0]
  size = jnp.sqrt(w * h)
  lo, hi = valid_range
  lo = -jnp.inf if lo is None or lo < 0 else float(lo)
  hi = jnp.inf if hi is None or hi < 0 else float(hi)
  return (size >= lo) & (size <= hi)


def snip_anchor_labels(labels, similarity, gt_valid, gt_snip_valid, *, threshold=0.3):
  """SNIP's RPN rule: anchors overlapping an out-of-range ground truth are ignored.

  All ground truth labels the anchors, then every anchor with IoU > threshold to a ground
  truth that is invalid at this resolution becomes -1 (no gradient), overriding positives
  (SNIP sec. 7.2; SNIPER's anchor target does the same after positive assignment).

  Args:
    labels: [A] int32 matcher labels (1, 0, -1).
    similarity: [A, M] float32 IoU of anchors with ground truth.
    gt_valid: [M] bool, False for padding.
    gt_snip_valid: [M] bool, `snip_valid` of the ground truth.
    threshold: IoU above which an anchor is ignored (0.3).

  Returns:
    [A] int32 labels.
  """
  invalid = jnp.asarray(gt_valid, bool) & ~jnp.asarray(gt_snip_valid, bool)  # [M]
  hit = jnp.any((jnp.asarray(similarity, jnp.float32) > threshold) & invalid[None, :],
                axis=1)  # [A]
  return jnp.where(hit, IGNORE, jnp.asarray(labels, jnp.int32)).astype(jnp.int32)
