"""Real models: small randomly initialised diffusers ``UNet2DModel`` and ``AutoencoderKL`` converted with
``convert`` compute the outputs and parameter gradients of the originals, contiguous and channels_last; and
diffusers' own ``isinstance(..., nn.GroupNorm)`` checks accept groupnorm's layer."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import groupnorm.torch as gt
from groupnorm._torch_convert import convert

diffusers = pytest.importorskip("diffusers")


def tiny_unet() -> nn.Module:
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def tiny_autoencoder() -> nn.Module:
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )


def _run_unet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, torch.tensor([10, 500])).sample  # type: ignore[no-any-return]


def _run_autoencoder(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, sample_posterior=False).sample  # type: ignore[no-any-return]


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]]] = {
    "UNet2DModel": (tiny_unet, _run_unet),
    "AutoencoderKL": (tiny_autoencoder, _run_autoencoder),
}


def _assert_relatively_close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """Every element within ``rel`` of the reference tensor's largest magnitude."""
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} against magnitude {scale:.3g}"


def _exactly_zero(name: str) -> bool:
    """Attention key biases: softmax ignores a shift of all scores, so their gradient is zero in exact
    arithmetic and float32 leaves rounding alone, where a relative comparison means nothing."""
    return name.endswith("to_k.bias")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_computes_the_originals_outputs_and_gradients(name: str, layout: str) -> None:
    build, run = MODELS[name]
    torch.manual_seed(0)
    original = build()
    converted = copy.deepcopy(original)
    norms = [n for n, m in original.named_modules() if type(m) is nn.GroupNorm]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in these models is left out
        convert(converted)
    assert len(norms) >= 8
    assert all(type(m) is gt.GroupNorm for n, m in converted.named_modules() if n in norms)
    assert not any(type(m) is nn.GroupNorm for m in converted.modules())
    x = torch.randn(2, 3, 16, 16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        original.to(memory_format=torch.channels_last)
        converted.to(memory_format=torch.channels_last)
    want = run(original, x)
    got = run(converted, x)
    _assert_relatively_close(got, want, f"{name} output")
    dy = torch.randn_like(want)
    (want * dy).sum().backward()
    (got * dy).sum().backward()
    largest = max(p.grad.abs().max().item() for p in original.parameters() if p.grad is not None)
    checked = 0
    for (p_name, p), q in zip(original.named_parameters(), converted.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, p_name
        elif _exactly_zero(p_name):
            assert max(p.grad.abs().max().item(), q.grad.abs().max().item()) <= 1e-5 * largest, p_name
        else:
            _assert_relatively_close(q.grad, p.grad, f"{name} gradient of {p_name}")
            checked += 1
    assert checked > 20


def test_diffusers_attention_accepts_groupnorms_layer_as_its_cross_attention_norm() -> None:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(
        query_dim=16,
        cross_attention_dim=8,
        heads=2,
        dim_head=8,
        cross_attention_norm="group_norm",
        cross_attention_norm_num_groups=4,
    )
    converted = convert(copy.deepcopy(attention))
    assert type(converted.norm_cross) is gt.GroupNorm
    hidden, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    _assert_relatively_close(converted(hidden, context), attention(hidden, context), "attention output")
