"""torch's tooling around groupnorm's layer: each test runs the same tool on ``groupnorm.torch.GroupNorm`` and
on ``torch.nn.GroupNorm`` with the same parameters and input, and compares.

In-place ops on the output under autograd, ``torch.func`` (vmap, grad, jvp, jacrev, jacfwd, hessian),
forward-mode AD, per-sample gradients, ``torch.jit.trace`` and ``torch.jit.script``, the ONNX exporter
run by ONNX Runtime, ``torch.fx``, the meta device and FakeTensor, ``torch.compile``, ``torch.export``,
autocast, double backward; then the behaviours torch users rely on: parameter device and dtype errors,
one value per group, and the output's memory format and strides.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import groupnorm.torch as gt

#: the implementation under test and torch's (the tests' expectations come from the latter)
Ours: Any = gt.GroupNorm
ours_functional: Callable[..., torch.Tensor] = gt.group_norm


def pair(groups: int = 4, channels: int = 8, dtype: torch.dtype = torch.float32, **kw: Any) -> tuple[Any, nn.GroupNorm]:
    """groupnorm's layer and torch's, with the same non-trivial parameters."""
    torch.manual_seed(0)
    theirs = nn.GroupNorm(groups, channels, **kw).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = Ours(groups, channels, **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def data(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)


def close(a: Any, b: Any, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ in-place on the output


def test_inplace_relu_after_the_layer_trains_like_torch() -> None:
    ours, theirs = pair(8, 32)
    x = data(2, 32, 5, 5)
    results = []
    for gn in (ours, theirs):
        model = nn.Sequential(gn, nn.ReLU(inplace=True))
        leaf = x.clone().requires_grad_()
        y = model(leaf)
        y.sum().backward()
        results.append((y.detach(), leaf.grad, gn.weight.grad, gn.bias.grad))
    for a, b in zip(*results, strict=True):
        close(a, b)


def test_inplace_residual_add_on_the_output_trains_like_torch() -> None:
    ours, theirs = pair()
    x, shortcut, dy = data(2, 8, 4, 4), data(2, 8, 4, 4, seed=2), data(2, 8, 4, 4, seed=3)
    results = []
    for gn in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = gn(leaf)
        y += shortcut
        y.mul_(2.0)
        y.backward(dy)
        results.append((y.detach(), leaf.grad, gn.weight.grad, gn.bias.grad))
    for a, b in zip(*results, strict=True):
        close(a, b)


# ------------------------------------------------------------------------------- the autograd graph


def _backward_error(gn: nn.Module, x: torch.Tensor, between: Callable[[torch.Tensor, torch.Tensor], None]) -> str:
    leaf = x.clone().requires_grad_()
    inner = leaf * 1.0
    y = gn(inner)
    between(y, inner)
    with pytest.raises(RuntimeError) as info:
        y.sum().backward()
    return str(info.value).split(":")[0]


def test_the_graph_refuses_what_torch_refuses() -> None:
    """A second backward without ``retain_graph``, and an input modified in place after the forward pass,
    raise torch's own errors (float32: the kernel path)."""
    ours, theirs = pair(4, 8)
    x = data(2, 8, 5, 5)

    def twice(y: torch.Tensor, inner: torch.Tensor) -> None:
        y.sum().backward(retain_graph=False)

    def modified(y: torch.Tensor, inner: torch.Tensor) -> None:
        inner.add_(1.0)

    for between in (twice, modified):
        assert _backward_error(ours, x, between) == _backward_error(theirs, x, between)


@pytest.mark.parametrize("grads_of", ["input", "weight", "all"])
@pytest.mark.parametrize("bias", [True, False])
def test_retained_graph_and_partial_gradients_equal_torch(grads_of: str, bias: bool) -> None:
    """Two backward passes through a retained graph accumulate as torch's do, with and without a bias,
    for the input alone, the parameters alone, or both."""
    ours, theirs = pair(4, 8, bias=bias)
    x, dy = data(2, 8, 5, 5), data(2, 8, 5, 5, seed=4)
    results = []
    for gn in (ours, theirs):
        gn.zero_grad(set_to_none=True)
        for p in gn.parameters():
            p.requires_grad_(grads_of != "input")
        leaf = x.clone().requires_grad_(grads_of != "weight")
        y = gn(leaf)
        y.backward(dy, retain_graph=True)
        y.backward(dy * 2)
        results.append([leaf.grad] + [p.grad for p in gn.parameters()])
    for a, b in zip(*results, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)


# -------------------------------------------------------------------------------------- torch.func


