"""``tv:vit_*``: torchvision's vision transformers, cut into stages by an adapter that knows their structure.

torchvision's ``VisionTransformer`` is not a chain of its children (its forward prepends the class
token, and the position embedding lives in the encoder), so the generic splitter rejects it. Here:

* stage 0, the stem: ``conv_proj``, the class token and ``encoder.pos_embedding`` (+ its dropout);
* one stage per ``EncoderBlock``, whose ``nn.MultiheadAttention`` is replaced by
  :class:`MHAAsLinears`: the same weights as two ``nn.Linear`` (``qkv`` of 3×width outputs, and
  ``proj``), so a local rule sees both, like every other Linear (``in_proj_weight`` is no
  ``Linear``, and MHA never *calls* its ``out_proj``: no forward hook would ever see either);
* the classifier stage: ``encoder.ln``, the class token's row, ``heads``.

As for every ``tv:`` model, the staged forward is checked against torchvision's own forward on a
random input (with the original attention, before the swap) before it is accepted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel
from distlocal.models.vit import Attention, patch_grid


class MHAAsLinears(Attention):
    """A batch-first self-attention ``nn.MultiheadAttention`` as :class:`Attention`, called the way
    torchvision's ``EncoderBlock`` calls MHA: ``(x, x, x, need_weights=False) -> (out, None)``."""

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> MHAAsLinears:
        """The same function as ``mha``: its packed ``[Wq; Wk; Wv]`` is ``qkv``, its ``out_proj`` ``proj``."""
        if not mha.batch_first or mha.in_proj_weight is None or mha.bias_k is not None:
            raise ValueError(f"only a batch-first MHA with a packed in-projection converts, got {mha}")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.proj.weight.copy_(mha.out_proj.weight)
            for dst, src in ((new.qkv.bias, mha.in_proj_bias), (new.proj.bias, mha.out_proj.bias)):
                dst.copy_(src) if src is not None else dst.zero_()
        return new

    def forward(  # type: ignore[override]
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or need_weights:
            raise ValueError("MHAAsLinears is self-attention without weights: call it as (x, x, x)")
        return super().forward(query), None


class ViTStem(nn.Module):
    """Patches -> tokens, class token first, plus the position embedding (torchvision's order)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTHead(nn.Module):
    """The final LayerNorm, the class token's row, the heads."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def resize_pos_embedding(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """``(1, 1 + old_h*old_w, D)`` -> ``(1, 1 + new_h*new_w, D)``: the class token's row kept, the
    grid's rows interpolated bicubically (as timm and torchvision do to fine-tune at another size)."""
    d = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)], dim=1)


def _check_same(
    staged: StagedModel, vit: VisionTransformer, label: str, in_shape: tuple[int, int, int]
) -> None:
    """The staged model must compute torchvision's function (eval mode, a private generator).

    Compared at the heads' input as well as at the output: torchvision zero-initialises the head,
    so at random init the outputs alone are all zeros whatever the blocks compute.
    """
    # One sample: every token attends within its own sample, so a batch adds nothing to the check
    # but time (ViT-B at 224 is ~35 GFLOP a sample, run twice).
    x = torch.randn((1, *in_shape), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []  # the heads' input: torchvision's run, then the staged one
    hook = vit.heads.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    was_training = vit.training
    vit.eval()
    staged.eval()
    try:
        with torch.no_grad():
            ref = vit(x)
            for block in vit.encoder.layers:  # the swap happens here, after the reference forward
                block.self_attention = MHAAsLinears.from_mha(block.self_attention)
            out = staged(x)
    finally:
        hook.remove()
        staged.train(was_training)
    for a, b in ((out, ref), (seen[1], seen[0])):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
            err = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            raise ConfigError(
                f"model '{label}': the staged forward differs from torchvision's (max |diff| {err:.2e})"
            )


def stage_tv_vit(vit: VisionTransformer, label: str, in_shape: tuple[int, int, int]) -> StagedModel:
    """Cut a torchvision ``VisionTransformer`` built at ``image_size=H`` into stages for ``(C, H, W)``
    inputs, checked against its own forward; ``W != H`` then interpolates the position embedding to
    the ``H/p x W/p`` grid (the check needs torchvision's forward, which takes squares only)."""
    from distlocal.models.torchvision_adapter import _first_conv_for  # late: that module imports this one

    grid = patch_grid(label, (in_shape[1], in_shape[2]), vit.patch_size)
    if vit.image_size != in_shape[1]:
        raise ValueError(f"build {label} at image_size={in_shape[1]}, got {vit.image_size}")
    _first_conv_for(vit, in_shape[0])
    names = ["stem", *(n for n, _ in vit.encoder.layers.named_children()), "classifier"]
    staged = StagedModel([ViTStem(vit), *vit.encoder.layers, ViTHead(vit)], names)
    _check_same(staged, vit, label, (in_shape[0], in_shape[1], in_shape[1]))
    if grid[1] != grid[0]:
        stem = staged.stages[0]
        with torch.no_grad():
            pos = resize_pos_embedding(stem.pos_embedding, (grid[0], grid[0]), grid)
            stem.pos_embedding = nn.Parameter(pos)
    return staged


def build_tv_vit(name: str, in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """``tv:vit_*`` for inputs ``(C, H, W)``: any H, W the patch size divides (one error line otherwise).

    torchvision's ViT takes square inputs of its ``image_size``: it is built at ``image_size=H``
    (:func:`stage_tv_vit` handles ``W != H``). ``C != 3`` swaps ``conv_proj`` for a C-channel one.
    """
    label = f"tv:{name}"
    # vit_b_16 -> 16: the tiling is checked before torchvision asserts on it (checked again after).
    patch_grid(label, (in_shape[1], in_shape[2]), int(name.rsplit("_", 1)[1]))
    vit = torchvision.models.get_model(name, weights=None, num_classes=num_classes, image_size=in_shape[1])
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model '{label}' is not a torchvision VisionTransformer")
    return stage_tv_vit(vit, label, in_shape)
