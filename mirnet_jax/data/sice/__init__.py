"""TFDS builder package for SICE Part 1; importing it registers the `sice` builder with TFDS."""

from mirnet_jax.data.sice.sice_dataset_builder import Builder

__all__ = ['Builder']