def _functional(gn: nn.Module) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor]]:
    params = {k: v.detach() for k, v in gn.named_parameters()}

    def f(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(gn, params, (x,))  # type: ignore[no-any-return]

    return f, params


def test_vmap_over_an_extra_batch_axis_and_over_parameters() -> None:
    ours, theirs = pair(dtype=torch.float64)
    xs = data(3, 2, 8, 4, 4, dtype=torch.float64)
    close(vmap(ours)(xs), vmap(theirs)(xs), 1e-10)
    close(vmap(ours)(xs), torch.stack([theirs(x) for x in xs]), 1e-10)
    ws, bs = data(3, 8, dtype=torch.float64, seed=5), data(3, 8, dtype=torch.float64, seed=6)
    got = vmap(lambda x, w, b: ours_functional(x, 4, w, b, 1e-5))(xs, ws, bs)
    close(got, vmap(lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5))(xs, ws, bs), 1e-10)
    close(vmap(ours, in_dims=2, out_dims=2)(xs.movedim(0, 2)), vmap(theirs)(xs).movedim(0, 2), 1e-10)


def test_grad_jvp_jacrev_jacfwd_and_hessian_match_torch() -> None:
    ours, theirs = pair(2, 4, dtype=torch.float64)
    x = data(2, 4, 3, dtype=torch.float64)
    dy = data(2, 4, 3, dtype=torch.float64, seed=4)
    (fo, po), (ft, pt) = _functional(ours), _functional(theirs)

    def loss(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda p, x: (f(p, x) * dy).sum()

    close(grad(loss(fo), argnums=(0, 1))(po, x), grad(loss(ft), argnums=(0, 1))(pt, x), 1e-10)
    tangent = data(2, 4, 3, dtype=torch.float64, seed=7)
    close(jvp(lambda x: fo(po, x), (x,), (tangent,)), jvp(lambda x: ft(pt, x), (x,), (tangent,)), 1e-10)
    for jac in (jacrev, jacfwd):
        close(jac(fo, argnums=(0, 1))(po, x), jac(ft, argnums=(0, 1))(pt, x), 1e-10)
    small = x[:1, :, :2]
    close(
        hessian(lambda x: (fo(po, x) * dy[:1, :, :2]).square().sum())(small),
        hessian(lambda x: (ft(pt, x) * dy[:1, :, :2]).square().sum())(small),
        1e-8,
    )


def test_forward_mode_ad_matches_torch() -> None:
    ours, theirs = pair(dtype=torch.float64)
    x, tx = data(2, 8, 3, 3, dtype=torch.float64), data(2, 8, 3, 3, dtype=torch.float64, seed=2)
    tw, tb = data(8, dtype=torch.float64, seed=3), data(8, dtype=torch.float64, seed=4)
    results = []
    for fn, gn in ((ours_functional, ours), (F.group_norm, theirs)):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, tx)
            w, b = fwAD.make_dual(gn.weight.detach(), tw), fwAD.make_dual(gn.bias.detach(), tb)
            y = fn(dual, 4, w, b, 1e-5)
            primal, tangent = fwAD.unpack_dual(y)
            results.append((primal.clone(), tangent.clone()))
    close(results[0], results[1], 1e-10)


def test_per_sample_gradients_with_torch_func() -> None:
    ours, theirs = pair(dtype=torch.float64)
    x, target = data(5, 8, 3, 3, dtype=torch.float64), data(5, 8, 3, 3, dtype=torch.float64, seed=9)

    def per_sample(gn: nn.Module) -> dict[str, torch.Tensor]:
        f, params = _functional(gn)

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return (f(p, x[None]) - t[None]).square().sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)  # type: ignore[no-any-return]

    got, want = per_sample(ours), per_sample(theirs)
    close(got, want, 1e-10)
    loop = torch.autograd.grad((theirs(x[2:3]) - target[2:3]).square().sum(), [theirs.weight, theirs.bias])
    close((got["weight"][2], got["bias"][2]), loop, 1e-10)


def test_per_sample_gradients_with_call_for_per_sample_grads() -> None:
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    results = []
    x = data(4, 8, 3, 3, dtype=torch.float64)
    for gn in pair(dtype=torch.float64):
        model = nn.Sequential(nn.Conv2d(8, 8, 1).double(), gn)
        torch.manual_seed(3)
        model[0].reset_parameters()
        call_for_per_sample_grads(model)(x).square().sum().backward()
        results.append([p.grad_sample for p in model.parameters()])
    assert [g.shape[0] for g in results[0]] == [4] * 4
    close(results[0], results[1], 1e-10)


# --------------------------------------------------------------------- TorchScript, ONNX, fx, export


