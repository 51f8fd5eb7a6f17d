"""fastddpm's UNet ↔ diffusers' ``UNet2DModel`` of the DDPM family (google/ddpm-cifar10-32, ddpm-celebahq-256,
ddpm-church-256, ddpm-bedroom-256).

Both are the network of the paper's TensorFlow code, layer for layer; only the names differ (and diffusers
keeps the attention's 1×1 convolutions as ``nn.Linear``). A config is converted field by field: every
``UNet2DModel`` argument either maps onto a ``UNet`` argument or must hold the one value the DDPM network has,
and a config that differs gets a ``ValueError`` naming the field. Reading a saved ``UNet2DModel`` folder needs
only safetensors (or torch for ``.bin`` files); building a ``UNet2DModel`` (``to_diffusers``) needs diffusers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastddpm.nn.unet import GROUP_NORM_EPS, UNet

UNET2D_CLASS = "UNet2DModel"
UNET2D_CONFIG_NAME = "config.json"
UNET2D_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel's constructor defaults (diffusers 0.42), for the fields a saved config may leave out.
UNET2D_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)  # fmt: skip

# The value each field must hold for the DDPM network (the sinusoidal embedding of the DDPM code is
# [sin, cos] with frequencies exp(−i·log(10000)/(half − 1)): flip_sin_to_cos=False, freq_shift=1; TF's 'SAME'
# padding of the strided convolution: downsample_padding=0).
_REQUIRED = dict(
    center_input_sample=False, time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
    mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_padding=0, downsample_type="conv",
    upsample_type="conv", norm_eps=GROUP_NORM_EPS, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None,
)  # fmt: skip
_ACTIVATIONS = ("silu", "swish")  # diffusers' names of SiLU
_DOWN, _ATTN_DOWN, _UP, _ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

# fastddpm name → diffusers name of the layers inside a residual block and an attention block.
_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
              "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# The attention names of diffusers' early checkpoints (the released DDPM weights), read as diffusers reads
# them.
_OLD_ATTN_NAMES = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"UNet2DModel config {field}={value!r}: {why}")


def unet_config_from_diffusers(config) -> dict:
    """The :class:`UNet` arguments of a ``UNet2DModel`` config (a dict, e.g. ``model.config`` or a saved
    ``config.json``); a ``ValueError`` names the first field the DDPM network cannot represent."""
    config = dict(config)
    name = config.get("_class_name", UNET2D_CLASS)
    if name != UNET2D_CLASS:
        raise _bad("_class_name", name, f"only {UNET2D_CLASS} converts to fastddpm's UNet")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, value in _REQUIRED.items():
        if c[field] != value:
            raise _bad(field, c[field], f"fastddpm's UNet (the DDPM network) has {field}={value!r}")
    if c["act_fn"] not in _ACTIVATIONS:
        raise _bad("act_fn", c["act_fn"], "fastddpm's UNet uses SiLU ('silu')")
    boc = [int(ch) for ch in c["block_out_channels"]]
    if not boc or boc[0] < 1 or any(ch % boc[0] for ch in boc):
        raise _bad("block_out_channels", c["block_out_channels"], "every entry must be a multiple of the "
                   "first (fastddpm's UNet has model_channels × channel_mult)")
    if c["time_embedding_dim"] not in (None, 4 * boc[0]):
        raise _bad("time_embedding_dim", c["time_embedding_dim"],
                   f"fastddpm's UNet has 4 × block_out_channels[0] = {4 * boc[0]}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, types, allowed in (("down_block_types", down, (_DOWN, _ATTN_DOWN)),
                                  ("up_block_types", up, (_UP, _ATTN_UP))):
        if len(types) != len(boc):
            raise _bad(field, types, f"needs one entry per block_out_channels entry ({len(boc)})")
        if any(t not in allowed for t in types):
            raise _bad(field, types, f"fastddpm's UNet has only {' and '.join(allowed)}")
    attn_levels = [level for level, t in enumerate(down) if t == _ATTN_DOWN]
    if [level for level, t in enumerate(reversed(up)) if t == _ATTN_UP] != attn_levels:
        raise _bad("up_block_types", up, f"attention must sit at the resolutions of down_block_types {down} "
                   f"(fastddpm's UNet mirrors them)")
    head_dim = c["attention_head_dim"]
    if head_dim is not None and any(boc[level] != head_dim for level in [*attn_levels, len(boc) - 1]):
        raise _bad("attention_head_dim", head_dim, "fastddpm's UNet has single-head attention: use None (or "
                   "the channel count of every attention block, middle block included)")
    groups = c["norm_num_groups"]
    if c["attn_norm_num_groups"] not in (None, groups):
        raise _bad("attn_norm_num_groups", c["attn_norm_num_groups"],
                   f"fastddpm's UNet has norm_num_groups={groups} in attention too (None)")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _bad("sample_size", size, "fastddpm's UNet needs square images")
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _bad("sample_size", size,
                   "fastddpm's UNet needs the image size (it places attention by resolution)")
    if size % 2 ** (len(boc) - 1):
        raise _bad("sample_size", size, f"must be divisible by 2^(levels − 1) = {2 ** (len(boc) - 1)}")
    if c["layers_per_block"] < 1:
        raise _bad("layers_per_block", c["layers_per_block"], "must be >= 1")
    return dict(
        in_channels=int(c["in_channels"]), model_channels=boc[0], channel_mult=[ch // boc[0] for ch in boc],
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=[size // 2**level for level in attn_levels], dropout=float(c["dropout"]),
        image_size=size, out_channels=int(c["out_channels"]), num_groups=int(groups),
    )  # fmt: skip


def diffusers_config_from_unet(unet: UNet) -> dict:
    """The ``UNet2DModel`` arguments of a :class:`UNet` (the DDPM configuration of diffusers' released
    models)."""
    c = unet.config
    if c["channel_mult"][0] != 1:
        raise ValueError(f"UNet channel_mult={c['channel_mult']}: UNet2DModel's first level has conv_in's "
                         f"channels, so channel_mult[0] must be 1")
    levels = range(len(c["channel_mult"]))
    attn = [c["image_size"] // 2**level in c["attn_resolutions"] for level in levels]
    return dict(
        sample_size=c["image_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
        center_input_sample=False, time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
        down_block_types=[_ATTN_DOWN if a else _DOWN for a in attn],
        up_block_types=[_ATTN_UP if a else _UP for a in reversed(attn)],
        block_out_channels=[c["model_channels"] * m for m in c["channel_mult"]],
        layers_per_block=c["num_res_blocks"], mid_block_scale_factor=1, downsample_padding=0,
        dropout=c["dropout"], act_fn="silu", attention_head_dim=None, norm_num_groups=c["num_groups"],
        norm_eps=GROUP_NORM_EPS,
    )  # fmt: skip


def diffusers_key(key: str, attn_names: dict = _ATTN_NAMES) -> str:
    """The ``UNet2DModel`` state_dict key of a :class:`UNet` state_dict key (``attn_names``: the attention
    layers' names, current or early)."""
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if head == "temb":  # Sequential(Linear, SiLU, Linear)
        return f"time_embedding.linear_{1 if rest[0] == '0' else 2}.{rest[1]}"
    if head in ("conv_in", "conv_out"):
        return key
    if head == "norm_out":
        return "conv_norm_out." + ".".join(rest)
    if head in ("mid_res1", "mid_res2"):
        return f"mid_block.resnets.{0 if head == 'mid_res1' else 1}.{_RES_NAMES[rest[0]]}.{rest[1]}"
    if head == "mid_attn":
        return f"mid_block.attentions.0.{attn_names[rest[0]]}.{rest[1]}"
    if head in ("down", "up"):
        level, kind = rest[0], rest[1]
        block = f"{head}_blocks.{level}"
        if kind == "resample":  # Level.resample.conv
            return f"{block}.{'downsamplers' if head == 'down' else 'upsamplers'}.0.conv.{rest[-1]}"
        index, layer, param = rest[2], rest[3], rest[4]
        if kind == "res":
            return f"{block}.resnets.{index}.{_RES_NAMES[layer]}.{param}"
        if kind == "attn":
            return f"{block}.attentions.{index}.{attn_names[layer]}.{param}"
    raise KeyError(f"UNet state_dict key {key!r} has no UNet2DModel counterpart")


def state_dict_from_diffusers(unet: UNet, state: dict) -> dict:
    """A ``UNet2DModel`` state dict (current or early attention names) as ``unet``'s state dict; a
    ``ValueError`` names a missing, surplus or misshapen tensor."""
    ours = unet.state_dict()
    state = dict(state)
    out = {}
    for key, like in ours.items():
        theirs = diffusers_key(key)
        if theirs not in state and diffusers_key(key, _OLD_ATTN_NAMES) in state:
            theirs = diffusers_key(key, _OLD_ATTN_NAMES)
        if theirs not in state:
            raise ValueError(f"the UNet2DModel weights lack {theirs!r} (for fastddpm's {key!r})")
        value = state.pop(theirs)
        if value.numel() != like.numel() or value.shape[:2] != like.shape[:2]:
            raise ValueError(f"UNet2DModel weight {theirs!r} has shape {list(value.shape)}; "
                             f"fastddpm's {key!r} needs {list(like.shape)}")
        out[key] = value.reshape(like.shape)  # nn.Linear [C, C] ↔ 1×1 nn.Conv2d [C, C, 1, 1] in attention
    if state:
        raise ValueError(f"the UNet2DModel weights hold tensors fastddpm's UNet has no place for: "
                         f"{sorted(state)[:5]}")
    return out


def state_dict_to_diffusers(unet: UNet, shapes: dict) -> dict:
    """``unet``'s state dict under ``UNet2DModel`` keys, reshaped to ``shapes`` (key → torch.Size)."""
    out = {}
    for key, value in unet.state_dict().items():
        theirs = diffusers_key(key)
        out[theirs] = value.reshape(shapes[theirs])
    return out


def _floating_dtype(state: dict) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def from_config_and_state(config, state: dict) -> UNet:
    """A :class:`UNet` holding the weights of a ``UNet2DModel`` given by its config and state dict."""
    unet = UNet(**unet_config_from_diffusers(config)).to(_floating_dtype(state))
    unet.load_state_dict(state_dict_from_diffusers(unet, state), strict=True)
    return unet


def read_unet2d_folder(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(config, state dict) of a folder written by ``UNet2DModel.save_pretrained``."""
    folder = Path(folder)
    config_path = folder / UNET2D_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no UNet2DModel at {folder}: {UNET2D_CONFIG_NAME} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("_class_name") != UNET2D_CLASS:
        got = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {got!r}, not a {UNET2D_CLASS}")
    weights = next((folder / n for n in UNET2D_WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no UNet2DModel weights in {folder}: "
                                f"expected {' or '.join(UNET2D_WEIGHTS_NAMES)}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise several types for a damaged file
        raise ValueError(f"{weights} is corrupted or not a weights file: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights} does not hold a state dict of tensors")
    return config, state


def from_diffusers(model_or_folder) -> UNet:
    """:meth:`UNet.from_diffusers`: a ``UNet2DModel`` (object, or a folder saved by it) as a :class:`UNet` on
    the model's device and in its train/eval mode (a folder: on the CPU, in eval mode)."""
    # A folder loads in eval mode, as diffusers' from_pretrained loads it.
    if isinstance(model_or_folder, (str, os.PathLike)):
        return from_config_and_state(*read_unet2d_folder(model_or_folder)).eval()
    config = getattr(model_or_folder, "config", None)
    if not isinstance(model_or_folder, torch.nn.Module) or config is None:
        raise TypeError(f"from_diffusers takes a diffusers UNet2DModel or the folder it was saved to, got "
                        f"{type(model_or_folder).__name__}")
    config = {"_class_name": type(model_or_folder).__name__, **config}
    unet = from_config_and_state(config, model_or_folder.state_dict())
    return unet.to(next(model_or_folder.parameters()).device).train(model_or_folder.training)


def to_diffusers(unet: UNet):
    """:meth:`UNet.to_diffusers`: a diffusers ``UNet2DModel`` with ``unet``'s weights (same dtype and
    device)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("UNet.to_diffusers needs diffusers (pip install diffusers)") from None
    param = next(unet.parameters())
    model = UNet2DModel(**diffusers_config_from_unet(unet))
    if param.dtype != torch.float32:
        model = model.to(param.dtype)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(state_dict_to_diffusers(unet, shapes), strict=True)
    return model.to(param.device).train(unet.training)



class PipelineUNet(torch.nn.Module):
    """fastddpm's :class:`UNet` behind ``UNet2DModel``'s interface, so that diffusers' pipelines
    (``DDPMPipeline``, ``DDIMPipeline``) run it: ``config`` (the ``UNet2DModel`` config), ``dtype``,
    ``device``, and ``forward(sample, timestep, return_dict=True)`` returning an output with ``.sample``. Its
    state dict is the UNet's, under ``unet.``. Build it with :meth:`UNet.for_diffusers_pipeline`."""

    def __init__(self, unet: UNet):
        super().__init__()
        from fastddpm.schedulers import FrozenDict

        if not isinstance(unet, UNet):
            raise TypeError(f"PipelineUNet wraps a fastddpm.UNet, got {type(unet).__name__}")
        self.unet = unet
        self.config = FrozenDict({"_class_name": UNET2D_CLASS, **diffusers_config_from_unet(unet)})

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if class_labels is not None:
            raise ValueError("fastddpm's UNet is unconditional: class_labels must be None")
        out = self.unet(sample, timestep)
        return UNet2DOutput(sample=out) if return_dict else (out,)
