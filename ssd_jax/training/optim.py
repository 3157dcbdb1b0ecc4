"""Optimizer and learning-rate schedule (the reference's SGD + WarmupMultiStepLR).

Schedule semantics: f(t) = lr * warmup(t) * gamma ** bisect_right(lr_steps, t),
warmup(t) = wf * (1 - t / W) + t / W for t < W, else 1. Optimizer update number
i (1-based) uses f(i - 1); optax calls the schedule with the 0-based update
count, so `learning_rate_schedule(config)(i - 1)` is exactly that. The
reference's log line of iteration i prints f(i).
"""

import bisect

import jax
import jax.numpy as jnp
import optax


def learning_rate_at(config, step):
  """f(step) in Python double precision (for logging and tests).

  The reference's WarmupMultiStepLR calls its argument `epoch` but is
  stepped once per iteration: `step` is that count.
  """
  s = config.solver
  if step < s.warmup_iters:
    alpha = step / s.warmup_iters
    warmup = s.warmup_factor * (1 - alpha) + alpha
  else:
    warmup = 1
  return s.lr * warmup * s.gamma ** bisect.bisect_right(list(s.lr_steps),
                                                        step)


def learning_rate_schedule(config):
  """optax schedule: count (0-based update number) -> learning rate."""
  s = config.solver
  lr_steps = jnp.asarray(s.lr_steps, jnp.int32)

  def schedule(count):
    count = jnp.asarray(count)
    alpha = count.astype(jnp.float32) / max(s.warmup_iters, 1)
    warmup = jnp.where(count < s.warmup_iters,
                       s.warmup_factor * (1 - alpha) + alpha, 1.0)
    num_decays = jnp.sum(count >= lr_steps)
    return s.lr * warmup * jnp.power(s.gamma, num_decays.astype(jnp.float32))

  return schedule


def create_optimizer(config):
  """The optimizer of `config.solver`.

  'sgd' (the reference): weight decay added to every gradient (biases and the
  L2Norm scale too) before heavy-ball momentum, exactly torch.optim.SGD.
  'adam': Adam with the same schedule and decoupled-free L2 decay (for small
  demo models).
  """
  s = config.solver
  schedule = learning_rate_schedule(config)
  if s.optimizer == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(s.weight_decay),
        optax.sgd(schedule, momentum=s.momentum or None))
  if s.optimizer == 'adam':
    return optax.chain(
        optax.add_decayed_weights(s.weight_decay),
        optax.adam(schedule))
  raise ValueError(
      f"config.solver.optimizer must be 'sgd' or 'adam', got {s.optimizer!r}")


def with_schedule_at(opt_state, step):
  """`opt_state` with its learning-rate schedule standing at update `step`.

  optax keeps the schedule's position in the optimizer state (the count of
  ScaleByScheduleState). A fresh state for a model that has already taken
  `step` updates (fine-tuning an imported checkpoint) must continue the
  schedule from there, as an uninterrupted run would, not warm up again.
  Other counts (Adam's bias correction) restart with their zeroed moments.
  """
  def move(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jnp.full_like(node.count, step))
    return node
  return jax.tree.map(
      move, opt_state,
      is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))
