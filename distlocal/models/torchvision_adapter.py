"""``tv:<name>``: any torchvision classification model, cut into stages by a generic splitter.

Torchvision models are not built as a list of stages, so the splitter guesses one from the
module tree and then *checks* the guess: the staged forward must reproduce the original
forward on a random input, otherwise the model is rejected rather than silently trained wrong.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ATOL = 1e-5

Group = list[tuple[str, nn.Module]]


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _contains(m: nn.Module, kind: type | tuple[type, ...]) -> bool:
    return any(isinstance(sub, kind) for sub in m.modules())


def _opens_stage(m: nn.Module) -> bool:
    """A module with weights of its own opens a stage; activations, pools and norms join the open one.

    Norms count as joiners so that e.g. resnet's ``conv1, bn1, relu, maxpool`` is one stem stage
    rather than a conv-only stage followed by a BN-only stage.
    """
    return _has_params(m) and not isinstance(m, _NORMS)


def _head_start(children: list[nn.Module]) -> int:
    """Index of the first top-level child of the classifier head.

    The head starts at the global pool or an explicit flatten; failing that (the pool is done
    functionally in the forward) at the last child holding a Linear, since feature extractors
    may hold Linears too (convnext's MLPs); failing that at the last child (squeezenet).
    """
    for i, m in enumerate(children):
        if isinstance(m, (*_GLOBAL_POOLS, nn.Flatten)):
            return i
    with_linear = [i for i, m in enumerate(children) if _contains(m, nn.Linear)]
    return with_linear[-1] if with_linear else len(children) - 1


def _first_conv_for(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv for one taking ``in_channels`` (torchvision hard-codes RGB input)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels and child.groups == 1:
                    conv = nn.Conv2d(
                        in_channels,
                        child.out_channels,
                        child.kernel_size,  # type: ignore[arg-type]
                        child.stride,  # type: ignore[arg-type]
                        child.padding,  # type: ignore[arg-type]
                        child.dilation,  # type: ignore[arg-type]
                        bias=child.bias is not None,
                        padding_mode=child.padding_mode,
                    )
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
                    setattr(parent, child_name, conv)
                return


def _split(model: nn.Module) -> tuple[list[Group], Group]:
    """Feature groups (one per stage) and the head children, in forward order."""
    top = list(model.named_children())
    at = _head_start([m for _, m in top]) if top else 0
    children: Group = []
    for name, child in top[:at]:
        if isinstance(child, nn.Sequential):
            # One level only: resnet's layer1 -> its blocks, mobilenet's features -> its blocks.
            children += [(f"{name}.{sub_name}", sub) for sub_name, sub in child.named_children()]
        else:
            children.append((name, child))
    groups: list[Group] = []
    for name, child in children:
        if groups and not (_opens_stage(child) and any(_opens_stage(m) for _, m in groups[-1])):
            groups[-1].append((name, child))
        else:
            groups.append([(name, child)])
    return groups, top[at:]


def _head_variants(head: Group) -> list[nn.Sequential]:
    """Candidate classifier stages; the forward's functional glue is one of a few known patterns.

    Torchvision forwards do ``torch.flatten`` between pool and classifier, and some pool (and
    densenet also ReLUs) functionally, with no module for it. Each candidate spells the glue
    out as modules; the equality check picks the one that matches.
    """
    modules = [m for _, m in head]
    if not any(_contains(m, nn.Flatten) for m in modules):
        linear_at = next((i for i, m in enumerate(modules) if _contains(m, nn.Linear)), len(modules))
        modules = modules[:linear_at] + [nn.Flatten(1)] + modules[linear_at:]
    if any(_contains(m, _GLOBAL_POOLS) for m in modules):
        return [nn.Sequential(*modules)]
    # Out-of-place ReLU: the head's input is the previous stage's output, which must stay intact.
    return [
        nn.Sequential(nn.AdaptiveAvgPool2d(1), *modules),
        nn.Sequential(nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), *modules),
    ]


def _same(out: torch.Tensor, ref: object) -> bool:
    return isinstance(ref, torch.Tensor) and out.shape == ref.shape and torch.allclose(out, ref, atol=_ATOL)


def _alternatives() -> str:
    from distlocal.models import model_names  # late: the registry imports this module lazily

    return ", ".join(model_names())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def stage_torchvision_model(model: nn.Module, label: str, in_shape: tuple[int, int, int]) -> StagedModel:
    """Cut ``model`` into a :class:`StagedModel` and verify it computes the same function.

    Raises :class:`ConfigError` when the model is not a chain of its children. The check runs
    in eval mode on a private generator, so it neither touches BN statistics nor the global RNG.
    """
    not_chain = (
        f"model '{label}' cannot be cut into stages generically (its forward is not a chain of "
        f"children); use a registered model: {_alternatives()}"
    )
    # Parameters held directly by the model (e.g. ViT's class token) would belong to no stage.
    if next(model.parameters(recurse=False), None) is not None:
        raise ConfigError(not_chain)
    was_training = model.training
    model.eval()
    x = torch.randn((2, *in_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            ref = model(x)
        except Exception as exc:
            raise ConfigError(
                f"model '{label}' fails on inputs of shape {tuple(in_shape)} ({_one_line(exc)}); "
                f"use larger images or a registered model: {_alternatives()}"
            ) from exc
        groups, head = _split(model)
        if not groups or not head:
            raise ConfigError(not_chain)
        names = [names_of[0][0] for names_of in groups] + ["classifier"]
        features = [nn.Sequential(*(m for _, m in g)) if len(g) > 1 else g[0][1] for g in groups]
        for candidate in _head_variants(head):
            staged = StagedModel([*features, candidate], names)
            try:
                out = staged(x)
            except Exception:
                continue
            if _same(out, ref):
                break
        else:
            raise ConfigError(not_chain)
    # Invariant the local/SGD split relies on: every parameter ends up in exactly one stage.
    if {id(p) for p in model.parameters()} != {id(p) for p in staged.parameters()}:
        raise ConfigError(not_chain)
    staged.train(was_training)
    return staged


def build_torchvision_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """``tv:<name>``: a randomly initialised torchvision classifier (never downloads weights), staged.

    ``tv:vit_*`` goes through its own adapter (distlocal/models/tv_vit.py).
    """
    label = f"tv:{name}"
    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise ConfigError(
            f"model '{label}': '{name}' is not a torchvision classification model; see "
            "torchvision.models.list_models(module=torchvision.models) for valid names"
        )
    if name.startswith("vit_"):  # not a chain of children: an adapter that knows ViT's structure
        from distlocal.models.tv_vit import build_tv_vit

        return build_tv_vit(name, in_shape, num_classes)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _first_conv_for(model, in_shape[0])
    return stage_torchvision_model(model, label, in_shape)
