"""The PyTorch backend on data hard for the algorithm, on every layout and dtype, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import groupnorm
import groupnorm.numpy
import groupnorm.torch as gt
from groupnorm.backends import torch as backend
from support import Config, hard_data, reference_group_norm


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values in several memory layouts: contiguous, channels-last, and strided views."""
    wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
    wide[..., ::2] = x
    flipped = x.transpose(2, 3).contiguous().transpose(2, 3)
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": wide[..., ::2],
        "transposed": flipped,
    }


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("mean_over_std", [0.0, 1e2, 1e4])
def test_float32_is_exact_on_every_layout(mean_over_std: float, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "KERNELS", kernel)
    x = hard_data((2, 16, 6, 10), 1, mean_over_std, dtype=np.float32)
    rng = np.random.default_rng(1)
    gamma = (1 + 0.5 * rng.standard_normal(16)).astype(np.float32)
    beta = rng.standard_normal(16).astype(np.float32)
    want = reference_group_norm(x, 4, 1, (2, 3), gamma, beta, 1e-5)
    for name, t in _layouts(torch.from_numpy(x)).items():
        before = t.clone()
        y = gt.group_norm(t, 4, torch.from_numpy(gamma), torch.from_numpy(beta))
        assert y.dtype == torch.float32
        assert torch.equal(t, before)  # the input is never modified
        err = np.abs(_np(y) - want).max()
        assert err <= 1e-5, (name, err)


def test_float32_is_exact_for_nhwc_and_video() -> None:
    x = hard_data((2, 6, 10, 16), -1, 1e4, dtype=np.float32)
    y = groupnorm.group_norm(torch.from_numpy(x), groups=4)  # the contract's NHWC defaults
    assert np.abs(_np(y) - reference_group_norm(x, 4, -1, (-3, -2))).max() <= 1e-5
    v = hard_data((2, 8, 3, 5, 6), 1, 1e4, dtype=np.float32)  # (N, C, T, H, W), statistics per frame
    y = gt.group_norm(torch.from_numpy(v), 4, reduction_axes=(-2, -1))
    assert np.abs(_np(y) - reference_group_norm(v, 4, 1, (3, 4), epsilon=1e-5)).max() <= 1e-5


