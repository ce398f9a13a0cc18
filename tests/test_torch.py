"""The PyTorch backend and front-end against the float64 reference and torch.nn.GroupNorm."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import groupnorm
import groupnorm.numpy
import groupnorm.torch as gt
from groupnorm.backends import torch as backend
from support import NAMED_CONFIGS, Config, configs, hard_data, reference_group_norm


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


@pytest.fixture(params=["operator", "composite"])
def block_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths: the operator (its compiled kernels where they apply) and the composite."""
    if request.param != "operator":
        monkeypatch.setattr(backend, "KERNELS", False)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.usefixtures("block_elements")
@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_named_configs_match_reference(name: str) -> None:
    cfg = NAMED_CONFIGS[name]
    a = cfg.arrays()
    y = groupnorm.group_norm(_t(a["x"]), gamma=_t(a["gamma"]), beta=_t(a["beta"]), **cfg.kwargs())
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(_np(y), cfg.reference(a["x"], a["gamma"], a["beta"]), atol=1e-10)


@pytest.mark.usefixtures("block_elements")
@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_named_configs_gradients_match_numpy_vjp(name: str) -> None:
    cfg = NAMED_CONFIGS[name]
    a = cfg.arrays()
    x = _t(a["x"]).requires_grad_()
    gamma, beta = _t(a["gamma"]), _t(a["beta"])
    params = [p.requires_grad_() for p in (gamma, beta) if p is not None]
    y = groupnorm.group_norm(x, gamma=gamma, beta=beta, **cfg.kwargs())
    y.backward(_t(a["cotangent"]))
    want = groupnorm.numpy.vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
    np.testing.assert_allclose(_np(x.grad), want.inputs, atol=1e-10)
    if params:
        np.testing.assert_allclose(_np(gamma.grad), want.gamma, atol=1e-10)
        np.testing.assert_allclose(_np(beta.grad), want.beta, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(cfg=configs())
def test_random_configs_values_and_gradients(cfg: Config) -> None:
    a = cfg.arrays()
    x = _t(a["x"]).requires_grad_()
    gamma, beta = _t(a["gamma"]), _t(a["beta"])
    for p in (gamma, beta):
        if p is not None:
            p.requires_grad_()
    y = groupnorm.group_norm(x, gamma=gamma, beta=beta, **cfg.kwargs())
    np.testing.assert_allclose(_np(y), cfg.reference(a["x"], a["gamma"], a["beta"]), atol=1e-8)
    y.backward(_t(a["cotangent"]))
    want = groupnorm.numpy.vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
    np.testing.assert_allclose(_np(x.grad), want.inputs, atol=1e-8)
    if gamma is not None:
        np.testing.assert_allclose(_np(gamma.grad), want.gamma, atol=1e-8)
        np.testing.assert_allclose(_np(beta.grad), want.beta, atol=1e-8)


# ------------------------------------------------------------------------------------ the drop-in


def test_signature_matches_torch() -> None:
    ours = inspect.signature(gt.GroupNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.GroupNorm.__init__).parameters
    positional = [p for p in ours.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in theirs.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    for p in theirs.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            assert ours[p.name].default == p.default
    f_ours = inspect.signature(gt.group_norm).parameters
    f_theirs = inspect.signature(F.group_norm).parameters
    positional = [p for p in f_ours.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in f_theirs.values()]


@pytest.mark.parametrize("affine", [True, False])
def test_module_is_a_drop_in(affine: bool) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.GroupNorm(4, 8, eps=1e-3, affine=affine)
    ours = gt.GroupNorm(4, 8, eps=1e-3, affine=affine)
    assert repr(ours).replace(type(ours).__name__, "X") == repr(theirs).replace(type(theirs).__name__, "X")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)  # same initialisation
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.bias.normal_()
        # a checkpoint of one loads into the other, both ways
        buffer = io.BytesIO()
        torch.save(theirs.state_dict(), buffer)
        buffer.seek(0)
        ours.load_state_dict(torch.load(buffer))
        back = torch.nn.GroupNorm(4, 8, eps=1e-3)
        back.load_state_dict(ours.state_dict())
        assert torch.equal(back.weight, theirs.weight)
        assert torch.equal(back.bias, theirs.bias)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    theirs, ours = theirs.double(), ours.double()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        gt.group_norm(x, 4, ours.weight, ours.bias, 1e-3), F.group_norm(x, 4, theirs.weight, theirs.bias, 1e-3)
    )


def test_module_device_dtype_and_extra_options() -> None:
    m = gt.GroupNorm(2, 6, dtype=torch.float64, channels_axis=-1, reduction_axes=(1, 2), activation="silu")
    assert m.weight.dtype == torch.float64
    assert "channels_axis=-1" in repr(m)
    assert "activation='silu'" in repr(m)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    want = reference_group_norm(x.numpy(), 2, -1, (1, 2), np.ones(6), np.zeros(6), 1e-5, "silu")
    np.testing.assert_allclose(_np(m(x)), want, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 4)])
def test_default_reduction_axes_are_every_trailing_axis(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(gt.group_norm(x, 3, w, b), F.group_norm(x, 3, w, b), atol=1e-12, rtol=0)


def test_video_statistics_per_frame() -> None:
    x = hard_data((2, 6, 3, 4, 5), 1, 100.0, dtype=np.float64)
    y = gt.group_norm(torch.from_numpy(x), 3, reduction_axes=(-2, -1))
    np.testing.assert_allclose(_np(y), reference_group_norm(x, 3, 1, (3, 4), epsilon=1e-5), atol=1e-9)
