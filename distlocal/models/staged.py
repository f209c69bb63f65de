"""The stage abstraction: a model is an ordered list of stages, the unit the boundary moves by."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StagedModel(nn.Module):
    """A CNN cut into ordered stages; ``forward`` runs them in order.

    ``boundary = k`` means stages ``[0, k)`` are local. The last stage is the classifier and
    is never local. Parameters live in ``self.stages`` only, so each parameter belongs to
    exactly one stage.
    """

    def __init__(self, stages: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
        super().__init__()
        if len(stages) < 2:
            raise ValueError("a StagedModel needs at least one feature stage and a classifier")
        self.stages = nn.ModuleList(stages)
        self.stage_names = list(names) if names is not None else [f"stage{i}" for i in range(len(stages))]
        if len(self.stage_names) != len(self.stages):
            raise ValueError("one name per stage")

    @property
    def num_stages(self) -> int:
        """Number of stages, the classifier included."""
        return len(self.stages)

    def forward_range(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run stages ``[start, stop)`` on ``x``."""
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_range(x, 0, len(self.stages))
