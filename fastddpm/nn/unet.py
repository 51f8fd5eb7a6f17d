"""The U-Net of DDPM (Ho, Jain, Abbeel 2020, Appendix B): ε_θ(x_t, t).

A PixelCNN++-style U-Net (Salimans et al. 2017) on a Wide ResNet backbone: num_res_blocks residual
blocks per resolution, GroupNorm instead of weight normalisation, self-attention at 16×16, and the
timestep t added to every residual block through a sinusoidal (Transformer) embedding. Layer for layer
the network of the paper's TensorFlow code (diffusion_tf/models/unet.py); the CIFAR-10 preset has its
35.7M parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastddpm.nn.group_norm_silu import GroupNormSiLU

# tf.contrib.layers.group_norm's epsilon, used by the DDPM code (the paper's U-Net, not nn.GroupNorm's 1e-5).
GROUP_NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (fp32), as in the DDPM code:
    emb[:, i] = sin(t·ω_i), emb[:, half + i] = cos(t·ω_i), ω_i = exp(−i·log(10000)/(half − 1))."""
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(i * (-math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _init(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """The DDPM code's default_init: variance_scaling(scale, 'fan_avg', 'uniform') weights (Xavier-uniform
    for scale 1), zero biases; scale 0 (its init_scale=0.) zero-initialises the layer."""
    if scale == 0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


def _conv(in_ch: int, out_ch: int, kernel_size: int, scale: float = 1.0, **kwargs) -> nn.Conv2d:
    padding = kwargs.pop("padding", kernel_size // 2)
    return _init(nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, **kwargs), scale)


class ResBlock(nn.Module):
    """Wide-ResNet block with the timestep added between its two convolutions (DDPM's resnet_block)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = GroupNormSiLU(num_groups, in_ch, eps=GROUP_NORM_EPS)
        self.conv1 = _conv(in_ch, out_ch, 3)
        self.temb_proj = _init(nn.Linear(temb_ch, out_ch))
        self.norm2 = GroupNormSiLU(num_groups, out_ch, eps=GROUP_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_ch, out_ch, 3, scale=0.0)
        # 1×1 "network-in-network" projection when the channel count changes.
        self.shortcut = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(silu_temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection (DDPM's attn_block)."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, ch, eps=GROUP_NORM_EPS)
        self.q, self.k, self.v = (_conv(ch, ch, 1) for _ in range(3))
        self.proj_out = _conv(ch, ch, 1, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H·W, C]
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3×3 convolution with stride 2. TF's 'SAME' padding pads only bottom/right for even sizes."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _conv(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _conv(ch, ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention (or identity),
    then a resample (None at the end of the path)."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """ε_θ(x_t, t) of DDPM. ``forward(x, t)``: x [B, in_channels, H, W], integer timesteps t [B]
    (or a python int / 0-d tensor for the whole batch) -> [B, out_channels, H, W]."""

    def __init__(
        self,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        dropout: float = 0.1,
        image_size: int = 32,
        out_channels: int | None = None,
        num_groups: int = 32,
    ):
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        if model_channels % num_groups != 0:
            raise ValueError(
                f"model_channels ({model_channels}) must be divisible by num_groups ({num_groups})"
            )
        if model_channels < 4 or model_channels % 2 != 0:
            raise ValueError(
                f"model_channels must be even and >= 4 (sin/cos embedding), got {model_channels}"
            )
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor != 0:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by 2^(len(channel_mult) - 1) = {factor}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.channels = in_channels, out_channels, in_channels
        self.image_size = image_size
        self.config = dict(
            in_channels=in_channels, model_channels=model_channels, channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
            image_size=image_size, out_channels=out_channels, num_groups=num_groups,
        )  # fmt: skip
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)

        ch, temb_ch = model_channels, 4 * model_channels

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, temb_ch, dropout, num_groups)

        def attn(o: int, resolution: int) -> nn.Module:
            return AttnBlock(o, num_groups) if resolution in attn_resolutions else nn.Identity()

        # Timestep embedding -> Dense -> SiLU -> Dense (temb_ch = 4·ch).
        self.temb = nn.Sequential(
            _init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch))
        )
        self.conv_in = _conv(in_channels, ch, 3)

        # Downsampling path; skip_chs records the channels of every activation kept for the skips.
        skip_chs, cur = [ch], ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            resolution, out = image_size // 2**level, ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res(cur, out))
                attns.append(attn(out, resolution))
                cur = out
                skip_chs.append(cur)
            last = level == len(channel_mult) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(cur)))
            if not last:
                skip_chs.append(cur)

        # Middle: res, attn, res at the lowest resolution.
        self.mid_res1 = res(cur, cur)
        self.mid_attn = AttnBlock(cur, num_groups)
        self.mid_res2 = res(cur, cur)

        # Upsampling path: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated.
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            resolution, out = image_size // 2**level, ch * channel_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(cur + skip_chs.pop(), out))
                attns.append(attn(out, resolution))
                cur = out
            self.up.append(Level(blocks, attns, Upsample(cur) if level != 0 else None))

        self.norm_out = GroupNormSiLU(num_groups, cur, eps=GROUP_NORM_EPS)
        self.conv_out = _conv(cur, out_channels, 3, scale=0.0)

    @classmethod
    def cifar10(cls, **overrides) -> "UNet":
        """The paper's CIFAR-10 model, 35.7M parameters: ch=128, mult (1, 2, 2, 2), attention at 16×16,
        dropout 0.1."""
        return cls(**{**dict(in_channels=3, image_size=32), **overrides})

    @classmethod
    def small(cls, in_channels: int = 1, image_size: int = 8, **overrides) -> "UNet":
        """A small U-Net for the CPU demo on 8×8 digits: 195k parameters, resolutions 8, 4, 2 with attention
        at 4×4; forward + backward at batch 128 is 1.9 GFLOP."""
        kwargs = dict(
            in_channels=in_channels, image_size=image_size, model_channels=16, channel_mult=(1, 1, 2),
            num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4,
        )  # fmt: skip
        return cls(**{**kwargs, **overrides})

    @classmethod
    def from_diffusers(cls, model_or_folder) -> "UNet":
        """A diffusers ``UNet2DModel`` of the DDPM family (the object, or a folder written by its
        ``save_pretrained``) as a UNet with the same weights, dtype and outputs. A config field the DDPM
        network cannot represent raises ``ValueError`` naming it. Reading a folder does not need diffusers."""
        from fastddpm.nn.diffusers_unet import from_diffusers

        return from_diffusers(model_or_folder)

    def to_diffusers(self):
        """This UNet as a diffusers ``UNet2DModel`` with the same weights (needs diffusers)."""
        from fastddpm.nn.diffusers_unet import to_diffusers

        return to_diffusers(self)

    def for_diffusers_pipeline(self):
        """This UNet (the same module, not a copy) behind diffusers' ``UNet2DModel`` interface, for diffusers'
        pipelines: ``DDPMPipeline(unet=unet.for_diffusers_pipeline(), scheduler=...)``."""
        from fastddpm.nn.diffusers_unet import PipelineUNet

        return PipelineUNet(self)

    def _check_inputs(self, x: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be a 4-D tensor [B, C, H, W], got {shape}")
        b, c, hgt, wid = x.shape
        if c != self.in_channels:
            raise ValueError(f"UNet: expected {self.in_channels} input channels, got {c}")
        factor = 2 ** (self.num_levels - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"UNet: H and W must be divisible by {factor} (2^(levels-1)), got {hgt}×{wid}")
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise TypeError(
                f"UNet: t must be an integer tensor of shape [B] or a python int, got {type(t).__name__}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"UNet: t must be integer timesteps (e.g. int64), got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"UNet: t must have shape [B] = [{b}] (or be a scalar), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._check_inputs(x, t)
        # Every ResBlock applies SiLU to temb before its dense layer: compute SiLU(temb) once here.
        emb = timestep_embedding(t, self.model_channels).to(x.dtype)
        silu_temb = F.silu(self.temb(emb))

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, silu_temb))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, silu_temb)), silu_temb)

        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), silu_temb))
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(self.norm_out(h))
