"""What PyTorch's own test suite checks of GroupNorm, checked of groupnorm's layer and function.

The inputs come from the installed torch itself: the ``nn.functional.group_norm`` OpInfo (its samples,
reference inputs and error inputs, from ``torch.testing._internal.common_methods_invocations``) and the
``torch.nn.GroupNorm`` ModuleInfo (constructor arguments, forward inputs and error inputs, from
``torch.testing._internal.common_modules``). The checks are the project's own, written after what
``test/test_ops.py``, ``test/test_ops_gradients.py``, ``test/test_ops_fwd_gradients.py``,
``test/test_modules.py`` and the GroupNorm tests of ``test/test_nn.py`` verify.

Every test runs twice: against groupnorm, and against torch's own ``torch.nn.GroupNorm`` and
``torch.nn.functional.group_norm``, which shows that the test itself checks torch's behaviour. Where
groupnorm deliberately differs from torch (see :data:`DIFFERENCES` and docs/pytorch.md), the test says
so and checks each side's own behaviour.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import groupnorm.torch as gt
from support import reference_group_norm

OPINFO = next(op for op in op_db if op.name == "nn.functional.group_norm" and not op.variant_test_name)
MODULEINFO = next(m for m in module_db if m.module_cls is nn.GroupNorm)

#: Where groupnorm deliberately differs from torch.nn.GroupNorm, and why (listed in docs/pytorch.md).
DIFFERENCES = {
    "negative eps": (
        "groupnorm rejects eps < 0 with a ValueError before any work; torch computes with it and returns NaN "
        "wherever a group's variance is below -eps (the OpInfo samples use eps=-0.5)"
    ),
    "zero groups": (
        "num_groups=0: groupnorm raises a ValueError naming the argument; torch raises ZeroDivisionError from "
        "computing num_channels % 0"
    ),
    "float groups": (
        "a num_groups that is not an int is a TypeError when the layer is built; torch builds the layer and "
        "raises the TypeError at the first forward call"
    ),
    "not a tensor": "an input that is not a tensor is a TypeError; torch raises AttributeError ('no attribute dim')",
}


@dataclass(frozen=True)
class Impl:
    """One implementation under test: the layer class and the function with F.group_norm's signature."""

    name: str
    Module: Any
    functional: Callable[..., torch.Tensor]

    @property
    def is_torch(self) -> bool:
        return self.name == "torch"


GROUPNORM = Impl("groupnorm", gt.GroupNorm, gt.group_norm)
TORCH = Impl("torch", nn.GroupNorm, F.group_norm)


@pytest.fixture(params=[GROUPNORM, TORCH], ids=lambda i: i.name)
def impl(request: pytest.FixtureRequest) -> Impl:
    return request.param  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------- helpers


def _float64_reference(x: torch.Tensor, groups: int, weight: Any, bias: Any, eps: float) -> np.ndarray:
    """The test suite's own float64 reference for torch's (N, C, *) layout."""

    def arr(t: Any) -> Any:
        return None if t is None else t.detach().double().numpy()

    reduced = tuple(range(2, x.dim()))
    return reference_group_norm(arr(x), groups, 1, reduced, arr(weight), arr(bias), eps)


def _tensors_of(sample: Any) -> list[torch.Tensor]:
    """The sample's tensors that require grad, in call order: input, then weight and bias."""
    values = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]


def _call_with(impl: Impl, sample: Any) -> Callable[..., torch.Tensor]:
    """``fn(*tensors)``: the sample's call with its grad-requiring tensors replaced by ``tensors``."""
    values = [sample.input, *sample.args]
    keys = list(sample.kwargs)
    kw_values = list(sample.kwargs.values())

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        it = iter(tensors)

        def swap(v: Any) -> Any:
            return next(it) if isinstance(v, torch.Tensor) and v.requires_grad else v

        args = [swap(v) for v in values]
        kwargs = {k: swap(v) for k, v in zip(keys, kw_values, strict=True)}
        return impl.functional(*args, **kwargs)

    return fn


def _eps(sample: Any) -> float:
    return float(sample.kwargs.get("eps", 1e-5))


def _samples(dtype: torch.dtype, *, requires_grad: bool = False, reference: bool = False) -> Iterator[Any]:
    make = OPINFO.reference_inputs if reference else OPINFO.sample_inputs
    yield from make("cpu", dtype, requires_grad=requires_grad)


def _describe(sample: Any) -> str:
    w, b = sample.kwargs.get("weight"), sample.kwargs.get("bias")
    groups, eps = sample.args[0], _eps(sample)
    return (
        f"input {tuple(sample.input.shape)}, groups {groups}, eps {eps}, weight {w is not None}, bias {b is not None}"
    )


def _is_difference(impl: Impl, sample: Any) -> bool:
    """Samples that exercise a documented difference, for groupnorm: checked separately below."""
    return not impl.is_torch and _eps(sample) < 0


_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# ------------------------------------------------------------------------------- OpInfo: values, dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opinfo_samples_match_torch_and_the_float64_reference(impl: Impl, dtype: torch.dtype) -> None:
    checked = 0
    for sample in itertools.chain(_samples(dtype), _samples(dtype, reference=True)):
        if _is_difference(impl, sample):
            continue
        got = impl.functional(sample.input, *sample.args, **sample.kwargs)
        want = F.group_norm(sample.input, *sample.args, **sample.kwargs)
        assert got.dtype == dtype and got.shape == sample.input.shape, _describe(sample)
        tol = _TOLERANCE[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, s=sample: f"{_describe(s)}: {m}")
        ref = _float64_reference(sample.input, sample.args[0], sample.kwargs.get("weight"), None, _eps(sample))
        if sample.kwargs.get("bias") is not None:
            ref = ref + sample.kwargs["bias"].double().numpy().reshape([-1] + [1] * (sample.input.dim() - 2))
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=tol, atol=tol * 10, err_msg=_describe(sample))
        checked += 1
    assert checked >= 20


