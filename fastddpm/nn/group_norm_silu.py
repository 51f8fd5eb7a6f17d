"""GroupNormSiLU: nn.GroupNorm followed by SiLU, as one module (and, later, one fused op)."""

from __future__ import annotations

import torch
from torch import nn

from fastddpm import functional


class GroupNormSiLU(nn.GroupNorm):
    """SiLU(GroupNorm(x)). Same constructor, parameters and state_dict keys as ``nn.GroupNorm``,
    so a GroupNorm's weights load into it unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
