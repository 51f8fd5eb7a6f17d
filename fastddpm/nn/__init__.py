"""Neural-network modules: the DDPM U-Net and its fused GroupNorm + SiLU."""

from fastddpm.nn.group_norm_silu import GroupNormSiLU
from fastddpm.nn.unet import UNet

__all__ = ["GroupNormSiLU", "UNet"]
