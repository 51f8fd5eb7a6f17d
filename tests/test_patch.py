"""fastddpm.patch: GroupNorm → SiLU pairs of existing models fused into GroupNormSiLU, in place."""

import copy

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm.nn import GroupNormSiLU
from fastddpm.nn.patch import SiLULinear
from tests.conftest import rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402


def tiny_unet(groups, attention=False):
    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, norm_num_groups=groups, down_block_types=down,
                                 up_block_types=up).eval()


def randomize_norms(model):
    """Non-trivial affine parameters, so that a lost weight would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@pytest.mark.parametrize("groups,attention", [(8, True), (16, False)])
def test_unet2d_model(groups, attention):
    unet = tiny_unet(groups, attention)
    randomize_norms(unet)
    reference = copy.deepcopy(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    params = {name: p for name, p in unet.named_parameters()}
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    attention_norms = [m.group_norm for m in unet.modules() if getattr(m, "group_norm", None) is not None]

    fused = fastddpm.patch(unet)

    assert fused == 2 * len(resnets) + 1  # norm1, norm2 of each ResnetBlock2D, and conv_norm_out
    for block in resnets:
        assert type(block.norm1) is GroupNormSiLU and type(block.norm2) is GroupNormSiLU
        assert type(block.nonlinearity) is nn.Identity and type(block.time_emb_proj) is SiLULinear
    assert type(unet.conv_norm_out) is GroupNormSiLU and type(unet.conv_act) is nn.Identity
    assert all(type(n) is nn.GroupNorm for n in attention_norms)  # not followed by SiLU: left alone
    assert type(unet.time_embedding.act) is nn.SiLU  # no norm before it: left alone
    assert list(unet.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert all(p is params[name] for name, p in unet.named_parameters())  # the very same Parameters

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert rel_err(unet(x, t).sample, reference(x, t).sample) < 1e-5
    assert fastddpm.patch(unet) == 0  # nothing left to fuse


def test_gradients_unchanged():
    unet = tiny_unet(8)
    randomize_norms(unet)
    reference = copy.deepcopy(unet)
    fastddpm.patch(unet)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 500])
    for model in (unet, reference):
        model(x, t).sample.square().mean().backward()
    scale = torch.cat([q.grad.flatten() for q in reference.parameters()]).norm()
    for (name, p), q in zip(unet.named_parameters(), reference.parameters()):
        # zero in exact arithmetic (attention's key bias): both are round-off
        if q.grad.norm() < 1e-6 * scale:
            assert p.grad.norm() < 1e-5 * scale, name
        else:
            assert rel_err(p.grad, q.grad) < 1e-4, name


def test_model_without_group_norm_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU())
    before = repr(model), {k: v.clone() for k, v in model.state_dict().items()}
    assert fastddpm.patch(model) == 0
    assert repr(model) == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError):
        fastddpm.patch("not a module")


def test_sequential_pairs_keep_indices():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.SiLU(inplace=True),
        nn.GroupNorm(2, 8), nn.ReLU(),  # another activation: not fused
        nn.Sequential(nn.GroupNorm(8, 8, affine=False), nn.SiLU()),  # nested, without affine parameters
    )
    randomize_norms(model)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert fastddpm.patch(model) == 3
    assert [type(m).__name__ for m in model[:8]] == ["Conv2d", "GroupNormSiLU", "Identity", "Conv2d",
                                                     "GroupNormSiLU", "Identity", "GroupNorm", "ReLU"]
    assert type(model[8][0]) is GroupNormSiLU and type(model[8][1]) is nn.Identity
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 5, 7)
    assert rel_err(model(x), reference(x)) < 1e-5


def test_only_plain_silu_and_unshared_norms():
    class MySiLU(nn.SiLU):
        pass

    shared = nn.GroupNorm(2, 8)
    model = nn.Sequential(nn.GroupNorm(2, 8), MySiLU(), shared, nn.SiLU(), nn.Sequential(shared, nn.SiLU()))
    assert fastddpm.patch(model) == 0
    assert type(shared) is nn.GroupNorm and type(model[0]) is nn.GroupNorm


class NestedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act, self.proj = nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.proj(self.act(self.norm(x)))


class StatementBlock(nn.Module):
    def __init__(self, use_norm=True):
        super().__init__()
        self.use_norm = use_norm
        self.norm, self.act, self.proj = nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)

    def forward(self, h):
        h = self.proj(h)
        if self.use_norm:
            h = self.norm(h)
            h = self.act(h)
        return h


class ScaleShiftBlock(nn.Module):
    """denoising-diffusion-pytorch's Block: a scale/shift between the norm and the activation."""

    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.GroupNorm(2, 8), nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(x)
        if scale_shift is not None:
            x = x * (scale_shift[0] + 1) + scale_shift[1]
        return self.act(x)


class NormUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.GroupNorm(2, 8), nn.SiLU()

    def forward(self, x):
        y = self.norm(x)
        return self.act(self.norm(x)) + y


class ActOnOtherInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act, self.conv = nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.norm(x)
        x = self.act(x)
        return self.act(self.conv(x))


@pytest.mark.parametrize("block,expected", [
    (NestedBlock, 1), (lambda: StatementBlock(True), 1), (lambda: StatementBlock(False), 0),
    (ScaleShiftBlock, 0), (NormUsedTwice, 0), (ActOnOtherInput, 0),
], ids=["nested", "statements", "branch-not-taken", "scale-shift", "norm-used-twice", "act-on-other-input"])
def test_attribute_pairs(block, expected):
    torch.manual_seed(0)
    model = nn.Sequential(block(), block())
    randomize_norms(model)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert fastddpm.patch(model) == 2 * expected
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 8, 4, 4)
    assert rel_err(model(x), reference(x)) < 1e-5
    if expected == 0:
        assert repr(model) == repr(reference)


@pytest.mark.parametrize("variant", ["scale_shift", "no_temb", "skip_time_act"])
def test_resnet_block_variants(variant):
    torch.manual_seed(0)
    kw = {"scale_shift": dict(temb_channels=16, time_embedding_norm="scale_shift"),
          "no_temb": dict(temb_channels=None),
          "skip_time_act": dict(temb_channels=16, skip_time_act=True)}[variant]
    block = ResnetBlock2D(in_channels=8, out_channels=16, groups=4, groups_out=8, **kw).eval()
    randomize_norms(block)
    reference = copy.deepcopy(block)
    fused = fastddpm.patch(block)
    if variant == "scale_shift":  # norm2 → scale/shift → SiLU: nothing can be fused in this block
        assert fused == 0 and type(block.nonlinearity) is nn.SiLU
    else:
        assert fused == 2 and type(block.nonlinearity) is nn.Identity
        if block.time_emb_proj is not None:
            assert type(block.time_emb_proj) is nn.Linear  # skip_time_act: temb is not activated
    x = torch.randn(2, 8, 6, 6)
    temb = None if kw["temb_channels"] is None else torch.randn(2, 16)
    with torch.no_grad():
        assert rel_err(block(x, temb), reference(x, temb)) < 1e-5
