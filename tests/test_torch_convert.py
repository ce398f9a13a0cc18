"""``groupnorm.torch.convert``: every ``torch.nn.GroupNorm`` of a model swapped in place, the model's outputs,
gradients, parameters, settings, hooks and optimizers unchanged; layers it cannot reproduce left alone."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import groupnorm.torch as gt
from groupnorm._torch_convert import convert
from support import reference_group_norm


class GroupNormAct(nn.GroupNorm):
    """A subclass in the style of timm's ``GroupNormAct``: torch's layer followed by an activation."""

    def __init__(self, num_groups: int, num_channels: int) -> None:
        super().__init__(num_groups, num_channels)
        self.act = nn.ReLU()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(input))


class Block(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-3)
        self.extra = nn.ModuleList([nn.GroupNorm(1, channels, affine=False), nn.Identity()])
        self.by_name = nn.ModuleDict({"gn": nn.GroupNorm(channels, channels, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(self.conv(x)))
        return x + self.by_name["gn"](self.extra[0](y))


def model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), Block(8, 2), Block(8, 4)).to(dtype)
    with torch.no_grad():  # parameters away from their initial ones and zeros, so that a lost parameter shows
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def group_norms(m: nn.Module) -> dict[str, nn.Module]:
    return {name: sub for name, sub in m.named_modules() if isinstance(sub, (nn.GroupNorm, gt.GroupNorm))}


def test_every_group_norm_is_swapped_and_the_outputs_and_gradients_are_kept() -> None:
    original = model()
    converted = copy.deepcopy(original)
    before = group_norms(converted)
    assert convert(converted) is converted
    after = group_norms(converted)
    assert after.keys() == before.keys() and len(after) == 7
    assert all(type(m) is gt.GroupNorm for m in after.values())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.detach().contiguous(memory_format=layout).requires_grad_()
        want = original(xl)
        got = converted(xl)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        want_grads = torch.autograd.grad(want, [xl, *original.parameters()], dy)
        got_grads = torch.autograd.grad(got, [xl, *converted.parameters()], dy)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_a_converted_layer_computes_the_float64_reference() -> None:
    m = convert(nn.Sequential(nn.GroupNorm(2, 6, eps=1e-2)))
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(0.5, 2.0, 6))
        m[0].bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = torch.randn(3, 6, 4, 5) * 3 + 7
    want = reference_group_norm(x.numpy(), 2, 1, (2, 3), m[0].weight.detach().numpy(), m[0].bias.detach().numpy(), 1e-2)
    np.testing.assert_allclose(m(x).detach().double().numpy(), want, rtol=0, atol=2e-6)


def test_the_new_layers_hold_the_old_parameter_objects_so_optimizers_keep_working() -> None:
    original = model()
    converted = copy.deepcopy(original)
    old_params = list(converted.parameters())
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    old_norm = converted[1]
    convert(converted)
    assert converted[1].weight is old_norm.weight and converted[1].bias is old_norm.bias
    assert [id(p) for p in converted.parameters()] == [id(p) for p in old_params]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):
        for m, opt in ((original, reference_optimizer), (converted, optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for got, want in zip(converted.parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.equal(converted[1].weight, old_norm.weight.detach().clone().fill_(1.0))


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({}, ["weight", "bias"]),
        ({"affine": False}, []),
        ({"bias": False}, ["weight"]),
        ({"eps": 0.25, "dtype": torch.float64}, ["weight", "bias"]),
    ],
)
def test_settings_state_and_state_dict_are_kept(kwargs: dict[str, object], names: list[str]) -> None:
    old = nn.GroupNorm(3, 6, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in old.parameters():
            p.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in old.state_dict().items()}
    new = convert(old)
    assert type(new) is gt.GroupNorm
    assert (new.num_groups, new.num_channels, new.eps, new.affine) == (old.num_groups, 6, old.eps, old.affine)
    assert [n for n, p in new.named_parameters()] == names
    assert (new.bias is None) == (old.bias is None)
    assert new.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(new.state_dict()[key], value)
        assert new.state_dict()[key].dtype == value.dtype
    back = nn.GroupNorm(3, 6, **kwargs)  # type: ignore[arg-type]
    back.load_state_dict(new.state_dict())
    new.load_state_dict(back.state_dict())
    x = torch.randn(2, 6, 4, dtype=kwargs.get("dtype", torch.float32))  # type: ignore[arg-type]
    torch.testing.assert_close(new(x), back(x), rtol=1e-5, atol=1e-5)


def test_training_flag_requires_grad_device_and_attributes_are_kept() -> None:
    m = nn.Sequential(nn.GroupNorm(2, 4, device="meta"), nn.GroupNorm(2, 4, dtype=torch.float64))
    m[1].weight.requires_grad_(False)
    m[1].qconfig = "kept"  # an attribute other code set
    m.eval()
    m[0].train()
    convert(m)
    assert m[0].weight.is_meta and m[0].training
    assert m[1].weight.dtype == torch.float64 and not m[1].training
    assert not m[1].weight.requires_grad and m[1].bias.requires_grad
    assert m[1].qconfig == "kept"


def test_the_model_itself_may_be_a_group_norm() -> None:
    old = nn.GroupNorm(2, 4)
    new = convert(old)
    assert type(new) is gt.GroupNorm and new is not old
    assert new.weight is old.weight


def test_a_layer_used_twice_becomes_one_layer_used_twice() -> None:
    shared = nn.GroupNorm(2, 4)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    convert(m)
    assert m[0] is m[2] and type(m[0]) is gt.GroupNorm
    assert len(list(m.parameters())) == 2


def test_hooks_are_kept_and_their_handles_still_remove_them() -> None:
    calls: list[str] = []
    old = nn.GroupNorm(2, 4)
    m = nn.Sequential(old)
    pre = old.register_forward_pre_hook(lambda mod, args: calls.append(f"pre {type(mod) is gt.GroupNorm}"))
    old.register_forward_hook(lambda mod, args, out: calls.append("forward"))
    old.register_full_backward_hook(lambda mod, gin, gout: calls.append("backward"))
    old.register_state_dict_post_hook(lambda mod, sd, prefix, local: calls.append("state_dict"))
    convert(m)
    x = torch.randn(2, 4, 3, requires_grad=True)
    m(x).sum().backward()
    m.state_dict()
    assert calls == ["pre True", "forward", "backward", "state_dict"]
    assert type(m[0]) is gt.GroupNorm
    pre.remove()
    calls.clear()
    m(x)
    assert calls == ["forward"]


def test_layers_it_cannot_reproduce_are_left_alone_and_named_in_one_warning() -> None:
    torch.manual_seed(0)
    act = GroupNormAct(2, 4)
    parametrized = nn.GroupNorm(2, 4)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Softplus())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated in favour of parametrizations
        old_style = torch.nn.utils.weight_norm(nn.GroupNorm(2, 4), dim=0)
    m = nn.Sequential(act, nn.GroupNorm(2, 4), parametrized, old_style)
    x = torch.randn(2, 4, 3) - 0.5
    want = m(x)
    with pytest.warns(UserWarning, match="cannot reproduce them exactly") as record:
        convert(m)
    assert len(record) == 1
    text = str(record[0].message)
    assert "3 GroupNorm layer(s)" in text
    assert f"0: {GroupNormAct.__module__}.GroupNormAct is a subclass of torch.nn.GroupNorm" in text
    assert "2: torch.nn.utils.parametrize.ParametrizedGroupNorm is a subclass" in text
    assert "3: it holds parameters weight_g, weight_v besides weight and bias" in text
    assert m[0] is act and m[2] is parametrized and m[3] is old_style
    assert type(m[1]) is gt.GroupNorm
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)  # the activation of GroupNormAct is kept


def test_nothing_to_skip_means_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model())
        convert(nn.Linear(2, 2))


def test_groupnorm_layers_and_other_modules_are_left_as_they_are() -> None:
    ours = gt.GroupNorm(2, 4, activation="silu")
    linear = nn.Linear(4, 4)
    m = nn.Sequential(ours, linear)
    convert(m)
    assert m[0] is ours and m[1] is linear
    converted = convert(model())
    layers = group_norms(converted)
    assert group_norms(convert(converted)) == layers  # a second call changes nothing


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"convert expects a torch\.nn\.Module, got list"):
        convert([nn.GroupNorm(2, 4)])  # type: ignore[arg-type]


# ------------------------------------------------------------------ the operator's design (see docs/pytorch.md)


def test_converted_layers_are_torch_group_norms() -> None:
    new = convert(nn.GroupNorm(2, 4))
    assert isinstance(new, nn.GroupNorm)


def test_convert_is_part_of_the_torch_front_end() -> None:
    assert gt.convert is convert  # type: ignore[attr-defined]
