"""Data: image I/O, TFDS builders (lol, sice), sources and grain pipelines.

Kept empty of imports on purpose: importing `mirnet_jax.data.images` must not pull in
tensorflow_datasets. Importing `mirnet_jax.data.lol` / `mirnet_jax.data.sice` registers the
TFDS builders.
"""
