"""MIRNet in Flax Linen: the public model API."""

from mirnet_jax.models.mirnet import (
  MIRNet,
  count_params,
  create_model,
  crop,
  pad_to_multiple,
  param_shapes,
)

__all__ = ['MIRNet', 'count_params', 'create_model', 'crop', 'pad_to_multiple', 'param_shapes']
