"""The model's variables apart from its graph, for pure jitted functions.

An NNX SSD is split once into static graph definitions (one for training,
one for evaluation: BatchNorm's mode is part of the graph) and array state:
`params` (the nnx.Param variables) and `model_state` (the others, BatchNorm
statistics). Pure functions merge them back inside jit.
"""

import dataclasses
from typing import Any

import flax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static halves of the model: graph definitions for training and eval."""
  train: Any
  eval: Any


@flax.struct.dataclass
class ModelVariables:
  """A model's arrays: `params` (nnx.State of nnx.Param) and `model_state`."""
  params: Any
  model_state: Any


def split_model(model):
  """-> (ModelDef, params, model_state) of an NNX SSD in training mode."""
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  model.train()
  train_def, params, model_state = nnx.split(model, nnx.Param, ...)
  return ModelDef(train=train_def, eval=eval_def), params, model_state


def model_variables(model):
  """-> (ModelDef, ModelVariables) of an NNX SSD."""
  model_def, params, model_state = split_model(model)
  return model_def, ModelVariables(params=params, model_state=model_state)


def eval_model(model_def, variables):
  """The eval-mode NNX model of `variables` (anything with params and
  model_state: ModelVariables, or a training.TrainState)."""
  return nnx.merge(model_def.eval, variables.params, variables.model_state)


def to_pure_dict(variables):
  """All model variables as one nested dict of arrays (the checkpoint's
  'model' item, the layout torch_import writes)."""
  return nnx.to_pure_dict(
      nnx.merge_state(variables.params, variables.model_state))


def from_pure_dict(variables, tree):
  """`tree` (as `to_pure_dict` gives) into the structure of `variables`.

  Returns (params, model_state).
  """
  merged = nnx.merge_state(variables.params, variables.model_state)
  nnx.replace_by_pure_dict(merged, tree)
  return nnx.split_state(merged, nnx.Param, ...)