def test_opinfo_negative_eps_samples_are_a_documented_difference(impl: Impl) -> None:
    """DIFFERENCES['negative eps']."""
    samples = [s for s in _samples(torch.float64) if _eps(s) < 0]
    assert samples
    for sample in samples:
        if impl.is_torch:
            y = impl.functional(sample.input, *sample.args, **sample.kwargs)
            assert y.shape == sample.input.shape
        else:
            with pytest.raises(ValueError, match="eps"):
                impl.functional(sample.input, *sample.args, **sample.kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opinfo_noncontiguous_samples_match_contiguous(impl: Impl, dtype: torch.dtype) -> None:
    """test_ops.test_noncontiguous_samples: the same values and gradients from non-contiguous tensors."""
    for sample in _samples(dtype, requires_grad=True):
        if _is_difference(impl, sample):
            continue
        nc = sample.noncontiguous()
        assert not nc.input.is_contiguous() or nc.input.numel() <= 1
        want = impl.functional(sample.input, *sample.args, **sample.kwargs)
        got = impl.functional(nc.input, *nc.args, **nc.kwargs)
        torch.testing.assert_close(got, want, msg=lambda m, s=sample: f"{_describe(s)}: {m}")
        if want.numel() == 0:
            continue
        dy = torch.randn_like(want)
        grads_want = torch.autograd.grad(want, _tensors_of(sample), dy)
        grads_got = torch.autograd.grad(got, _tensors_of(nc), dy)
        for g, w in zip(grads_got, grads_want, strict=True):
            torch.testing.assert_close(g, w, msg=lambda m, s=sample: f"{_describe(s)}: {m}")


def test_opinfo_negative_views_are_resolved(impl: Impl) -> None:
    """test_ops.test_neg_view: a tensor with the negative bit set reads as its negation."""
    for sample in _samples(torch.float64):
        if _is_difference(impl, sample):
            continue
        x = sample.input
        viewed = torch._neg_view(x)
        assert viewed.is_neg()
        got = impl.functional(viewed, *sample.args, **sample.kwargs)
        want = impl.functional(-x, *sample.args, **sample.kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, s=sample: f"{_describe(s)}: {m}")


def test_opinfo_forward_leaves_copy_on_write_inputs_unmaterialized(impl: Impl) -> None:
    """test_ops.test_cow_input: the OpInfo says the forward pass neither writes to nor materializes a lazily
    cloned (copy-on-write) input."""
    assert OPINFO.supports_cow_input_no_materialize_forward
    for sample in _samples(torch.float32):
        if _is_difference(impl, sample) or sample.input.numel() == 0:
            continue
        original = sample.input.clone()
        cow = torch._lazy_clone(sample.input)
        params = {k: torch._lazy_clone(v) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}
        impl.functional(cow, *sample.args, **params)
        assert torch._C._is_cow_tensor(cow), f"{_describe(sample)}: the input was materialized"
        for k, v in params.items():
            if isinstance(v, torch.Tensor):
                assert torch._C._is_cow_tensor(v), f"{_describe(sample)}: {k} was materialized"
        assert torch.equal(cow, original)


# ---------------------------------------------------------------------------- OpInfo: gradient checks


def _gradient_samples(impl: Impl) -> Iterator[tuple[Any, Callable[..., torch.Tensor], list[torch.Tensor]]]:
    for sample in _samples(torch.float64, requires_grad=True):
        if _is_difference(impl, sample):
            continue
        yield sample, _call_with(impl, sample), _tensors_of(sample)


def test_opinfo_gradcheck(impl: Impl) -> None:
    """test_ops_gradients.test_fn_grad: backward mode, with batched gradients (vmap over the backward pass),
    undefined output gradients and gradient dtypes checked."""
    for sample, fn, inputs in _gradient_samples(impl):
        assert torch.autograd.gradcheck(
            fn,
            inputs,
            check_batched_grad=OPINFO.check_batched_grad,
            check_grad_dtypes=True,
            check_undefined_grad=True,
        ), _describe(sample)


def test_opinfo_forward_mode_gradcheck(impl: Impl) -> None:
    """test_ops_fwd_gradients.test_forward_mode_AD: forward-mode derivatives, batched too."""
    assert OPINFO.supports_forward_ad
    for sample, fn, inputs in _gradient_samples(impl):
        assert torch.autograd.gradcheck(
            fn,
            inputs,
            check_forward_ad=True,
            check_backward_ad=False,
            check_undefined_grad=False,
            check_batched_grad=False,
            check_batched_forward_grad=OPINFO.check_batched_forward_grad,
            check_grad_dtypes=True,
        ), _describe(sample)


@pytest.mark.parametrize("non_contiguous_grad_outputs", [False, True])
def test_opinfo_gradgradcheck(impl: Impl, non_contiguous_grad_outputs: bool) -> None:
    """test_ops_gradients.test_fn_gradgrad: second derivatives (reverse over reverse), batched too."""
    assert OPINFO.supports_gradgrad
    for sample, fn, inputs in _gradient_samples(impl):
        assert torch.autograd.gradgradcheck(
            fn,
            inputs,
            gen_non_contig_grad_outputs=non_contiguous_grad_outputs,
            check_batched_grad=OPINFO.check_batched_gradgrad,
            check_grad_dtypes=True,
        ), _describe(sample)


def test_opinfo_forward_over_reverse_gradgradcheck(impl: Impl) -> None:
    """test_ops_fwd_gradients.test_fn_fwgrad_bwgrad: forward-mode derivatives of the backward pass (in
    gradcheck's fast mode)."""
    assert OPINFO.supports_fwgrad_bwgrad
    for sample, fn, inputs in _gradient_samples(impl):
        for non_contiguous in (False, True):
            assert torch.autograd.gradgradcheck(
                fn,
                inputs,
                gen_non_contig_grad_outputs=non_contiguous,
                check_fwd_over_rev=True,
                check_rev_over_rev=False,
                check_batched_grad=False,
                check_undefined_grad=False,
                check_grad_dtypes=True,
                fast_mode=True,
            ), _describe(sample)


def test_opinfo_vmap_over_every_argument_matches_a_loop(impl: Impl) -> None:
    """functorch's test_vmap_exhaustive, in short: vmap over a new leading axis of the input, and of the
    input, weight and bias together, equals calling the function once per slice."""
    for sample in _samples(torch.float64):
        if _is_difference(impl, sample):
            continue
        groups, eps = sample.args[0], _eps(sample)
        w, b = sample.kwargs.get("weight"), sample.kwargs.get("bias")

        def norm(x: torch.Tensor, w: Any = w, b: Any = b, groups: int = groups, eps: float = eps) -> torch.Tensor:
            return impl.functional(x, groups, w, b, eps)

        xs = torch.stack([sample.input * (k + 1) + k for k in range(3)])
        got = torch.func.vmap(norm)(xs)
        want = torch.stack([F.group_norm(x, groups, w, b, eps) for x in xs])
        torch.testing.assert_close(got, want, msg=lambda m, s=sample: f"{_describe(s)}: {m}")
        if w is None or b is None:
            continue
        ws, bs = torch.stack([w, w * 2, -w]), torch.stack([b, b - 1, b * 3])
        got = torch.func.vmap(norm)(xs, ws, bs)
        want = torch.stack([F.group_norm(x, groups, ww, bb, eps) for x, ww, bb in zip(xs, ws, bs, strict=True)])
        torch.testing.assert_close(got, want, msg=lambda m, s=sample: f"{_describe(s)}: {m}")


# --------------------------------------------------------------------------------- errors: torch's words


def test_opinfo_error_inputs(impl: Impl) -> None:
    """test_ops.test_errors: each error input raises torch's exception class with torch's message."""
    errors = list(OPINFO.error_inputs("cpu"))
    assert errors
    for error in errors:
        s = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            impl.functional(s.input, *s.args, **s.kwargs)


def test_moduleinfo_error_inputs(impl: Impl) -> None:
    """test_modules.test_errors: the ModuleInfo's construction errors, with torch's class and message."""
    errors = MODULEINFO.module_error_inputs_func(
        MODULEINFO, device="cpu", dtype=torch.float32, requires_grad=False, training=True
    )
    assert errors
    for error in errors:
        m_in = error.module_error_input
        c = m_in.constructor_input
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                impl.Module(*c.args, **c.kwargs)
        else:
            m = impl.Module(*c.args, **c.kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                m(*m_in.forward_input.args, **m_in.forward_input.kwargs)


_X = (2, 4, 3, 3)


def _functional_case(shape: tuple[int, ...], groups: Any, **kwargs: Any) -> Callable[[Impl], object]:
    dtype, device = kwargs.pop("x_dtype", torch.float32), kwargs.pop("x_device", "cpu")

    def call(impl: Impl) -> object:
        torch.manual_seed(0)
        return impl.functional(torch.randn(shape, dtype=dtype, device=device), groups, **kwargs)

    return call


def _w(*shape: int, **kw: Any) -> torch.Tensor:
    return torch.ones(shape, **kw)


#: (case, the call, torch's exception class, torch's wording): every error torch raises for a bad call,
#: with its class; groupnorm's error must be an instance of that class and contain those words.
ERROR_CASES: list[tuple[str, Callable[[Impl], object], type[BaseException], str]] = [
    (
        "rank 1",
        _functional_case((4,), 1),
        RuntimeError,
        "Expected at least 2 dimensions for input tensor but received 1",
    ),
    ("rank 0", _functional_case((), 1), RuntimeError, "Expected at least 2 dimensions for input tensor but received 0"),
    (
        "channels not divisible by groups",
        _functional_case((2, 7, 4), 2),
        RuntimeError,
        "Expected number of channels in input to be divisible by num_groups, but got input of shape [2, 7, 4] and "
        "num_groups=2",
    ),
    (
        "more groups than channels",
        _functional_case(_X, 8),
        RuntimeError,
        "Expected number of channels in input to be divisible by num_groups, but got input of shape [2, 4, 3, 3] "
        "and num_groups=8",
    ),
    ("negative groups", _functional_case(_X, -1), RuntimeError, "Expected num groups to be greater than 0, got -1"),
    ("bool groups", _functional_case(_X, True), TypeError, "'num_groups' (position 2) must be int, not bool"),
    (
        "one value per group",
        _functional_case((1, 10, 1), 10),
        ValueError,
        "Expected more than 1 value per channel when training, got input size [1, 10, 1]",
    ),
    (
        "one value per group, 2-D",
        _functional_case((1, 4), 4),
        ValueError,
        "Expected more than 1 value per channel when training, got input size [1, 4]",
    ),
    (
        "weight of the wrong size",
        _functional_case(_X, 2, weight=_w(3)),
        RuntimeError,
        "Expected weight to be a vector of size equal to the number of channels in input, but got weight of shape [3] "
        "and input of shape [2, 4, 3, 3]",
    ),
    (
        "weight of the wrong rank",
        _functional_case(_X, 2, weight=_w(4, 1)),
        RuntimeError,
        "Expected weight to be a vector of size equal to the number of channels in input, but got weight of shape "
        "[4, 1] and input of shape [2, 4, 3, 3]",
    ),
    (
        "bias of the wrong size",
        _functional_case(_X, 2, weight=_w(4), bias=_w(5)),
        RuntimeError,
        # torch's message goes on with the weight's shape where it means the bias's
        "Expected bias to be a vector of size equal to the number of channels in input, but got bias of shape",
    ),
    (
        "float64 weight, float32 input",
        _functional_case(_X, 2, weight=_w(4, dtype=torch.float64), bias=_w(4, dtype=torch.float64)),
        RuntimeError,
        "mixed dtype (CPU): expect parameter to have scalar type of Float",
    ),
    (
        "float64 bias alone, float32 input",
        _functional_case(_X, 2, bias=_w(4, dtype=torch.float64)),
        RuntimeError,
        "mixed dtype (CPU): expect parameter to have scalar type of Float",
    ),
    (
        "bfloat16 weight, float32 input",
        _functional_case(_X, 2, weight=_w(4, dtype=torch.bfloat16), bias=_w(4, dtype=torch.bfloat16)),
        RuntimeError,
        "mixed dtype (CPU): expect parameter to have scalar type of Float",
    ),
    (
        "float32 weight, float64 input",
        _functional_case(_X, 2, weight=_w(4), bias=_w(4), x_dtype=torch.float64),
        RuntimeError,
        "mixed dtype (CPU): all inputs must share same datatype.",
    ),
    (
        "meta weight, CPU input",
        _functional_case(_X, 2, weight=_w(4, device="meta"), bias=_w(4)),
        RuntimeError,
        "Tensor on device meta is not on the expected device cpu!",
    ),
    (
        "meta bias, CPU input",
        _functional_case(_X, 2, weight=_w(4), bias=_w(4, device="meta")),
        RuntimeError,
        "Tensor on device meta is not on the expected device cpu!",
    ),
    (
        "CPU weight, meta input",
        _functional_case(_X, 2, weight=_w(4), bias=_w(4), x_device="meta"),
        RuntimeError,
        "Tensor on device cpu is not on the expected device meta!",
    ),
    (
        "integer input",
        lambda impl: impl.functional(torch.ones(2, 4, 3, dtype=torch.int64), 2),
        NotImplementedError,
        "not implemented for 'Long'",
    ),
    (
        "complex input",
        lambda impl: impl.functional(torch.ones(2, 4, 3, dtype=torch.complex64), 2),
        NotImplementedError,
        "not implemented for 'ComplexFloat'",
    ),
    (
        "layer: channels not divisible by groups",
        lambda impl: impl.Module(3, 10),
        ValueError,
        "num_channels (10) must be divisible by num_groups (3)",
    ),
    (
        "layer: input with other channels than the weight",
        lambda impl: impl.Module(2, 4)(torch.randn(2, 6, 3)),
        RuntimeError,
        "Expected weight to be a vector of size equal to the number of channels in input, but got weight of shape [4] "
        "and input of shape [2, 6, 3]",
    ),
    (
        "layer in eval mode: one value per group",
        lambda impl: impl.Module(10, 10).eval()(torch.rand(1, 10, 1)),
        ValueError,
        "Expected more than 1 value per channel when training, got input size [1, 10, 1]",
    ),
]


@pytest.mark.parametrize(("case", "call", "cls", "words"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_have_torchs_class_and_wording(
    impl: Impl, case: str, call: Callable[[Impl], object], cls: type[BaseException], words: str
) -> None:
    with pytest.raises(cls, match=re.escape(words)):
        call(impl)


#: (difference, the call, torch's outcome: an exception class or None, groupnorm's class and words)
DIFFERENCE_CASES: list[tuple[str, Callable[[Impl], object], type[BaseException] | None, type[BaseException], str]] = [
    ("negative eps", lambda impl: impl.functional(torch.zeros(2, 4, 3), 2, eps=-0.5), None, ValueError, "eps"),
    ("zero groups", lambda impl: impl.functional(torch.randn(2, 4, 3), 0), ZeroDivisionError, ValueError, "groups"),
    ("zero groups", lambda impl: impl.Module(0, 4), ZeroDivisionError, ValueError, "groups"),
    ("float groups", lambda impl: impl.Module(2.0, 4), None, TypeError, "groups"),
    ("not a tensor", lambda impl: impl.functional([[1.0, 2.0]], 1), AttributeError, TypeError, "Tensor"),
]


@pytest.mark.parametrize(
    ("difference", "call", "torch_outcome", "cls", "words"),
    DIFFERENCE_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(DIFFERENCE_CASES)],
)
def test_documented_differences(
    impl: Impl,
    difference: str,
    call: Callable[[Impl], object],
    torch_outcome: type[BaseException] | None,
    cls: type[BaseException],
    words: str,
) -> None:
    assert difference in DIFFERENCES
    if not impl.is_torch:
        with pytest.raises(cls, match=words):
            call(impl)
    elif torch_outcome is None:
        call(impl)
    else:
        with pytest.raises(torch_outcome):
            call(impl)


def test_float_groups_fail_at_torchs_first_call_with_a_type_error() -> None:
    """DIFFERENCES['float groups'], torch's side: the layer is built and its first call fails."""
    m = nn.GroupNorm(2.0, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be int, not float"):
        m(torch.randn(2, 4, 3))


# ------------------------------------------------------------------------------- ModuleInfo: the layer


def _module_inputs(dtype: torch.dtype, *, requires_grad: bool = False, training: bool = True) -> list[Any]:
    return list(
        MODULEINFO.module_inputs_func(
            MODULEINFO, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
        )
    )


def _build(impl: Impl, module_input: Any, dtype: torch.dtype, training: bool = True) -> nn.Module:
    c = module_input.constructor_input
    torch.manual_seed(0)
    m = impl.Module(*c.args, **c.kwargs)
    m.to("cpu").to(dtype)
    with torch.no_grad():  # parameters away from ones and zeros, so that a dropped or swapped one shows
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    m.train(training)
    return m  # type: ignore[no-any-return]


def _torch_twin(m: nn.Module, module_input: Any, dtype: torch.dtype) -> nn.Module:
    c = module_input.constructor_input
    twin = nn.GroupNorm(*c.args, **c.kwargs).to(dtype)
    twin.load_state_dict(m.state_dict())
    return twin


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_moduleinfo_forward(impl: Impl, dtype: torch.dtype, training: bool) -> None:
    """test_modules.test_forward: every ModuleInfo input, against torch's layer with the same state and the
    float64 reference; ``.float()`` and ``.double()`` then convert the parameters."""
    inputs = _module_inputs(dtype, training=training)
    assert len(inputs) == 10
    for module_input in inputs:
        m = _build(impl, module_input, dtype, training)
        (x,) = module_input.forward_input.args
        y = m(x)
        assert y.dtype == dtype and y.shape == x.shape, module_input.desc
        tol = _TOLERANCE[dtype]
        torch.testing.assert_close(y, _torch_twin(m, module_input, dtype)(x), rtol=tol, atol=tol)
        ref = _float64_reference(x, m.num_groups, m.weight, m.bias, m.eps)
        np.testing.assert_allclose(y.detach().double().numpy(), ref, rtol=tol, atol=tol * 10, err_msg=module_input.desc)
        for method, want in (("float", torch.float32), ("double", torch.float64)):
            getattr(m, method)()
            assert m(x.to(want)).dtype == want
            assert all(p.dtype == want and p.device.type == "cpu" for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_moduleinfo_factory_kwargs(impl: Impl, dtype: torch.dtype) -> None:
    """test_modules.test_factory_kwargs: device and dtype reach every parameter, with torch's values."""
    for module_input in _module_inputs(dtype):
        c = module_input.constructor_input
        for device in ("cpu", "meta"):
            m = impl.Module(*c.args, **c.kwargs, device=device, dtype=dtype)
            theirs = nn.GroupNorm(*c.args, **c.kwargs, device=device, dtype=dtype)
            assert [n for n, _ in m.named_parameters()] == [n for n, _ in theirs.named_parameters()]
            assert list(m.buffers()) == []
            for p, q in zip(m.parameters(), theirs.parameters(), strict=True):
                assert (p.device.type, p.dtype, p.shape, p.requires_grad) == (device, dtype, q.shape, True)
                assert isinstance(p, nn.Parameter)
                if device == "cpu":
                    assert torch.equal(p, q)  # torch's initialisation: ones and zeros


def test_moduleinfo_device_context_init(impl: Impl) -> None:
    """test_modules.test_device_ctx_init: built under ``with torch.device('meta')``, the parameters are meta
    tensors with the metadata of the CPU ones."""
    for module_input in _module_inputs(torch.float32):
        c = module_input.constructor_input
        on_cpu = impl.Module(*c.args, **c.kwargs)
        with torch.device("meta"):
            on_meta = impl.Module(*c.args, **c.kwargs)
        for p, q in zip(on_meta.parameters(), on_cpu.parameters(), strict=True):
            assert p.is_meta
            assert (p.shape, p.dtype, p.stride(), p.requires_grad) == (q.shape, q.dtype, q.stride(), q.requires_grad)


def test_moduleinfo_repr(impl: Impl) -> None:
    """test_modules.test_repr: repr and str work, and read like torch's."""
    for module_input in _module_inputs(torch.float32):
        c = module_input.constructor_input
        m = impl.Module(*c.args, **c.kwargs)
        text = repr(m)
        assert str(m) == text
        assert text.replace(type(m).__name__, "GroupNorm", 1) == repr(nn.GroupNorm(*c.args, **c.kwargs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moduleinfo_pickle(impl: Impl, training: bool) -> None:
    """test_modules.test_pickle: torch.save / torch.load (and pickle) give a layer with the same output."""
    for module_input in _module_inputs(torch.float32, training=training):
        m = _build(impl, module_input, torch.float32, training)
        (x,) = module_input.forward_input.args
        y = m(x)
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        unpickled = pickle.loads(pickle.dumps(m))
        for copy_ in (loaded, unpickled, copy.deepcopy(m)):
            assert type(copy_) is type(m) and copy_.training == training
            torch.testing.assert_close(copy_(x), y, rtol=0, atol=0)


def test_moduleinfo_state_dict_round_trips_with_torchs_layer(impl: Impl) -> None:
    """A model saved with either layer loads into the other (strict), and computes the same."""
    for module_input in _module_inputs(torch.float64):
        m = _build(impl, module_input, torch.float64)
        c = module_input.constructor_input
        theirs = nn.GroupNorm(*c.args, **c.kwargs).double()
        theirs.load_state_dict(m.state_dict(), strict=True)
        fresh = impl.Module(*c.args, **c.kwargs).double()
        fresh.load_state_dict(theirs.state_dict(), strict=True)
        (x,) = module_input.forward_input.args
        torch.testing.assert_close(fresh(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_moduleinfo_non_contiguous_inputs(impl: Impl) -> None:
    """test_modules.test_non_contiguous_tensors: non-contiguous inputs and output gradients give the same
    outputs and gradients."""

    def non_contiguous(t: torch.Tensor) -> torch.Tensor:
        out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
        return out.requires_grad_(t.requires_grad)

    for module_input in _module_inputs(torch.float32, requires_grad=True):
        m = _build(impl, module_input, torch.float32)
        (x,) = module_input.forward_input.args
        y = m(x)
        dy = torch.randn_like(y)
        want = torch.autograd.grad(y, [x, *m.parameters()], dy)
        for inp, g in itertools.product((x, non_contiguous(x)), (dy, non_contiguous(dy))):
            assert inp is x or not inp.is_contiguous()
            out = m(inp)
            torch.testing.assert_close(out, y)
            got = torch.autograd.grad(out, [inp, *m.parameters()], g)
            torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
            for a, b in zip(got[1:], want[1:], strict=True):
                torch.testing.assert_close(a, b)


def _module_gradient_checks(impl: Impl, check: Callable[..., bool], training: bool, **options: Any) -> None:
    for module_input in _module_inputs(torch.float64, requires_grad=True, training=training):
        m = _build(impl, module_input, torch.float64, training)
        (x,) = module_input.forward_input.args
        params = list(m.parameters())

        def fn(x: torch.Tensor, *params: torch.Tensor, m: nn.Module = m) -> torch.Tensor:
            return m(x)  # type: ignore[no-any-return]

        assert check(fn, (x, *params), **options), module_input.desc
        # and each parameter alone (test_modules' partial derivatives)
        for p in params:
            for q in params:
                q.requires_grad_(q is p)
            assert check(fn, (x, *params), **options), f"{module_input.desc}: with respect to one parameter"
        for q in params:
            q.requires_grad_(True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moduleinfo_gradcheck(impl: Impl, training: bool) -> None:
    """test_modules.test_grad, in gradcheck's fast mode (random projections of the Jacobians: the ModuleInfo's
    inputs have up to 900 elements, whose full Jacobians would take a minute on a busy machine)."""
    _module_gradient_checks(impl, torch.autograd.gradcheck, training, fast_mode=True)


def test_moduleinfo_gradgradcheck(impl: Impl) -> None:
    """test_modules.test_gradgrad, in gradcheck's fast mode (random projections of the Jacobians, which keeps
    this within seconds)."""
    assert MODULEINFO.supports_gradgrad
    _module_gradient_checks(impl, torch.autograd.gradgradcheck, training=True, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moduleinfo_memory_format(impl: Impl, training: bool) -> None:
    """test_modules.test_memory_format: channels_last input and a layer moved with ``to(memory_format=)``
    give the contiguous result, keep the input's format in the output and the input's gradient, and
    contiguous output otherwise."""
    formats = (torch.preserve_format, torch.contiguous_format, torch.channels_last)
    for module_input in _module_inputs(torch.float32, requires_grad=True, training=training):
        m = _build(impl, module_input, torch.float32, training)
        (x,) = module_input.forward_input.args
        y = m(x)
        dy = torch.rand_like(y)
        want = torch.autograd.grad(y, [x, *m.parameters()], dy)
        layouts = [torch.contiguous_format, torch.channels_last] if x.dim() == 4 else [torch.contiguous_format]
        for layout in layouts:
            xl = x.detach().clone().to(memory_format=layout).requires_grad_()
            for module_format in formats:
                m.to(memory_format=module_format)
                out = m(xl)
                torch.testing.assert_close(out, y, atol=1e-4, rtol=1e-4)
                got = torch.autograd.grad(out, [xl, *m.parameters()], torch.empty_like(out).copy_(dy))
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
                for t in (out, got[0]):
                    assert t.is_contiguous(memory_format=layout), (module_input.desc, layout, module_format)


def test_moduleinfo_train_and_eval_do_not_differ(impl: Impl) -> None:
    """test_modules.test_if_train_and_eval_modes_differ: the ModuleInfo says the forward pass never reads
    the training flag, so it runs with the attribute removed."""
    assert not MODULEINFO.train_and_eval_differ
    for module_input in _module_inputs(torch.float32):
        m = _build(impl, module_input, torch.float32)
        (x,) = module_input.forward_input.args
        y = m(x)
        del m.training
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_module_to_and_to_empty(impl: Impl) -> None:
    """``to`` converts in place and returns the layer (test_nn.test_to); ``to_empty`` moves the parameters
    without their values; parameters stay Parameters."""
    m = impl.Module(2, 4)
    assert m.to("cpu") is m
    assert m.to("cpu", dtype=torch.float32) is m
    weight = m.weight
    assert m.to(torch.float64) is m and m.weight is weight and m.weight.dtype == torch.float64
    assert m.double().weight.dtype == torch.float64 and m.half().bias.dtype == torch.float16
    meta = copy.deepcopy(m).to_empty(device="meta")
    assert all(p.is_meta and isinstance(p, nn.Parameter) for p in meta.parameters())
    with pytest.raises(RuntimeError):
        m.to("cpu", copy=True)  # type: ignore[call-overload]


def test_module_requires_grad_and_zero_grad(impl: Impl) -> None:
    m = impl.Module(2, 4)
    x = torch.randn(3, 4, 5)
    m(x).square().sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    m.zero_grad()
    assert m.weight.grad is None
    assert m.requires_grad_(False) is m
    assert not m(x).requires_grad


# ------------------------------------------------------------------------- test_nn.py: GroupNorm tests


GOOD_SHAPES = {(1, 2, 3, 4): 2, (2, 3, 10): 3, (3, 1, 1, 1, 2): 1, (2, 6, 4, 2, 2): 3, (1, 256, 1, 1): 32}
BAD_SHAPES = {(1, 2, 3, 4): 3, (2, 3, 10): 2, (3, 1, 1, 1, 2): 10, (2, 6, 4, 2, 2): 4}


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("shape", GOOD_SHAPES, ids=str)
def test_nn_general_normalizes_and_applies_weight_and_bias(impl: Impl, shape: tuple[int, ...], grad: bool) -> None:
    """test_nn._test_GroupNorm_general: with eps=0 every group has mean 0 and variance 1; the weight and bias
    scale and shift each channel."""
    g, b, c = GOOD_SHAPES[shape], shape[0], shape[1]
    torch.manual_seed(0)
    x = torch.empty(shape).uniform_(0, 10).requires_grad_(grad)
    gn = impl.Module(g, c, eps=0)
    y = gn(x)
    rows = y.reshape(b, g, -1)
    assert rows.mean(-1).abs().mean().item() == pytest.approx(0, abs=1e-5)
    assert rows.var(-1, unbiased=False).mean().item() == pytest.approx(1, abs=1e-5)
    if grad:
        y.backward(torch.randn_like(y))
        assert x.grad is not None and torch.isfinite(x.grad).all()
    scale, shift = torch.empty(c).uniform_(0.2, 2), torch.empty(c).uniform_(0.2, 2)
    with torch.no_grad():
        gn.weight.copy_(scale)
        gn.bias.copy_(shift)
    normed = ((gn(x).reshape(b, c, -1) - shift.view(c, 1)) / scale.view(c, 1)).reshape(b, g, -1)
    assert normed.mean(-1).abs().mean().item() == pytest.approx(0, abs=1e-5)
    assert normed.var(-1, unbiased=False).mean().item() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
def test_nn_general_bad_groups_fail_at_construction(impl: Impl, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"num_channels ({shape[1]}) must be divisible by num_groups")):
        impl.Module(BAD_SHAPES[shape], shape[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nn_raises_error_if_one_value_per_group(impl: Impl, training: bool) -> None:
    """test_nn.test_GroupNorm_raises_error_if_one_value_per_group (torch checks in eval mode too)."""
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        impl.Module(10, 10).train(training)(x)


def test_nn_empty_batch(impl: Impl) -> None:
    """test_nn.test_GroupNorm_empty: a zero-size batch gives a zero-size output and zero gradients."""
    m = impl.Module(2, 4)
    x = torch.randn(0, 4, 2, 2, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    out.backward(torch.rand_like(out))
    assert x.grad is not None and x.grad.shape == x.shape
    for p in m.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


_MIXED_SHAPES = [((1, 8, 4, 3), 2), ((1, 8, 3, 4), 4), ((4, 8, 40, 40), 4), ((1, 40, 50, 50), 2), ((1, 9, 3, 4, 5), 3)]
_MIXED_SHAPES += [((1, 8, 65, 55), 2), ((1, 3, 20, 20), 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nn_cpu_mixed_dtype(impl: Impl, dtype: torch.dtype, channels_last: bool) -> None:
    """test_nn._test_GroupNorm_cpu_mixed_dtype: a half-precision input with float32 parameters gives the
    half-precision output of the float32 computation, and float32 parameter gradients."""
    for shape, g in _MIXED_SHAPES:
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if channels_last else None
        torch.manual_seed(0)
        x = torch.randn(shape).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x_half = x.detach().requires_grad_()
        x_mixed = x.detach().requires_grad_()
        x_float = x.float().detach().requires_grad_()
        m_half = impl.Module(g, shape[1]).to(dtype)
        m_mixed = copy.deepcopy(m_half).float()
        m_float = copy.deepcopy(m_mixed)
        out_half, out_mixed, out_float = m_half(x_half), m_mixed(x_mixed), m_float(x_float)
        assert out_mixed.dtype == dtype
        torch.testing.assert_close(out_half, out_mixed, atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(out_mixed.float(), out_float, atol=5e-3, rtol=5e-3)
        dy = torch.randn(shape).to(dtype)
        out_mixed.backward(dy)
        out_float.backward(dy.float())
        out_half.backward(dy)
        assert m_mixed.weight.grad.dtype == torch.float32 and x_mixed.grad.dtype == dtype
        torch.testing.assert_close(m_mixed.weight.grad, m_float.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m_mixed.bias.grad, m_float.bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_mixed.grad.float(), x_float.grad, atol=5e-5, rtol=5e-3)
        atol, rtol = (1e-2, 1.2e-1) if dtype == torch.bfloat16 else (5e-3, 1.5e-2)
        torch.testing.assert_close(m_half.weight.grad, m_float.weight.grad.to(dtype), atol=atol, rtol=rtol)
        torch.testing.assert_close(m_half.bias.grad, m_float.bias.grad.to(dtype), atol=atol, rtol=rtol)
        torch.testing.assert_close(x_half.grad, x_mixed.grad, atol=atol, rtol=rtol)


_NHWC_SHAPES = [((4, 8, 10, 10), 4), ((2, 30, 9, 9), 3), ((4, 40, 40, 40), 2), ((2, 9, 7, 11, 15), 3)]
_NHWC_SHAPES += [((2, 9, 7, 200, 15), 3)]


@pytest.mark.parametrize("mixed", [False, True], ids=["same-dtype", "float32-parameters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_nn_groupnorm_nhwc(impl: Impl, dtype: torch.dtype, mixed: bool) -> None:
    """test_nn.test_groupnorm_nhwc: channels_last (3-D too) input gives a channels_last output equal to the
    contiguous computation, with the same gradients."""
    for shape, g in _NHWC_SHAPES:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        param_dtype = torch.float32 if mixed and dtype == torch.bfloat16 else dtype
        gn = impl.Module(g, shape[1]).to(param_dtype)
        with torch.no_grad():
            gn.weight.uniform_()
            gn.bias.uniform_()
        ref = impl.Module(g, shape[1]).to(param_dtype)
        ref.load_state_dict(gn.state_dict())
        x_ref = x.detach().contiguous().requires_grad_()
        out = gn(x)
        out.backward(dy)
        out_ref = ref(x_ref)
        out_ref.backward(dy.contiguous())
        assert out.is_contiguous(memory_format=fmt) and out_ref.is_contiguous()
        torch.testing.assert_close(out, out_ref)
        for a, b in ((gn.weight.grad, ref.weight.grad), (gn.bias.grad, ref.bias.grad), (x.grad, x_ref.grad)):
            torch.testing.assert_close(a, b, atol=5e-4, rtol=8e-3)


def test_nn_groupnorm_nwc(impl: Impl) -> None:
    """A transposed (N, C, W) view computes like its contiguous copy, float32 and bfloat16."""
    torch.manual_seed(0)
    x = torch.randn(4, 20, 20)
    dy = torch.randn(4, 20, 20)
    m = impl.Module(4, 20)
    x1 = x.clone().requires_grad_()
    view = x1.transpose(1, 2)
    y1 = m(view)
    y1.backward(dy)
    x2 = view.detach().contiguous().requires_grad_()
    y2 = m(x2)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad.transpose(1, 2), x2.grad)
    y3 = copy.deepcopy(m).to(torch.bfloat16)(view.detach().bfloat16())
    assert y3.dtype == torch.bfloat16
    torch.testing.assert_close(y3.float(), y2, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("grad_format", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("input_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_nn_memory_format(impl: Impl, input_format: torch.memory_format, grad_format: torch.memory_format) -> None:
    """test_nn.test_GroupNorm_memory_format: every pairing of input and output-gradient layouts gives the
    contiguous result."""
    torch.manual_seed(0)
    net_orig = impl.Module(2, 4)
    net = copy.deepcopy(net_orig)
    x_orig = torch.rand(2, 4, 4, 4, requires_grad=True)
    grad_orig = torch.rand(2, 4, 4, 4)
    x = x_orig.detach().clone().to(memory_format=input_format).requires_grad_()
    y = net(x)
    y.backward(grad_orig.detach().to(memory_format=grad_format))
    y_orig = net_orig(x_orig)
    y_orig.backward(grad_orig)
    torch.testing.assert_close(y, y_orig)
    torch.testing.assert_close(x.grad, x_orig.grad)


def test_nn_numeric_large_groups(impl: Impl) -> None:
    """test_nn.test_GroupNorm_numeric (a quarter of its size): two groups of 4.7 million values each, within
    1e-5 of the float64 reference."""
    torch.manual_seed(0)
    gn = impl.Module(2, 8)
    x = torch.rand(1, 8, 128, 128, 72)
    y = gn(x)
    ref = _float64_reference(x, 2, None, None, gn.eps)
    assert np.abs(y.detach().double().numpy() - ref).max() <= 1e-5
    del ref


def test_nn_layer_without_affine_ignores_num_channels(impl: Impl) -> None:
    """torch checks num_channels only through the weight's size: without one, any divisible channel count
    is normalized."""
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    y = impl.Module(2, 4, affine=False)(x)
    np.testing.assert_allclose(y.numpy(), _float64_reference(x, 2, None, None, 1e-5), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- groupnorm is torch's layer


def test_groupnorm_layer_is_a_torch_group_norm() -> None:
    """Code that checks ``isinstance(m, torch.nn.GroupNorm)`` (diffusers, timm's initialisers) sees it."""
    assert issubclass(gt.GroupNorm, nn.GroupNorm)
    assert isinstance(gt.GroupNorm(2, 4), nn.GroupNorm)
    assert nn.GroupNorm.__constants__ == gt.GroupNorm.__constants__[: len(nn.GroupNorm.__constants__)]


def test_groupnorm_reset_parameters_and_extra_repr_are_torchs() -> None:
    m = gt.GroupNorm(2, 4, eps=1e-3, bias=False)
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4)) and m.bias is None
    assert m.extra_repr() == nn.GroupNorm(2, 4, eps=1e-3, bias=False).extra_repr()
    assert math.isclose(m.eps, 1e-3)
