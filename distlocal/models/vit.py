"""``vit_tiny``, ``vit_mini``: staged vision transformers, each block all Linear and LayerNorm.

Stage 0 is the stem (a patch-embedding conv plus a fixed 2-D sin-cos position embedding), each
encoder block is one stage, and the classifier stage is the final LayerNorm, a mean over the
tokens and a ``Linear``. Attention is built from two ``nn.Linear`` (``qkv``, ``proj``) around
``F.scaled_dot_product_attention``, not from ``nn.MultiheadAttention`` (whose packed
``in_proj_weight`` is not a ``Linear`` and whose ``out_proj`` is never *called*, so no forward hook
would see them): a local block's rule then sees every one of its weight layers, each token being
one sample of the rule (docs/local-rules.md, "Transformers").

The position embedding is a fixed buffer and the pooling is a mean (no class token), as in "Better
plain ViT baselines" (Beyer et al., 2022): the stem then holds no parameter that a local rule could
not update. :class:`Attention` also serves the torchvision adapter (distlocal/models/tv_vit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel

# The vit_tiny shape (issue 22): patch 4 on 32x32 gives 64 tokens. vit_mini: width 96, depth 6.
PATCH, WIDTH, DEPTH, HEADS, MLP_RATIO = 4, 192, 9, 3, 4


class Attention(nn.Module):
    """Multi-head self-attention from two Linears: ``qkv`` (``width -> 3*width``) and ``proj``.

    ``qkv``'s output rows are ``[q; k; v]``, each split into heads in order, which is the layout of
    ``nn.MultiheadAttention.in_proj_weight``: its weights copy over unchanged.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding, ``(gh*gw, width)``: a quarter of the channels per
    (axis, sin/cos), frequencies ``1/10000^(i/(width/4))``."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {width}")
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    ys = ys.reshape(-1, 1).float() * omega
    xs = xs.reshape(-1, 1).float() * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)


class PatchStem(nn.Module):
    """Patches -> tokens: a ``patch x patch`` stride-``patch`` conv, flattened, plus the position buffer."""

    def __init__(self, in_channels: int, width: int, patch: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(grid, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TokenHead(nn.Module):
    """The classifier stage: final LayerNorm, mean over the tokens, Linear."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x).mean(dim=1))


def patch_grid(label: str, hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """The token grid of an ``hw`` image cut into ``patch``-sized squares; one error line otherwise."""
    if hw[0] % patch or hw[1] % patch:
        raise ConfigError(
            f"model '{label}' cuts images into {patch}x{patch} patches, which do not tile inputs of "
            f"{hw[0]}x{hw[1]}; use an image size that {patch} divides (e.g. data.image_size)"
        )
    return hw[0] // patch, hw[1] // patch


def _init(model: nn.Module) -> None:
    """ViT init: xavier-uniform Linears with zero bias, the patch conv like a Linear on a flattened patch."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


def _vit(
    label: str, in_shape: tuple[int, int, int], num_classes: int, width: int, depth: int, heads: int
) -> StagedModel:
    """Patch ``PATCH``, MLP ratio ``MLP_RATIO``, mean pooling: 1 (stem) + ``depth`` + 1 stages."""
    grid = patch_grid(label, (in_shape[1], in_shape[2]), PATCH)
    stages: list[nn.Module] = [PatchStem(in_shape[0], width, PATCH, grid)]
    stages += [Block(width, heads, MLP_RATIO) for _ in range(depth)]
    stages.append(TokenHead(width, num_classes))
    names = ["stem", *(f"block{i + 1}" for i in range(depth)), "classifier"]
    model = StagedModel(stages, names)
    _init(model)
    # A zero head starts every class at the same logit (loss ln C), as torchvision's ViT does:
    # a random head on unit-variance LayerNorm features starts far above it and SGD can diverge.
    nn.init.zeros_(stages[-1].fc.weight)
    return model


def vit_tiny(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """Patch 4, width 192, depth 9, 3 heads, MLP ratio 4, mean pooling: 11 stages (4.0M parameters)."""
    return _vit("vit_tiny", in_shape, num_classes, WIDTH, DEPTH, HEADS)


def vit_mini(in_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    """``vit_tiny`` at width 96 and depth 6 (8 stages, 0.7M parameters, ~6x fewer FLOPs): the
    Fashion-MNIST recipe that fits the 2-core machine (docs/results.md)."""
    return _vit("vit_mini", in_shape, num_classes, 96, 6, HEADS)
