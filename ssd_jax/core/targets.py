"""On-device matching of priors to ground truth (the reference's assign_priors).

Runs inside the jitted train step on ground truth padded to a static number of
boxes per image; no Python loop over images or boxes.
"""

import jax
import jax.numpy as jnp

from ssd_jax.core import box_ops


def _match_one_image(boxes, labels, mask, priors_corner, iou_threshold):
  """Assigns one ground-truth box (or background) to every prior.

  Args:
    boxes: [M, 4] corner form, normalised.
    labels: [M] int, 1..C-1 for valid boxes.
    mask: [M] bool, False = padding.
    priors_corner: [P, 4] corner form priors.
    iou_threshold: a prior whose best IoU is below this is background.

  Returns:
    (matched_index [P] int32, cls_targets [P] int32).
  """
  num_priors = priors_corner.shape[0]
  ious = box_ops.pairwise_iou(priors_corner, boxes)  # [P, M]
  # Padding never wins a prior: its IoU is below anything a real box gives.
  ious = jnp.where(mask[None, :], ious, -1.0)

  best_iou_per_prior = jnp.max(ious, axis=1)
  best_box_per_prior = jnp.argmax(ious, axis=1).astype(jnp.int32)
  best_prior_per_box = jnp.argmax(ious, axis=0).astype(jnp.int32)  # [M]

  # Every valid box claims its best prior. The reference assigns these in box
  # order, so where two boxes share a best prior the later one wins: take the
  # largest box index that claims each prior.
  box_index = jnp.arange(boxes.shape[0], dtype=jnp.int32)
  claims = (best_prior_per_box[None, :] ==
            jnp.arange(num_priors, dtype=jnp.int32)[:, None]) & mask[None, :]
  claiming_box = jnp.max(jnp.where(claims, box_index[None, :], -1), axis=1)
  forced = claiming_box >= 0

  matched = jnp.where(forced, claiming_box, best_box_per_prior)
  matched_iou = jnp.where(forced, 2.0, best_iou_per_prior)
  cls_targets = jnp.where(matched_iou < iou_threshold, 0,
                          labels[matched]).astype(jnp.int32)
  return matched, cls_targets


def encode_targets(boxes, labels, mask, priors, *, iou_threshold=0.5,
                   center_variance=0.1, size_variance=0.2):
  """Classification and regression targets for every prior of every image.

  Equal to the reference's SSDTargetTransform: each valid box forces its best
  prior (a later box wins a prior two boxes share, ties go to the lowest
  index), other priors take their best box if its IoU >= `iou_threshold`.

  Args:
    boxes: [B, M, 4] ground truth, corner form (xmin, ymin, xmax, ymax)
      normalised to [0, 1].
    labels: [B, M] int, classes 1..C-1 (0 may be used for padding).
    mask: [B, M] bool, False marks padding; padding never matches.
    priors: [P, 4] center form (cx, cy, w, h) normalised priors.
    iou_threshold: IoU below which a prior is background (== is positive).
    center_variance: variance of the centre offsets.
    size_variance: variance of the log size ratios.

  Returns:
    loc_targets: [B, P, 4] float32 encoded (dx, dy, dw, dh); 0 at background
      priors (the reference stores an unused value there).
    cls_targets: [B, P] int32, 0 = background.
  """
  priors = jnp.asarray(priors, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  mask = jnp.asarray(mask, bool)
  priors_corner = box_ops.center_to_corner(priors)
  matched, cls_targets = jax.vmap(
      _match_one_image, in_axes=(0, 0, 0, None, None))(
          boxes, labels, mask, priors_corner, iou_threshold)
  matched_boxes = jnp.take_along_axis(boxes, matched[..., None], axis=1)
  positive = cls_targets > 0
  # Background priors may point at a padding box of zero size: encode a safe
  # box there so that no inf/NaN reaches the loss or its gradient.
  safe_boxes = jnp.where(positive[..., None], matched_boxes,
                         box_ops.center_to_corner(priors)[None])
  loc_targets = box_ops.encode(box_ops.corner_to_center(safe_boxes), priors,
                               center_variance, size_variance)
  loc_targets = jnp.where(positive[..., None], loc_targets, 0.0)
  return loc_targets, cls_targets
