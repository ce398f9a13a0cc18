"""torch.compile, torch.export and ONNX export (run by ONNX Runtime) of groupnorm's PyTorch layer."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

import groupnorm.torch as gt


def _model(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), gt.GroupNorm(4, 8, **kwargs))  # type: ignore[arg-type]
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _input(batch: int = 2) -> torch.Tensor:
    return 50 + torch.randn(batch, 3, 6, 5)  # a large mean: the exact path, not torch's kernel


@pytest.mark.parametrize("kwargs", [{}, {"activation": "silu"}, {"mean_close_to_zero": True}])
def test_compile_fullgraph_matches_eager(kwargs: dict[str, object]) -> None:
    model = _model(**kwargs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _input().requires_grad_()
    xc = x.detach().clone().requires_grad_()
    y, yc = model(x), compiled(xc)
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yc.backward(dy)
    torch.testing.assert_close(xc.grad, x.grad, atol=1e-5, rtol=1e-5)


def test_compile_nhwc_module() -> None:
    m = gt.GroupNorm(2, 6, channels_axis=-1, reduction_axes=(1, 2))
    x = torch.randn(2, 4, 3, 6)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x))


def test_export_with_dynamic_batch() -> None:
    model = _model(activation="gelu")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (_input(),), dynamic_shapes=({0: batch},))
    for n in (1, 3):
        x = _input(n)
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"activation": "silu"}, {"channels_axis": 1, "reduction_axes": (2,)}])
def test_onnx_export_runs_in_onnx_runtime(kwargs: dict[str, object]) -> None:
    model = _model(**kwargs).eval()
    x = _input()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert program is not None
    buffer = io.BytesIO()
    program.save(buffer)  # type: ignore[arg-type]
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
