"""``convert``: swap every ``torch.nn.GroupNorm`` of a model for ``groupnorm.torch.GroupNorm``, in place.

The new layer takes over the old one's ``Parameter`` objects themselves (not copies), so an optimizer, a
gradient scaler, a ``DistributedDataParallel`` bucket or a tied weight that holds them keeps working and
sees the same tensors, with their device, dtype, ``requires_grad`` and any gradient already accumulated.
It also takes over the old layer's hooks (forward, backward, state-dict), its training flag and any
attribute other code set on it, so that it stands where the old one stood.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["convert"]

#: what ``torch.nn.GroupNorm`` registers itself: layers that hold anything else (a parametrization, an
#: old-style ``weight_norm``'s ``weight_g``/``weight_v``, a buffer, a child module) are not reproduced.
_OWN_PARAMETERS = frozenset({"weight", "bias"})

#: hook tables of ``nn.Module``: the new layer takes these very dictionaries over, so the handles that
#: ``register_*_hook`` returned still remove their hooks.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.GroupNorm`` in ``module`` (its submodules, and ``module`` itself) by a
    ``groupnorm.torch.GroupNorm`` with the same ``num_groups``, ``num_channels``, ``eps``, ``affine`` and
    ``bias``, in place, and return ``module`` (or, when ``module`` itself is a ``torch.nn.GroupNorm``, the
    new layer that replaces it), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    The new layer shares the old one's ``weight`` and ``bias`` Parameter objects, so optimizers built
    before the call keep updating the model. A layer that appears several times in the model becomes one
    new layer that appears at the same places.

    Only layers whose class is exactly ``torch.nn.GroupNorm`` are replaced. A subclass (timm's
    ``GroupNormAct`` adds an activation, other libraries change ``forward``) or a layer that holds more
    than torch's own parameters (a parametrization, ``weight_norm``) cannot be reproduced exactly: those
    are left as they are and named in one ``UserWarning``. groupnorm's own layers are left as they are.

    Example::

        >>> import groupnorm.torch
        >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.GroupNorm(32, 64), nn.SiLU())
        >>> model = groupnorm.torch.convert(model)
        >>> isinstance(model[1], groupnorm.torch.GroupNorm)
        True
    """
    from groupnorm.torch import GroupNorm

    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(module).__qualname__}.")
    replaced: dict[int, nn.Module] = {}
    skipped: dict[str, str] = {}

    def new_for(name: str, old: nn.Module) -> nn.Module | None:
        if isinstance(old, GroupNorm) or not isinstance(old, nn.GroupNorm):
            return None
        if id(old) in replaced:
            return replaced[id(old)]
        reason = _why_not(old)
        if reason:
            skipped.setdefault(name or "(the model itself)", reason)
            return None
        new = _replacement(old, GroupNorm)
        replaced[id(old)] = new
        return new

    root = new_for("", module)
    if root is None:
        for parent_name, parent in list(module.named_modules(remove_duplicate=False)):
            for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
                if child is None:
                    continue
                new = new_for(f"{parent_name}.{child_name}" if parent_name else child_name, child)
                if new is not None:
                    parent.add_module(child_name, new)
    if skipped:
        listed = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        warnings.warn(
            f"groupnorm.torch.convert left {len(skipped)} GroupNorm layer(s) as they are, since it cannot "
            f"reproduce them exactly: {listed}",
            UserWarning,
            stacklevel=2,
        )
    return module if root is None else root


def _why_not(old: nn.Module) -> str:
    """Why ``old`` (a ``torch.nn.GroupNorm`` or subclass) cannot be replaced; empty when it can."""
    cls = type(old)
    if cls is not nn.GroupNorm:
        return f"{cls.__module__}.{cls.__qualname__} is a subclass of torch.nn.GroupNorm"
    extra = sorted(set(old._parameters) - _OWN_PARAMETERS)
    if extra:
        return f"it holds parameters {', '.join(extra)} besides weight and bias"
    if old._buffers or old._modules:
        return "it holds buffers or submodules of its own"
    return ""


def _replacement(old: nn.GroupNorm, cls: Any) -> nn.Module:
    """A ``cls`` layer standing in for ``old``: its settings, Parameter objects, hooks and attributes."""
    weight, bias = old._parameters.get("weight"), old._parameters.get("bias")
    like = weight if weight is not None else bias
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new: nn.Module = cls(
        old.num_groups,
        old.num_channels,
        old.eps,
        old.affine,
        bias=bias is not None,
        **factory,
    )
    for name in _OWN_PARAMETERS:
        if name in new._parameters or name in old._parameters:
            new._parameters[name] = old._parameters.get(name)
    for table in _HOOK_TABLES:
        if table in old.__dict__:
            new.__dict__[table] = old.__dict__[table]
    for key, value in old.__dict__.items():
        if key not in new.__dict__:  # attributes other code set on the layer (a qconfig, an init flag)
            new.__dict__[key] = value
    new.train(old.training)
    return new
