"""Process-wide test set-up.

Triton (installed for the GPU kernels' interpreter tests) and TensorFlow/JAX each bring their own LLVM;
whichever registers LLVM's command-line options second aborts the process ("registered more than
once"), unless Triton's comes first. torch imports Triton lazily (``torch.compile``), often after a test
module has imported TensorFlow or JAX, so every test process imports it first, where it is installed.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401
