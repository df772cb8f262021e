"""jaxdet: object detection and instance segmentation in JAX/Flax."""

__version__ = '0.1.0'
