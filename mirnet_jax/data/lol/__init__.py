"""TFDS builder package for LOL; importing it registers the `lol` builder with TFDS."""

from mirnet_jax.data.lol.lol_dataset_builder import Builder

__all__ = ['Builder']