class Net(nn.Module):
    """A small model that contains the layer (and uses it in scripted control flow)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        if y.shape[0] > 1:
            y = y + 1.0
        return torch.relu(y)


def nets() -> tuple[Net, Net]:
    ours, theirs = pair()
    a, b = Net(ours), Net(theirs)
    b.conv.load_state_dict(a.conv.state_dict())
    return a.eval(), b.eval()


def test_jit_trace() -> None:
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    traced = torch.jit.trace(ours, x)
    close(traced(x), theirs(x))
    other = data(2, 3, 5, 7, seed=4)  # another spatial size: the trace must not have baked the shape in
    close(traced(other), theirs(other))
    leaf = x.clone().requires_grad_()
    traced(leaf).sum().backward()
    ref = x.clone().requires_grad_()
    theirs(ref).sum().backward()
    close(leaf.grad, ref.grad, 1e-4)


def test_jit_script_of_a_model_that_contains_the_layer() -> None:
    ours, theirs = nets()
    scripted = torch.jit.script(ours)
    x = data(2, 3, 6, 6)
    close(scripted(x), theirs(x))
    close(scripted(x[:1]), theirs(x[:1]))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    close(torch.jit.load(buffer)(x), theirs(x))


def test_onnx_export_runs_in_onnx_runtime() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    buffer = io.BytesIO()
    torch.onnx.export(
        ours, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}}
    )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for inp in (x, data(3, 3, 6, 6, seed=5)):
        (y,) = session.run(None, {"x": inp.numpy()})
        np.testing.assert_allclose(y, theirs(inp).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_fx_symbolic_trace() -> None:
    ours, theirs = nets()
    graph_module = torch.fx.symbolic_trace(nn.Sequential(ours.conv, ours.norm, nn.ReLU()))
    reference = nn.Sequential(theirs.conv, theirs.norm, nn.ReLU())
    for x in (data(2, 3, 6, 6), data(1, 3, 4, 5, seed=3)):
        close(graph_module(x), reference(x))
    with torch.no_grad():  # the graph reads the layer's parameters, it did not bake them in
        for m in (ours, theirs):
            m.norm.weight.mul_(-2.0)
            m.norm.bias.add_(0.5)
    close(graph_module(x), reference(x))


def test_torch_export() -> None:
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    n = torch.export.Dim("n", min=2, max=16)
    exported = torch.export.export(ours, (x,), dynamic_shapes={"x": {0: n}})
    for inp in (x, data(4, 3, 6, 6, seed=2)):
        close(exported.module()(inp), theirs(inp))
    close(exported.run_decompositions().module()(x), theirs(x))


# ------------------------------------------------------------------------------ meta, fake, compile


def test_meta_device_forward_matches_torchs_shapes_and_strides() -> None:
    """Meta tensors get the shape, dtype and strides torch's CPU kernel gives the same input (torch's own
    meta function gives contiguous strides for channels-last input, unlike its CPU kernel: groupnorm's fake
    follows the kernels, so that a compiled graph's strides are the ones that run)."""
    ours, theirs = pair()
    meta = next(iter(pair())).to("meta")
    for x in (torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)):
        y, want = meta(x.to("meta")), theirs(x)
        assert y.is_meta and (y.shape, y.dtype, y.stride()) == (want.shape, want.dtype, want.stride())
        assert y.stride() == ours(x).stride()


def test_fake_tensor_mode_matches_torchs_shapes_and_strides() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    for make in (
        lambda: torch.randn(2, 8, 5, 6),
        lambda: torch.randn(1, 8, 5, 6).to(memory_format=torch.channels_last),
    ):
        real = make().requires_grad_()
        want = nn.GroupNorm(4, 8)(real)
        with FakeTensorMode():
            ours = Ours(4, 8)
            x = make().requires_grad_()
            y = ours(x)
            assert isinstance(y, FakeTensor)
            assert (y.shape, y.dtype, y.stride()) == (want.shape, want.dtype, want.stride())
            (g,) = torch.autograd.grad(y.sum(), x)
            assert g.stride() == x.stride()


def test_compile_fullgraph_forward_and_backward_without_a_graph_break() -> None:
    """aot_eager traces the forward and backward graphs (fake tensors, functionalization) without code
    generation; ``fullgraph=True`` raises on any graph break."""
    torch._dynamo.reset()
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        leaf, ref = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        y = compiled(leaf)
        close(y, theirs(ref))
        y.sum().backward()
        theirs(ref).sum().backward()
        close(leaf.grad, ref.grad, 1e-4)
    explanation = torch._dynamo.explain(ours)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compile_with_inductor() -> None:
    """One small inference graph through inductor's code generation (it takes seconds to compile)."""
    torch._dynamo.reset()
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        close(compiled(x), theirs(x), 1e-4)


# --------------------------------------------------------------------------- autocast, double backward


