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

import os

from hypothesis import settings

# `make test` draws the same examples every run, so that a run's verdict is the code's and not the draw's;
# HYPOTHESIS_PROFILE=explore draws new ones (how the property tests look for new failures).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
