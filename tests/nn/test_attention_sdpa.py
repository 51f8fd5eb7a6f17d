"""The U-Net's attention blocks run F.scaled_dot_product_attention (fused kernels on GPUs: flash or
memory-efficient attention); checked against the manual attention of the DDPM code, softmax(q kᵀ / √C) v, in
fp32 and float64, with the DDPM state_dict layout unchanged."""
import copy
import math

import pytest
import torch

from fastddpm.nn.unet import AttnBlock, UNet


def manual_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The DDPM code's attn_block: explicit weights w = softmax(q·k / √C) over the H·W positions."""
    b, c, hgt, wid = x.shape
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, N]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (1 / math.sqrt(c)), dim=2)
    return x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hgt, wid))


def random_block(channels: int, groups: int) -> AttnBlock:
    torch.manual_seed(0)
    block = AttnBlock(channels, num_groups=groups)
    with torch.no_grad():  # proj_out is zero-initialised: give every weight a random part
        for p in block.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    return block


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("batch", "channels", "size"), [(2, 256, 16), (3, 16, 5), (1, 32, 4)])
def test_sdpa_matches_the_manual_attention_in_fp32(batch, channels, size):
    block = random_block(channels, 8 if channels % 8 == 0 else 4)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    ref = manual_attention(copy.deepcopy(block).double(), x.double())
    out = block(x)
    manual = manual_attention(block, x)
    assert rel(out, ref) <= 1e-5 and rel(manual, ref) <= 1e-5  # the residual keeps both close to x
    assert rel(out - x, ref - x.double()) <= 1e-4  # the attention branch alone: a reduction's tolerance
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gref,) = torch.autograd.grad(ref, x, grad.double())
    assert rel(gx, gref) <= 1e-4


def test_attention_state_dict_keys_are_the_ddpm_layout():
    block = AttnBlock(16, num_groups=4)
    assert list(block.state_dict()) == ["norm.weight", "norm.bias", "q.weight", "q.bias", "k.weight",
                                        "k.bias", "v.weight", "v.bias", "proj_out.weight", "proj_out.bias"]
    assert all(v.shape[:2] == (16, 16) for k, v in block.state_dict().items() if k.endswith("weight")
               and not k.startswith("norm"))
    cifar = UNet.cifar10()
    keys = [k for k in cifar.state_dict() if ".attn." in k or k.startswith("mid_attn.")]
    assert (len(keys) == 10 * (2 + 3 + 1) and "down.1.attn.0.q.weight" in keys
            and "mid_attn.proj_out.bias" in keys)


@pytest.mark.cuda
def test_sdpa_in_bf16_is_as_close_as_the_manual_attention():
    """Under bf16 autocast SDPA takes a fused kernel; its error against float64 is at most twice the manual
    attention's at the same dtype."""
    block = random_block(256, 32).cuda()
    x = torch.randn(4, 256, 16, 16, device="cuda")
    ref = manual_attention(copy.deepcopy(block).double(), x.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, manual = block(x), manual_attention(block, x)
    assert rel(out - x, ref - x.double()) <= 2 * rel(manual - x, ref - x.double())
