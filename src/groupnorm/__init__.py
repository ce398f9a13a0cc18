"""groupnorm: Group Normalization with TensorFlow 1.15's contract, for NumPy, PyTorch, JAX and TensorFlow.

``groupnorm.group_norm`` works on any supported array (``numpy.ndarray``, ``torch.Tensor``, ``jax.Array``,
``tf.Tensor``) and returns the same type; framework front-ends live in ``groupnorm.torch``,
``groupnorm.tf1``, ``groupnorm.keras`` and ``groupnorm.flax``, and ``groupnorm.numpy`` has the NumPy
forward pass and its vector-Jacobian product. Importing this package imports no framework.

Example:
    >>> import numpy as np
    >>> import groupnorm
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)  # NHWC
    >>> y = groupnorm.group_norm(x, groups=4)  # statistics over H, W and 2 channels, per image
    >>> y.shape, y.dtype
    ((2, 4, 4, 8), dtype('float32'))
"""

from groupnorm._api import group_norm
from groupnorm._plan import ACTIVATIONS, Plan, make_plan

__all__ = ["ACTIVATIONS", "Plan", "__version__", "group_norm", "make_plan"]

__version__ = "0.1.0"
"""The package version; the only place it is written (the build reads it from here)."""
