"""Pure JAX array operations shared by the model and the losses."""