def test_autocast_bfloat16_gives_torchs_dtypes_and_values() -> None:
    ours, theirs = nets()
    x = data(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = ours(x), theirs(x)
        direct, direct_want = ours.norm(data(2, 8, 3, 3)), theirs.norm(data(2, 8, 3, 3))
    assert y.dtype == want.dtype
    assert direct.dtype == direct_want.dtype
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    close(direct, direct_want)


def test_double_backward_gradient_penalty_matches_torch() -> None:
    results = []
    x = data(2, 8, 3, 3, dtype=torch.float64)
    for gn in pair(dtype=torch.float64):
        leaf = x.clone().requires_grad_()
        y = F.silu(gn(leaf))
        (g,) = torch.autograd.grad(y.square().sum(), leaf, create_graph=True)
        penalty = g.square().sum()
        penalty.backward()
        results.append((g.detach(), leaf.grad, gn.weight.grad, gn.bias.grad))
    close(results[0], results[1], 1e-10)


# --------------------------------------------------------------------------------------- behaviours


def _raises_like_torch(call: Callable[[nn.Module], object], ours: nn.Module, theirs: nn.Module) -> None:
    with pytest.raises((RuntimeError, ValueError, TypeError)) as want:
        call(theirs)
    with pytest.raises(type(want.value), match=re.escape(str(want.value))):
        call(ours)


def test_parameters_on_another_device_raise_torchs_runtime_error() -> None:
    ours, theirs = (m.to("meta") for m in pair())
    x = data(2, 8, 3, 3)
    _raises_like_torch(lambda m: m(x), ours, theirs)
    with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected device cpu!"):
        ours(x)


def test_parameters_of_another_dtype_raise_torchs_runtime_error() -> None:
    ours, theirs = pair(dtype=torch.float64)
    x = data(2, 8, 3, 3)
    _raises_like_torch(lambda m: m(x), ours, theirs)
    with pytest.raises(
        RuntimeError, match=re.escape("mixed dtype (CPU): expect parameter to have scalar type of Float")
    ):
        ours(x)
    ours32, theirs32 = pair()
    _raises_like_torch(lambda m: m(x.double()), ours32, theirs32)


def test_one_value_per_group_while_training_raises_torchs_value_error() -> None:
    ours, theirs = pair(8, 8)
    x = data(1, 8, 1)
    _raises_like_torch(lambda m: m(x), ours, theirs)
    with pytest.raises(ValueError, match=re.escape("Expected more than 1 value per channel when training")):
        ours.train()(x)


LAYOUTS: dict[str, Callable[[], torch.Tensor]] = {
    "contiguous": lambda: data(2, 8, 5, 6),
    "channels_last": lambda: data(2, 8, 5, 6).contiguous(memory_format=torch.channels_last),
    "batch-1 channels_last": lambda: data(1, 8, 5, 6).contiguous(memory_format=torch.channels_last),
    "1x1 spatial channels_last": lambda: data(2, 8, 1, 1).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda: data(2, 8, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d),
    "NHWC view": lambda: data(2, 5, 6, 8).permute(0, 3, 1, 2),
    "transposed spatial": lambda: data(2, 8, 6, 5).transpose(2, 3),
    "strided channels": lambda: data(2, 16, 5, 6)[:, ::2],
    "strided width": lambda: data(2, 8, 5, 12)[..., ::2],
    "expanded batch": lambda: data(1, 8, 5, 6).expand(2, 8, 5, 6),
    "NWC view": lambda: data(2, 7, 8).transpose(1, 2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_and_input_gradient_strides_equal_torchs(layout: str) -> None:
    ours, theirs = pair()
    x = LAYOUTS[layout]()
    dy = data(*x.shape, seed=8)
    leaf_ours, leaf_theirs = x.detach().requires_grad_(), x.detach().requires_grad_()
    y, want = ours(leaf_ours), theirs(leaf_theirs)
    assert y.stride() == want.stride(), (y.stride(), want.stride())
    close(y, want)
    (g,) = torch.autograd.grad(y, leaf_ours, dy)
    (g_want,) = torch.autograd.grad(want, leaf_theirs, dy)
    assert g.stride() == g_want.stride(), (g.stride(), g_want.stride())
    close(g, g_want, 1e-4)


def test_the_input_is_never_modified() -> None:
    ours, _ = pair()
    x = data(2, 8, 5, 6)
    before, version = x.clone(), x._version
    ours(x)
    assert x._version == version and torch.equal(x, before)


def test_a_deep_copy_is_independent() -> None:
    ours, theirs = pair()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.weight.mul_(2)
    x = data(2, 8, 3, 3)
    close(ours(x), theirs(x))
