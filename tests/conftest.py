import os
import tempfile

import pytest
import torch  # (imports no triton)

from fastddpm import _extension

from .isolation import register as _register_isolation

os.environ.setdefault("FASTDDPM_NO_PROGRESS", "1")
# torch.compile's cache in a folder of this build (fastddpm._extension.build_digest says why)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fastddpm-inductor-{_extension.build_digest()}"))
# Without a GPU, the Triton kernels run on CPU tensors through the interpreter (set before triton is
# imported). With one, they compile for it: the interpreter would replace the compiler for CUDA tensors too,
# and the tests of Triton on CPU tensors skip (CI runs them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_triton_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set on machines without a GPU; "
           "CI runs this)")


def _round_bf16_to_nearest_in_the_interpreter():
    """Triton's interpreter converts float32 → bfloat16 by truncating the mantissa, while compiled kernels
    round to nearest even (the default ``fp_downcast_rounding``). Make the interpreter round as the GPU does,
    so that the bf16 tests hold the kernels to the GPU's accuracy instead of the simulator's."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode is None:
            values = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32).reshape(-1).copy())
            rounded = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return rounded.reshape(np.shape(data))
        return truncating(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_in_the_interpreter()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (DESIGN.md's tolerance measure)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


class TinyNet(torch.nn.Module):
    """A small ε-network for tests: conv layers with a learned timestep embedding."""

    def __init__(self, channels=3, timesteps=1000, hidden=8):
        super().__init__()
        self.channels = channels
        self.embed = torch.nn.Embedding(timesteps, hidden)
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.conv_in(x) + self.embed(t)[:, :, None, None])
        return self.conv_out(h)


@pytest.fixture
def poisoned():
    """Every new tensor (torch.empty*, and at::empty* in the C++ kernels; CPU and CUDA) is filled with NaN
    while the test runs, so an output element a kernel leaves unwritten shows. Deterministic mode is on (that
    is what fills), in warn-only form: an op without a deterministic kernel warns instead of failing the
    test."""
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(8)).all()  # the poison is on
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.utils.deterministic.fill_uninitialized_memory = old[2]


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet


def pytest_configure(config):
    _register_isolation(config)


def pytest_collection_modifyitems(config, items):
    """GPU-only tests (marked ``cuda``) skip on machines without one; tools/device_check.sh runs them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU-only: needs a CUDA device (run tools/device_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
