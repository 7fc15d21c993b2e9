"""jaxkd: knowledge distillation and model compression for JAX/Flax."""

__version__ = "0.1.0"
