"""The plan: validation of every argument, axis resolution, views, caching, and framework independence."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import groupnorm
from groupnorm._plan import MaskError, check_mask, make_plan, resolve_activation


def plan(shape=(2, 4, 4, 8), dtype="float32", **kwargs):
    kwargs.setdefault("groups", 4)
    return make_plan(shape, dtype, **kwargs)


# -- the contract's errors, with TF 1.15's phrases ---------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"shape": None}, "undefined rank"),
        ({"channels_axis": 4}, "Axis is out of bounds."),
        ({"channels_axis": -5}, "Axis is out of bounds."),
        ({"reduction_axes": (4,)}, "Axis is out of bounds."),
        ({"reduction_axes": (-5, 1)}, "Axis is out of bounds."),
        ({"shape": (2, 4, 4, None)}, "undefined channel dimension"),
        ({"shape": (2, None, 4, 8)}, "undefined dimensions"),
        ({"reduction_axes": (1, 3)}, "reduction_axis must be mutually exclusive with channels_axis"),
        ({"reduction_axes": (-1,)}, "reduction_axis must be mutually exclusive with channels_axis"),
        ({"reduction_axes": (1, -3)}, "name the same axis twice"),
        ({"reduction_axes": (2, 2)}, "name the same axis twice"),
        ({"groups": 16}, "Invalid groups 16 for 8 channels."),
        ({"groups": 3}, "8 channels is not commensurate with 3 groups."),
        ({"groups": 0}, "groups must be a positive int"),
        ({"groups": -2}, "groups must be a positive int"),
        ({"epsilon": -1e-6}, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number >= 0"),
        ({"gamma_shape": (4,)}, r"gamma must have shape \[8\]"),
        ({"gamma_shape": (1, 8)}, r"gamma must have shape \[8\]"),
        ({"beta_shape": ()}, r"beta must have shape \[8\]"),
    ],
)
def test_value_errors(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        plan(**kwargs)


def test_rank_itself_is_out_of_bounds():
    # TF 1.15 accepted channels_axis == rank and reduction axes == rank; the contract does not.
    with pytest.raises(ValueError, match=r"Axis is out of bounds."):
        plan(shape=(2, 8), channels_axis=2, reduction_axes=())
    with pytest.raises(ValueError, match=r"Axis is out of bounds."):
        plan(shape=(2, 8), channels_axis=1, reduction_axes=(2,))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"groups": True}, "groups must be a positive int"),
        ({"groups": 4.0}, "groups must be a positive int"),
        ({"groups": "4"}, "groups must be a positive int"),
        ({"channels_axis": True}, "channels_axis must be an int"),
        ({"channels_axis": 1.0}, "channels_axis must be an int"),
        ({"reduction_axes": (1, False)}, "reduction_axes must be an int"),
        ({"reduction_axes": (1.0, 2)}, "reduction_axes must be an int"),
        ({"reduction_axes": "12"}, "reduction_axes must be an int or a sequence"),
        ({"reduction_axes": None}, "reduction_axes must be an int or a sequence"),
        ({"epsilon": "1e-5"}, "epsilon must be a real number"),
        ({"epsilon": True}, "epsilon must be a real number"),
        ({"mean_close_to_zero": 1}, "mean_close_to_zero must be a bool"),
        ({"dtype": "int32"}, "needs a floating-point input"),
        ({"dtype": "bool"}, "needs a floating-point input"),
        ({"dtype": "complex64"}, "needs a floating-point input"),
        ({"shape": (2, 4.0, 4, 8)}, "shape must hold non-negative ints"),
        ({"shape": (2, -1, 4, 8)}, "shape must hold non-negative ints"),
    ],
)
def test_type_errors(kwargs, phrase):
    with pytest.raises(TypeError, match=phrase):
        plan(**kwargs)


def test_activation_resolution():
    assert resolve_activation(None) is None
    assert resolve_activation("ReLU") == "relu"
    assert resolve_activation(np.tanh) is np.tanh
    with pytest.raises(ValueError, match=r"Unknown activation 'tanh'"):
        resolve_activation("tanh")
    with pytest.raises(TypeError, match=r"activation must be None, a callable"):
        resolve_activation(3)


# -- resolution ---------------------------------------------------------------------------------------


def test_axes_are_resolved_and_kept_axes_found():
    p = plan(shape=(2, 3, 4, 5, 8), channels_axis=-1, reduction_axes=(-2, -3))
    assert (p.channels_axis, p.reduction_axes, p.kept_axes) == (4, (2, 3), (0, 1))
    assert (p.channels, p.groups, p.group_channels, p.group_size) == (8, 4, 2, 2 * 4 * 5)


def test_int_reduction_axis_and_numpy_ints_are_accepted():
    p = plan(reduction_axes=np.int64(1), groups=np.int32(2))
    assert (p.reduction_axes, p.groups) == ((1,), 2)
    assert type(p.groups) is int


@pytest.mark.parametrize(
    ("shape", "c", "axes", "view", "reduce"),
    [
        ((2, 4, 4, 8), -1, (-3, -2), (2, 16, 4, 2), (1, 3)),  # NHWC: (N, HW, G, C/G)
        ((2, 8, 4, 4), 1, (2, 3), (8, 32), (1,)),  # NCHW: (N*G, C/G*H*W)
        ((4, 4, 8), -1, (0, 1), (16, 4, 2), (0, 2)),  # HWC without batch
        ((3, 8), -1, (), (12, 2), (1,)),  # statistics over the group's channels only
        ((2, 3, 4, 4, 8), -1, (-3, -2), (6, 16, 4, 2), (1, 3)),  # video: time is kept
    ],
)
def test_statistics_view_merges_like_axes(shape, c, axes, view, reduce):
    p = plan(shape=shape, channels_axis=c, reduction_axes=axes)
    assert p.view_shape(shape) == view
    assert p.view_reduce_axes == reduce


def test_views_with_dynamic_batch_use_runtime_dims():
    p = plan(shape=(None, 4, 4, 8))
    assert p.view_shape((5, 4, 4, 8)) == (5, 16, 4, 2)
    assert p.stats_shape((5, 4, 4, 8)) == (5, 1, 1, 4, 1)
    assert p.coef_shape((5, 4, 4, 8)) == (5, 1, 1, 4, 2)
    assert p.param_shape == (1, 1, 1, 4, 2)


def test_plans_are_cached_and_immutable():
    a = plan(reduction_axes=[1, 2])
    assert plan(reduction_axes=(1, 2)) is a
    assert plan(reduction_axes=(1, 2), groups=2) is not a
    with pytest.raises(AttributeError):
        a.groups = 2  # type: ignore[misc]


def test_cache_does_not_confuse_bools_with_ints():
    plan(reduction_axes=(1, 2))
    with pytest.raises(TypeError):
        plan(reduction_axes=(True, 2))


# -- the package ---------------------------------------------------------------------------------------


def test_import_groupnorm_imports_no_framework():
    code = (
        "import sys, groupnorm, groupnorm.numpy\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unsupported_types_are_named():
    with pytest.raises(TypeError, match=r"does not support inputs of type list; supported: numpy.ndarray"):
        groupnorm.group_norm([[1.0, 2.0]], groups=1)


def test_parameters_without_shape_are_refused():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError, match=r"gamma must be an array of shape"):
        groupnorm.group_norm(x, 2, reduction_axes=(), gamma=[1.0] * 4)


def test_docstring_example():
    import doctest

    import groupnorm._api

    failures, tried = doctest.testmod(groupnorm._api, raise_on_error=False, verbose=False)
    assert tried > 0 and failures == 0


# -- masks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(2, 4, 4, 8), (4, 4, 8), (8,), (1,), (), (2, 1, 4, 1), (None, 4, 1, 8), (4, None, 1)]
)
def test_masks_that_broadcast_are_accepted(shape):
    check_mask(plan(), shape, "bool")


def test_masks_against_dynamic_input_dims_are_left_to_run_time():
    check_mask(plan(shape=(None, 4, 4, 8)), (3, 4, 4, 8), "bool")


@pytest.mark.parametrize(
    ("shape", "dtype", "phrase"),
    [
        ((2, 4, 4, 8), "int32", "must be None or a boolean array, got dtype int32"),
        ((2, 4, 4, 8), "float32", "must be None or a boolean array"),
        (None, "bool", "mask has undefined rank"),
        ((2, 4, 4, 4), "bool", r"mask of shape \[2, 4, 4, 4\] does not broadcast to the input's shape \[2, 4, 4, 8\]"),
        ((3, 1, 1, 1), "bool", "does not broadcast"),
        ((1, 2, 4, 4, 8), "bool", "does not broadcast"),
    ],
)
def test_mask_errors_are_both_value_and_type_errors(shape, dtype, phrase):
    with pytest.raises(MaskError, match=phrase) as info:
        check_mask(plan(), shape, dtype)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError)