def test_torch_native_kernel_is_only_used_where_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own kernel loses digits at a large mean; the backend notices and takes the exact path.
    (Where groupnorm's compiled kernel is available it runs first; without it, torch's is tried.)"""
    monkeypatch.setattr(backend, "KERNELS", False)
    torch.manual_seed(0)
    x = (1e4 + torch.randn(2, 16, 8, 8, dtype=torch.float64)).float()  # every group: mean 1e4 x std
    want = reference_group_norm(x.numpy(), 4, 1, (2, 3), epsilon=1e-5)
    assert np.abs(_np(F.group_norm(x, 4)) - want).max() > 1e-4
    assert np.abs(_np(gt.group_norm(x, 4)) - want).max() <= 1e-5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_layout_is_kept(memory_format: torch.memory_format) -> None:
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=memory_format)
    with torch.no_grad():
        y = gt.GroupNorm(4, 8)(x)
    assert y.is_contiguous(memory_format=memory_format)
    x.requires_grad_()
    gt.GroupNorm(4, 8)(x).sum().backward()
    assert x.grad is not None
    assert x.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_in_float32(dtype: torch.dtype) -> None:
    finfo = torch.finfo(dtype)
    # values up to 6e4 (float16's range ends at 65504): sums of squares would overflow in float16
    x = torch.from_numpy(hard_data((2, 8, 6, 6), 1, 600.0, std=100.0, dtype=np.float32)).to(dtype)
    w, b = torch.linspace(0.5, 2, 8), torch.linspace(-1, 1, 8)
    for t in _layouts(x).values():
        y = gt.group_norm(t, 2, w.to(dtype), b.to(dtype))
        assert y.dtype == dtype
        assert torch.isfinite(y).all()
        want = reference_group_norm(t.float().numpy(), 2, 1, (2, 3), w.numpy(), b.numpy(), 1e-5)
        np.testing.assert_allclose(_np(y), want, atol=8 * finfo.eps * 4, rtol=2 * finfo.eps)
        # float32 parameters with a half input, as torch.nn.GroupNorm allows
        y32 = gt.group_norm(t, 2, w, b)
        assert y32.dtype == dtype
        np.testing.assert_allclose(_np(y32), want, atol=8 * finfo.eps * 4, rtol=2 * finfo.eps)


def test_half_precision_gradients() -> None:
    x = torch.from_numpy(hard_data((2, 8, 4, 4), 1, 100.0, dtype=np.float32))
    dy = torch.randn(x.shape)
    xh = x.half().requires_grad_()
    w = torch.ones(8, requires_grad=True)
    gt.group_norm(xh, 2, w).backward(dy.half())
    want = groupnorm.numpy.vjp(
        xh.detach().float().numpy(), dy.half().float().numpy(), 2, 1, (2, 3), gamma=np.ones(8, np.float32), epsilon=1e-5
    )
    assert xh.grad is not None
    assert xh.grad.dtype == torch.float16
    np.testing.assert_allclose(_np(xh.grad), want.inputs, atol=2e-2, rtol=1e-2)


def test_autocast() -> None:
    x = torch.from_numpy(hard_data((2, 8, 4, 4), 1, 1e3, dtype=np.float32))
    m = gt.GroupNorm(4, 8)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        yb = m(x.bfloat16())
    assert y.dtype == torch.float32  # as torch.nn.GroupNorm: float32 stays float32
    torch.testing.assert_close(y, want)
    assert yb.dtype == torch.bfloat16
    np.testing.assert_allclose(_np(yb), _np(m(x.bfloat16())), atol=0)


# ------------------------------------------------------------------------------------------ gradients


#: small configurations: gradgradcheck differentiates numerically once per input element
SMALL = {
    "nchw": Config((2, 4, 3, 2), 2, 1, (2, 3)),
    "nhwc": Config((2, 3, 2, 4), 2, -1, (1, 2)),
    "video-per-frame": Config((1, 2, 2, 2, 4), 2, -1, (2, 3)),
    "silu": Config((2, 4, 2, 3), 2, 1, (2, 3), activation="silu"),
    "gelu": Config((2, 4, 3), 4, 1, (2,), activation="gelu", affine=False),
    "relu-fast": Config((2, 4, 2, 2), 2, 1, (2, 3), activation="relu", mean_close_to_zero=True),
    "layernorm-like": Config((3, 6), 3, -1, ()),
}


@pytest.mark.parametrize("path", ["operator", "composite"])
@pytest.mark.parametrize("name", SMALL)
def test_gradcheck_and_gradgradcheck(name: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "composite":
        monkeypatch.setattr(backend, "KERNELS", False)
    cfg = SMALL[name]
    a = cfg.arrays(mean_over_std=3.0)
    x = torch.from_numpy(a["x"]).requires_grad_()
    params = [torch.from_numpy(a[k]).requires_grad_() if a[k] is not None else None for k in ("gamma", "beta")]

    def f(x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
        return groupnorm.group_norm(x, gamma=gamma, beta=beta, **cfg.kwargs())

    assert gradcheck(f, (x, *params), atol=1e-6)
    assert gradgradcheck(f, (x, *params), atol=1e-5)


def test_channels_last_gradients_match_numpy_vjp() -> None:
    x = hard_data((2, 8, 5, 4), 1, 1e3, dtype=np.float64)
    dy = np.random.default_rng(3).standard_normal(x.shape)
    gamma, beta = np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8)
    want = groupnorm.numpy.vjp(x, dy, 4, 1, (2, 3), gamma=gamma, beta=beta, epsilon=1e-5, activation_fn="silu")
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last).requires_grad_()
    g, b = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    gt.group_norm(xt, 4, g, b, activation="silu").backward(torch.from_numpy(dy))
    for got, expected in ((xt.grad, want.inputs), (g.grad, want.gamma), (b.grad, want.beta)):
        assert got is not None
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


# --------------------------------------------------------------------------------------------- errors

_X = torch.zeros(2, 3, 4, 6)
ERRORS: list[tuple[dict[str, object], type[Exception], str]] = [
    ({"channels_axis": 4}, ValueError, "Axis is out of bounds."),
    ({"reduction_axes": (1, -5)}, ValueError, "Axis is out of bounds."),
    ({"reduction_axes": (-1, 2)}, ValueError, "reduction_axis must be mutually exclusive with channels_axis"),
    ({"reduction_axes": (1, -3)}, ValueError, "reduction_axes name the same axis twice"),
    ({"groups": 12}, ValueError, "Invalid groups 12 for 6 channels."),
    ({"groups": 4}, ValueError, "6 channels is not commensurate with 4 groups."),
    ({"groups": 0}, ValueError, "groups must be a positive int"),
    ({"groups": 2.0}, TypeError, "groups must be a positive int"),
    ({"groups": True}, TypeError, "groups must be a positive int"),
    ({"channels_axis": 1.0}, TypeError, "must be an int"),
    ({"reduction_axes": (True,)}, TypeError, "must be an int"),
    ({"epsilon": -1.0}, ValueError, "epsilon must be a finite number >= 0"),
    ({"epsilon": float("nan")}, ValueError, "epsilon must be a finite number >= 0"),
    ({"gamma": torch.ones(5)}, ValueError, "gamma must have shape [6]"),
    ({"beta": torch.ones(6, 1)}, ValueError, "beta must have shape [6]"),
    ({"activation_fn": "tanh"}, ValueError, "Unknown activation"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), ERRORS)
def test_contract_errors_for_tensors(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args: dict[str, object] = {"groups": 2, **kwargs}
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        groupnorm.group_norm(_X, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_floating_inputs(dtype: torch.dtype) -> None:
    x = torch.zeros(2, 4, 3, 3, dtype=dtype)
    with pytest.raises(TypeError, match="needs a floating-point input"):
        groupnorm.group_norm(x, groups=2)
    with pytest.raises(TypeError, match="needs a floating-point input"):
        gt.group_norm(x, 2)


def test_front_end_errors() -> None:
    with pytest.raises(ValueError, match=r"6 channels is not commensurate with 4 groups\."):
        gt.GroupNorm(4, 6)
    with pytest.raises(ValueError, match=r"Invalid groups 8 for 6 channels\."):
        gt.GroupNorm(8, 6)
    with pytest.raises(ValueError, match="epsilon must be"):
        gt.GroupNorm(2, 6, eps=-1)
    with pytest.raises(ValueError, match="Unknown activation"):
        gt.GroupNorm(2, 6, activation="swish")
    with pytest.raises(ValueError, match=r"gamma must have shape \[4\]"):
        gt.GroupNorm(2, 6)(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"Axis is out of bounds\."):
        gt.group_norm(torch.zeros(2, 4), 2, channels_axis=2)
    with pytest.raises(ValueError, match="reduction_axis must be mutually exclusive"):
        gt.group_norm(torch.zeros(2, 4, 3), 2, reduction_axes=(1,))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor"):
        gt.group_norm(np.zeros((2, 4)), 2)  # type: ignore[arg-type]


def test_empty_inputs() -> None:
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        x = torch.zeros(shape, requires_grad=True)
        y = gt.group_norm(x, 2)
        assert y.shape == x.shape
        y.sum().backward()


@pytest.mark.parametrize(
    ("name", "make", "kwargs"),
    [
        ("contiguous", lambda x: x, {}),
        ("large-mean", lambda x: x + 1e4, {}),
        ("channels-last", lambda x: x.contiguous(memory_format=torch.channels_last), {}),
        ("channels-last-silu", lambda x: x.contiguous(memory_format=torch.channels_last), {"activation": "silu"}),
        ("nhwc", lambda x: x.permute(0, 2, 3, 1).contiguous(), {"channels_axis": -1, "reduction_axes": (1, 2)}),
        ("float16", lambda x: x.half(), {}),
    ],
)
def test_no_grad_forward_allocates_only_its_output(name: str, make: object, kwargs: dict[str, object]) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = make(torch.randn(4, 64, 32, 32))  # type: ignore[operator]
    m = gt.GroupNorm(32, 64, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        m(x)  # the first call may set up the (block-sized, reused) scratch buffers
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = m(x)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    output = y.numel() * y.element_size()
    assert allocated - output < x.numel() * x.element_size() / 4, (name, allocated, output)


@pytest.mark.parametrize("path", ["operator", "composite"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("scale", [3e19, 1e30])
def test_float32_beyond_the_range_of_its_squares(
    scale: float, memory_format: torch.memory_format, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Squares of float32 values beyond about 1.8e19 overflow float32; the result still exists."""
    monkeypatch.setattr(backend, "KERNELS", path == "operator")
    x = (scale * hard_data((2, 16, 6, 5), 1, 0.0, dtype=np.float64)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.linspace(0.5, 2, 16, requires_grad=True)
    y = gt.group_norm(xt, 4, w)
    want = reference_group_norm(x, 4, 1, (2, 3), w.detach().numpy(), None, 1e-5)
    assert np.abs(_np(y) - want).max() <= 1e-5
    y.backward(torch.from_numpy(dy))
    grads = groupnorm.numpy.vjp(
        x.astype(np.float64), dy.astype(np.float64), 4, 1, (2, 3), gamma=w.detach().double().numpy(), epsilon=1e-5
    )
    for got, expected in ((xt.grad, grads.inputs), (w.grad, grads.gamma)):
        assert got is not None and bool(torch.isfinite(got).all())
        assert np.abs(_np(got) - expected).max() <= 1e-5 * np.abs(expected).max()
