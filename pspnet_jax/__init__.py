"""PSPNet in JAX/Flax: model, PyTorch weight porting, training and evaluation."""

__version__ = '0.1.0'
