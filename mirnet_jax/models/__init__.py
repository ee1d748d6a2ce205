"""MIRNet (ECCV 2020) and MIRNet-v2 (TPAMI 2022) in Flax Linen: the public model API."""

from mirnet_jax.models.mirnet import (
  ARCHITECTURES,
  MIRNet,
  architecture,
  count_params,
  create_model,
  crop,
  model_config,
  pad_to_multiple,
  param_shapes,
  stream_shapes,
)
from mirnet_jax.models.mirnet_v2 import MIRNetV2

__all__ = [
  'ARCHITECTURES',
  'MIRNet',
  'MIRNetV2',
  'architecture',
  'count_params',
  'create_model',
  'crop',
  'model_config',
  'pad_to_multiple',
  'param_shapes',
  'stream_shapes',
]
