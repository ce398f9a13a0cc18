"""The hard regimes of the numerics on every torch path, against the float64 reference.

Paths: the operator in eager mode (the compiled kernel for float32 on the CPU), the composite in eager
mode (no kernel: its rescue is a Python branch), the composite as tracers see it (the rescue computed for
every call and selected per group: what ``torch.compile``'s exported graphs, ``torch.export``, ONNX and
``torch.jit.trace`` hold), ``torch.func.vmap``, ``torch.jit.trace``, ``torch.export`` and ONNX Runtime. Every
path's statistics are those of :mod:`groupnorm._numerics`, checked against the NumPy backend, its plain
transcription.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm
import groupnorm.numpy
import groupnorm.torch as gt
from groupnorm import make_plan
from groupnorm.backends import numpy as np_backend
from groupnorm.backends import torch as backend
from groupnorm.backends._layout import channel_view
from groupnorm.backends.torch import _composite
from hard_regimes import HARD_CONFIGS as SHARED_CONFIGS
from hard_regimes import check_hard, conditioning, group_rstd, hard_inputs, parameters
from support import Config, reference_group_norm

#: the shared configurations and an NCHW one of several channels per group
HARD_CONFIGS = (*SHARED_CONFIGS, Config((2, 8, 3, 5), 4, 1, (2, 3)))

PATHS = ("kernel", "composite", "composite-traced", "vmap")


@contextlib.contextmanager
def on_path(path: str) -> Iterator[None]:
    """The torch path ``path`` for the calls inside."""
    with pytest.MonkeyPatch.context() as mp:
        if path != "kernel":
            mp.setattr(backend, "KERNELS", False)
        if path == "composite-traced":
            mp.setattr(_composite, "_can_branch", lambda predicate: False)
        yield


def run(path: str, x: torch.Tensor, cfg: Config, gamma: Any, beta: Any) -> torch.Tensor:
    g = None if gamma is None else torch.from_numpy(gamma)
    b = None if beta is None else torch.from_numpy(beta)

    def f(t: torch.Tensor) -> torch.Tensor:
        return groupnorm.group_norm(t, gamma=g, beta=b, **cfg.kwargs())  # type: ignore[no-any-return]

    with on_path(path):
        if path == "vmap":
            return torch.func.vmap(f)(x[None])[0]  # type: ignore[no-any-return]
        return f(x)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from(HARD_CONFIGS), st.sampled_from(PATHS))
def test_hard_regimes(data: st.DataObject, cfg: Config, path: str) -> None:
    case = data.draw(hard_inputs(cfg, np.float32))
    gamma, beta = parameters(cfg)
    y = run(path, torch.from_numpy(case.x), cfg, gamma, beta)
    assert y.dtype == torch.float32
    check_hard(y.numpy(), case, cfg, gamma, beta)


@settings(max_examples=20, deadline=None)
@given(st.data(), st.sampled_from(HARD_CONFIGS[:3]), st.sampled_from(PATHS))
def test_hard_regimes_float16(data: st.DataObject, cfg: Config, path: str) -> None:
    case = data.draw(hard_inputs(cfg, np.float16))
    y = run(path, torch.from_numpy(case.x), cfg, None, None)
    assert y.dtype == torch.float16
    check_hard(y.numpy(), case, cfg)


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(HARD_CONFIGS[:2] + HARD_CONFIGS[5:]), st.sampled_from(["kernel", "composite"]))
def test_hard_regime_gradients(data: st.DataObject, cfg: Config, path: str) -> None:
    """The input gradient in float32 against NumPy's float64 vjp, on the groups that have an answer; on
    the composite path the gradient is taken with ``create_graph=True`` (differentiable again)."""
    case = data.draw(hard_inputs(cfg, np.float32))
    gamma, beta = parameters(cfg)
    dy = np.random.default_rng(cfg.seed).standard_normal(case.x.shape).astype(np.float32)
    xt = torch.from_numpy(case.x).requires_grad_()
    with on_path(path):
        y = groupnorm.group_norm(
            xt,
            gamma=None if gamma is None else torch.from_numpy(gamma),
            beta=None if beta is None else torch.from_numpy(beta),
            **cfg.kwargs(),
        )
        (dx,) = torch.autograd.grad(y, xt, torch.from_numpy(dy), create_graph=path == "composite")
    exact = groupnorm.numpy.vjp(
        case.x.astype(np.float64), dy.astype(np.float64), gamma=gamma, beta=beta, **cfg.kwargs()
    ).inputs
    good = ~case.poisoned & np.isfinite(exact)
    size = group_rstd(case.x, cfg) * np.abs(dy) * (1 if gamma is None else np.abs(gamma).max())
    scale = (np.abs(exact) + np.max(size[good], initial=0)) * conditioning(case.x, cfg)
    got = dx.detach().numpy()

    error = np.abs(got[good] - exact[good]) / scale[good]
    assert np.all(error <= 3e-5), (case.regimes, float(np.nanmax(error)), int(np.isnan(error).sum()))


# ------------------------------------------------------------------ the statistics are the numerics'


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize(
    "regime", ["normal", "large_mean", "huge_anywhere", "huge_opposite_signs", "tiny", "far_corner", "constant_huge"]
)
def test_composite_statistics_are_the_numpy_backends(regime: str, traced: bool) -> None:
    """The composite's shift, mean and reciprocal standard deviation equal NumPy's statistics
    (``K / u``, ``mean / u`` and ``r``) to float32 rounding: the same corner, the same rescue."""
    cfg = Config((2, 8, 6, 5), 4, 1, (2, 3))
    rng = np.random.default_rng(11)
    x = rng.standard_normal(cfg.shape)
    groups = x.reshape(2, 4, 2, 30)
    if regime == "large_mean":
        groups += 1e4
    elif regime == "huge_anywhere":
        groups[:, :, 1, 17] = 3e25
    elif regime == "huge_opposite_signs":
        groups *= 1e30
    elif regime == "tiny":
        groups *= 1e-25
    elif regime == "far_corner":
        groups[:, :, :, 8:] += 1e5
    elif regime == "constant_huge":
        groups[:] = 2.5e34
    x = x.astype(np.float32)
    plan = make_plan(x.shape, "float32", groups=4, channels_axis=1, reduction_axes=(2, 3), epsilon=1e-5)
    with pytest.MonkeyPatch.context() as mp:
        if traced:
            mp.setattr(_composite, "_can_branch", lambda predicate: False)
        shift, mean, rstd = (t.double().numpy() for t in _composite.statistics(plan, torch.from_numpy(x)))
    st_np = np_backend.group_statistics(plan, x)
    view = channel_view(plan)

    def per_group(v: Any) -> np.ndarray:
        return np.moveaxis(np.asarray(v, np.float64), view.channel, -1).reshape(-1, plan.groups)

    k, unit, m, var = (per_group(s) for s in st_np)
    spread = np.sqrt(var) / unit
    # (float32 sums in another order: rounding relative to the corner's values)
    np.testing.assert_allclose(shift, k / unit, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(k / unit) + spread)))
    np.testing.assert_allclose(mean, m / unit, rtol=1e-5, atol=float(np.max(spread)) * 1e-5)
    with np.errstate(over="ignore", divide="ignore"):
        eps_u = np.maximum(1e-5 * unit**2, min(1e-5, 2.0**-126))
        r = np.where(var > 0, unit / np.sqrt(var + eps_u), 1 / math.sqrt(1e-5))
    np.testing.assert_allclose(rstd, r, rtol=1e-5)


@pytest.mark.parametrize("name", ["relu", "silu", "gelu"])
def test_activations_are_the_numerics(name: str) -> None:
    """torch's kernels for the fusable activations, and the derivatives the backward pass uses, are
    the functions :mod:`groupnorm._numerics` states."""
    from groupnorm import _numerics as N

    p = torch.linspace(-9, 9, 1001, dtype=torch.float64)
    np.testing.assert_allclose(
        _composite.ACTIVATION[name](p).numpy(), N.activate(name, p.numpy(), np_backend._OPS[np.float64]), atol=1e-15
    )
    q = p.clone().requires_grad_()
    (auto,) = torch.autograd.grad(_composite.ACTIVATION[name](q).sum(), q)
    np.testing.assert_allclose(_composite.ACTIVATION_GRAD[name](p).numpy(), auto.numpy(), atol=1e-14)


# ------------------------------------------------------------------------ the cases the issue named


def _poisoned_neighbour() -> np.ndarray:
    """A huge value in sample 0, a NaN in another group of sample 1."""
    x = np.random.default_rng(2).standard_normal((2, 4, 3, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 1e30
    x[1, 1, 2, 5] = np.nan
    return x


def _huge_outside_the_corner() -> np.ndarray:
    x = np.zeros((1, 16, 16, 4), np.float32)
    x[0, 15, 15, 0] = 3e19
    x[0, 15, 14, 1] = -3e19
    return x


class _Layer(torch.nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gt.group_norm(x, **self.kwargs)  # type: ignore[arg-type]


def _through(tool: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if tool == "eager":
        return module(x)  # type: ignore[no-any-return]
    if tool == "no-kernel":
        with on_path("composite"):
            return module(x)  # type: ignore[no-any-return]
    if tool == "vmap":
        return torch.func.vmap(module)(x[None])[0]  # type: ignore[no-any-return]
    if tool == "jit.trace":
        return torch.jit.trace(module, x)(x)  # type: ignore[no-any-return]
    if tool == "compile":
        return torch.compile(module, fullgraph=True, backend="aot_eager")(x)  # type: ignore[no-any-return]
    if tool == "export":
        return torch.export.export(module, (x,)).module()(x)  # type: ignore[no-any-return]
    if tool == "onnx":
        import onnxruntime as ort

        buffer = io.BytesIO()
        torch.onnx.export(module, (x,), buffer, dynamo=False)
        session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return torch.from_numpy(got)
    raise AssertionError(tool)


TOOLS = ["eager", "no-kernel", "vmap", "jit.trace", "compile", "export", "onnx"]


def _reference(x: np.ndarray, **kwargs: Any) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return reference_group_norm(x.astype(np.float64), **kwargs)  # type: ignore[no-any-return]


@pytest.mark.parametrize("tool", TOOLS)
def test_nan_in_one_group_leaves_huge_values_elsewhere_exact(tool: str) -> None:
    x = _poisoned_neighbour()
    y = _through(tool, _Layer(num_groups=2), torch.from_numpy(x)).numpy()
    want = _reference(x, groups=2, channels_axis=1, reduction_axes=(2, 3), epsilon=1e-5)
    poisoned = np.zeros(x.shape, bool)
    poisoned[1, :2] = True  # the NaN's group
    assert np.isnan(y[poisoned]).all()
    np.testing.assert_allclose(y[~poisoned], want[~poisoned], atol=1e-5)


@pytest.mark.parametrize("tool", TOOLS)
def test_huge_values_outside_the_corner(tool: str) -> None:
    x = _huge_outside_the_corner()
    layer = _Layer(num_groups=1, channels_axis=-1, reduction_axes=[1, 2])
    y = _through(tool, layer, torch.from_numpy(x)).numpy()
    want = _reference(x, groups=1, channels_axis=-1, reduction_axes=(1, 2), epsilon=1e-5)
    assert abs(want[0, 15, 15, 0] - math.sqrt(512)) < 1e-3  # +-22.6
    np.testing.assert_allclose(y, want, atol=1e-4)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("scale", [3e19, 1e30])
def test_beyond_the_range_of_float32_squares(tool: str, scale: float) -> None:
    x = (scale * np.random.default_rng(4).standard_normal((2, 8, 4, 3))).astype(np.float32)
    y = _through(tool, _Layer(num_groups=4), torch.from_numpy(x)).numpy()
    want = _reference(x, groups=4, channels_axis=1, reduction_axes=(2, 3), epsilon=1e-5)
    np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "composite", "composite-traced"])
def test_double_backward_beyond_the_range_of_float32_squares(path: str) -> None:
    """``create_graph=True`` at 1e30: finite gradients equal to float64's, and a finite second order."""
    x64 = 1e30 * np.random.default_rng(6).standard_normal((2, 8, 4, 3))
    x = torch.from_numpy(x64.astype(np.float32)).requires_grad_()
    w = torch.linspace(0.5, 2, 8, requires_grad=True)
    dy = torch.from_numpy(np.random.default_rng(7).standard_normal(x.shape).astype(np.float32))
    with on_path(path):
        y = gt.group_norm(x, 4, w)
        dx, dw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        (ddw,) = torch.autograd.grad((dx * 1e30).sum() + dw.sum(), w)
    want = groupnorm.numpy.vjp(
        x.detach().double().numpy(), dy.double().numpy(), 4, 1, (2, 3), gamma=w.detach().double().numpy(),
        epsilon=1e-5,
    )  # fmt: skip
    assert bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dw).all()) and bool(torch.isfinite(ddw).all())
    np.testing.assert_allclose(dx.detach().numpy(), want.inputs, atol=1e-5 * np.abs(want.inputs).max())
    np.testing.assert_allclose(dw.detach().numpy(), want.gamma, rtol=1e-4, atol=1e-4)
