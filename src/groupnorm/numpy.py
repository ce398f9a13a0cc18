"""groupnorm for NumPy: the forward pass and its vector-Jacobian product.

``forward`` is :func:`groupnorm.group_norm` for NumPy arrays (and anything ``numpy.asarray`` takes);
``vjp`` gives the gradients of a loss with respect to the input, ``gamma`` and ``beta``. Both
accumulate statistics in float32 or wider, and they are the reference the other backends are tested
against.
"""

from groupnorm.backends.numpy import Gradients, forward, vjp

__all__ = ["Gradients", "forward", "vjp"]
