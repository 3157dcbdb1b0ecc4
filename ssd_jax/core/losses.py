"""MultiBox loss with hard-negative mining (the reference's MultiBoxLoss)."""

import jax
import jax.numpy as jnp


def hard_negative_mask(background_loss, positive, neg_pos_ratio):
  """Positives plus, per image, the `neg_pos_ratio * num_pos` hardest negatives.

  Args:
    background_loss: [B, P] -log softmax(logits)[..., 0].
    positive: [B, P] bool.
    neg_pos_ratio: negatives mined per positive (3 in the reference).

  Returns:
    [B, P] bool mask of the priors that enter the classification loss.
  """
  num_neg = neg_pos_ratio * jnp.sum(positive, axis=1, keepdims=True)
  loss = jnp.where(positive, -jnp.inf, background_loss)
  # Rank of every prior by descending loss (0 = hardest), as the reference's
  # sort-then-argsort; the sort is stable, so ties go to the lower index.
  order = jnp.argsort(-loss, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  return positive | (rank < num_neg)


def smooth_l1(diff):
  """Elementwise smooth-L1 with beta = 1."""
  abs_diff = jnp.abs(diff)
  return jnp.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5)


def multibox_loss(cls_logits, bbox_pred, cls_targets, loc_targets, *,
                  neg_pos_ratio=3):
  """The reference's MultiBox loss.

  Args:
    cls_logits: [B, P, C] raw class logits (any float dtype; computed in f32).
    bbox_pred: [B, P, 4] predicted (dx, dy, dw, dh).
    cls_targets: [B, P] int, 0 = background.
    loc_targets: [B, P, 4] encoded regression targets.
    neg_pos_ratio: hard negatives mined per positive, per image.

  Returns:
    (reg_loss, cls_loss) float32 scalars: smooth-L1 summed over the positive
    priors, and cross-entropy summed over positives and mined negatives, both
    divided by the number of positives in the whole batch. A batch without
    positives gives 0 for both (the reference gives NaN).
  """
  cls_logits = cls_logits.astype(jnp.float32)
  bbox_pred = bbox_pred.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(cls_logits, axis=-1)
  positive = cls_targets > 0
  selected = hard_negative_mask(
      jax.lax.stop_gradient(-log_probs[..., 0]), positive, neg_pos_ratio)

  cross_entropy = -jnp.take_along_axis(
      log_probs, cls_targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  cls_sum = jnp.sum(jnp.where(selected, cross_entropy, 0.0))
  reg = jnp.sum(smooth_l1(bbox_pred - loc_targets), axis=-1)
  reg_sum = jnp.sum(jnp.where(positive, reg, 0.0))

  num_pos = jnp.sum(positive).astype(jnp.float32)
  denom = jnp.maximum(num_pos, 1.0)
  return reg_sum / denom, cls_sum / denom
