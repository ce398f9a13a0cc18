"""groupnorm: Group Normalization with TensorFlow 1.15's contract, for NumPy, PyTorch, JAX and TensorFlow.

``groupnorm.group_norm`` works on any supported array; framework front-ends live in ``groupnorm.torch``,
``groupnorm.tf1``, ``groupnorm.keras`` and ``groupnorm.flax``. Importing this package imports no framework.
"""

from groupnorm._api import group_norm
from groupnorm._plan import ACTIVATIONS, Plan, make_plan

__all__ = ["ACTIVATIONS", "Plan", "__version__", "group_norm", "make_plan"]

__version__ = "0.1.0"
