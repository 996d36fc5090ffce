"""dastc_jax: DA-STC domain-adaptive video semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"
