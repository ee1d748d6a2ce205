"""mirnet-jax: MIRNet (Zamir et al., ECCV 2020) in JAX/Flax for low-light image enhancement."""

__version__ = '0.1.0'
