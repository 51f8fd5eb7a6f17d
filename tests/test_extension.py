"""The C++ extension fastddpm._C: that it is built, and its CPU q_sample against a float64 reference."""

import os
import sys
import warnings
import zlib

import pytest
import torch

from fastddpm import _extension

T = 1000
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# B = 1 and 3 with 1-D to 5-D data; (3, 8, 33, 35) spans several 4096-element chunks per sample.
SHAPES = [(1,), (3,), (1, 7), (3, 5, 7), (1, 4, 6, 5), (3, 2, 3, 5, 7), (5, 3, 17, 9), (3, 8, 33, 35)]


@pytest.fixture(scope="module")
def q_sample():
    """The C++ op with ε given: x_t (its second output, the ε it draws when asked, is empty here)."""
    assert _extension.load() is not None, "fastddpm._C is not built: `pip install -e . --no-build-isolation`"

    def given(x_start, t, sqrt_ac, sqrt_1mac, noise):
        x_t, drawn = torch.ops.fastddpm.q_sample(x_start, t, sqrt_ac, sqrt_1mac, noise, None, 0, False)
        assert drawn.numel() == 0
        return x_t

    return given


def tables(dtype=torch.float32):
    """sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) of the paper's linear schedule (β from 1e-4 to 0.02), built in float64."""
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    return alphas_cumprod.sqrt().to(dtype), (1 - alphas_cumprod).sqrt().to(dtype)


def reference(x, t, sqrt_ac, sqrt_1mac, noise):
    """DDPM eq. 4 in float64, written out: gather both tables by t, broadcast over each sample."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a, s = sqrt_ac.double()[t].reshape(shape), sqrt_1mac.double()[t].reshape(shape)
    return a * x.double() + s * noise.double()


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_t(batch, gen):
    """Random timesteps with the boundaries 0 and T−1 in them, and repeats when the batch allows."""
    t = torch.randint(0, T, (batch,), generator=gen)
    t[0] = 0 if batch % 2 else T - 1
    if batch > 1:
        t[-1] = T - 1 - t[0]
    if batch > 3:
        t[1] = t[2]
    return t


def pytorch_err(x, t, sqrt_ac, sqrt_1mac, noise, ref):
    """Error of the same math done in plain PyTorch at x's dtype: the bar for fp16/bf16."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    out = sqrt_ac[t].to(x.dtype).reshape(shape) * x + sqrt_1mac[t].to(x.dtype).reshape(shape) * noise
    return rel_err(out, ref)


def check_against_reference(q_sample, x, t, sqrt_ac, sqrt_1mac, noise):
    out = q_sample(x, t, sqrt_ac, sqrt_1mac, noise)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    ref = reference(x, t, sqrt_ac, sqrt_1mac, noise)
    err = rel_err(out, ref)
    if x.dtype == torch.float64:
        assert err <= 1e-12
    elif x.dtype == torch.float32:
        assert err <= 1e-5
    else:
        assert err <= 2 * pytorch_err(x, t, sqrt_ac, sqrt_1mac, noise, ref)
    return out


# ----------------------------------------------------------------------------- the build
def test_cpu_extension_is_built():
    assert _extension.cpu_built()
    import fastddpm._C as C

    assert isinstance(C.with_cuda, int) and isinstance(C.cuda_archs, str)
    assert _extension.cuda_built() == bool(C.with_cuda)
    assert _extension.cuda_archs() == [a for a in C.cuda_archs.split(";") if a]
    if torch.version.cuda is None:  # a CPU torch cannot build the CUDA sources: they must have been skipped
        assert not _extension.cuda_built() and _extension.cuda_archs() == []
    assert hasattr(torch.ops.fastddpm, "q_sample")


def test_load_warns_once_and_falls_back_when_missing(monkeypatch):
    monkeypatch.delattr(sys.modules["fastddpm"], "_C", raising=False)
    monkeypatch.setitem(sys.modules, "fastddpm._C", None)  # makes `import fastddpm._C` raise ImportError
    monkeypatch.setattr(_extension, "_ext", _extension._UNLOADED)  # forget the loaded module
    try:
        hint = "not built.*fall back.*pip install -e . --no-build-isolation"
        with pytest.warns(RuntimeWarning, match=hint):
            assert _extension.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _extension.load() is None and not _extension.cpu_built() and _extension.cuda_archs() == []
    finally:
        monkeypatch.undo()
    assert _extension.load() is not None


# ----------------------------------------------------------------------------- q_sample against the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_q_sample_matches_reference(q_sample, shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}".encode()))
    x = torch.randn(shape, generator=gen).to(dtype)
    noise = torch.randn(shape, generator=gen).to(dtype)
    check_against_reference(q_sample, x, random_t(shape[0], gen), *tables(), noise)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_table_dtypes(q_sample, dtype, table_dtype):
    gen = torch.Generator().manual_seed(1)
    x, noise = (torch.randn(6, 3, 4, 5, generator=gen).to(dtype) for _ in range(2))
    t = torch.tensor([0, T - 1, 500, 500, 0, T - 1])  # repeats and both boundaries
    check_against_reference(q_sample, x, t, *tables(table_dtype), noise)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_channels_last(q_sample, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, 9, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    noise = torch.randn_like(x)  # keeps x's layout: the fast path
    t = random_t(3, gen)
    out = check_against_reference(q_sample, x, t, *tables(), noise)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride() == x.stride()
    # noise in another layout takes the copying path; the output still follows x_start
    out = check_against_reference(q_sample, x, t, *tables(), noise.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride() == x.stride()
    out = check_against_reference(q_sample, x.contiguous(), t, *tables(), noise)
    assert out.is_contiguous()


def test_q_sample_channels_last_3d(q_sample):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen).to(memory_format=torch.channels_last_3d)
    out = check_against_reference(q_sample, x, random_t(2, gen), *tables(), torch.randn_like(x))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_non_contiguous_views(q_sample, dtype):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 8, 6, 5, generator=gen).to(dtype)
    noise_base = torch.randn(3, 8, 6, 5, generator=gen).to(dtype)
    t = random_t(3, gen)
    for view in (lambda a: a[:, ::2], lambda a: a.transpose(1, 3), lambda a: a[..., 1:]):
        x, noise = view(base), view(noise_base)
        assert not x.is_contiguous()
        check_against_reference(q_sample, x, t, *tables(), noise)
    # batch not outermost in memory, and a batch of one with an odd batch stride
    x = base.transpose(0, 1).contiguous().transpose(0, 1)
    check_against_reference(q_sample, x, t, *tables(), noise_base)
    x1 = base[:1].as_strided((1, 8, 6, 5), (1, 30, 5, 1))
    check_against_reference(q_sample, x1, t[:1], *tables(), noise_base[:1])
    # t need not be contiguous either
    t_view = torch.stack([t, t], 1)[:, 0]
    assert not t_view.is_contiguous()
    check_against_reference(q_sample, base, t_view, *tables(), noise_base)


def test_q_sample_empty_batch(q_sample):
    x = torch.empty(0, 3, 4)
    out = q_sample(x, torch.empty(0, dtype=torch.long), *tables(), torch.empty(0, 3, 4))
    assert out.shape == (0, 3, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_independent_of_thread_count(q_sample, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 64, 64, generator=gen).to(dtype)  # 32 tasks of 4096 elements: both threads work
    noise = torch.randn(8, 4, 64, 64, generator=gen).to(dtype)
    t = random_t(8, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = q_sample(x, t, *tables(), noise)
        torch.set_num_threads(2)
        two = q_sample(x, t, *tables(), noise)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    check_against_reference(q_sample, x, t, *tables(), noise)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.isolated
def test_q_sample_bad_inputs(q_sample):
    sqrt_ac, sqrt_1mac = tables()
    x, noise, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 5, T - 1])

    def call(x=x, t=t, sqrt_ac=sqrt_ac, sqrt_1mac=sqrt_1mac, noise=noise):
        return q_sample(x, t, sqrt_ac, sqrt_1mac, noise)

    with pytest.raises(RuntimeError, match=r"t\[2\] = 1000 is out of range \[0, 1000\)"):
        call(t=torch.tensor([0, 5, T]))
    with pytest.raises(RuntimeError, match=r"t\[1\] = -1 is out of range"):
        call(t=torch.tensor([0, -1, 5]))
    with pytest.raises(RuntimeError, match="t must be int64"):
        call(t=t.int())
    with pytest.raises(RuntimeError, match="t must be int64"):
        call(t=t.float())
    with pytest.raises(RuntimeError, match=r"t must be 1-D of size x_start.size\(0\) = 3"):
        call(t=t[:2])
    with pytest.raises(RuntimeError, match=r"t must be 1-D"):
        call(t=t[:, None])
    with pytest.raises(RuntimeError, match="noise shape .* must match x_start shape"):
        call(noise=torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="noise dtype .* must match x_start dtype"):
        call(noise=noise.double())
    with pytest.raises(RuntimeError, match="x_start must be a floating tensor"):
        call(x=torch.ones(3, 4, dtype=torch.int64), noise=torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        call(x=torch.tensor(1.0), noise=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="must have the same length"):
        call(sqrt_1mac=sqrt_1mac[:-1])
    with pytest.raises(RuntimeError, match="sqrt_alphas_cumprod must be float32 or float64"):
        call(sqrt_ac=sqrt_ac.half())
    with pytest.raises(RuntimeError, match=r"sqrt_one_minus_alphas_cumprod must be 1-D"):
        call(sqrt_1mac=sqrt_1mac[None])


def test_permuted_dense_layout_matches_fake_and_reference():
    # Dense but batch not outermost: the output is contiguous (the kernels stream each sample as one block of
    # memory), as the fake impl says.
    torch.manual_seed(3)
    from fastddpm.schedules import NoiseSchedule, get_beta_schedule

    sched = NoiseSchedule(get_beta_schedule("linear", 50))
    x = torch.randn(6, 3, 5, 4).transpose(0, 1)  # [3, 6, 5, 4], dense, batch stride 20 < numel/B
    n = torch.randn(3, 6, 5, 4)
    t = torch.tensor([0, 49, 7])
    args = (x, t, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod, n, None, 0, False)
    torch.library.opcheck(torch.ops.fastddpm.q_sample.default, args)
    out = torch.ops.fastddpm.q_sample(*args)[0]
    assert out.is_contiguous()
    ab = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    ref = ab.sqrt() * x.double() + (1 - ab).sqrt() * n.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided"])
def test_every_output_element_is_written(layout):
    # Poisoned allocation: with fill_uninitialized_memory every at::empty is NaN-filled, so an element the
    # kernel leaves unwritten shows up as NaN.
    from fastddpm.schedules import NoiseSchedule, get_beta_schedule

    sched = NoiseSchedule(get_beta_schedule("cosine", 30))
    base = torch.randn(5, 4, 7, 6)
    x = {"contiguous": base, "channels_last": base.to(memory_format=torch.channels_last),
         "permuted": base.transpose(0, 1).contiguous().transpose(0, 1),
         "strided": torch.randn(5, 8, 7, 6)[:, ::2]}[layout]
    n = torch.randn(x.shape)
    t = torch.randint(0, 30, (x.shape[0],))
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(8)).all()  # the poisoning is on
        tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
        out = torch.ops.fastddpm.q_sample(x, t, *tables, n, None, 0, False)[0]
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]
    assert torch.isfinite(out).all()


def test_build_digest_names_this_build_and_keys_the_compile_cache():
    """build_digest: a stable 16-hex-digit hash of the built extension, found without loading it; the tests'
    torch.compile cache folder is keyed by it (tests/conftest.py)."""
    digest = _extension.build_digest()
    assert digest == _extension.build_digest()
    if _extension.cpu_built():
        assert len(digest) == 16 and int(digest, 16) >= 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"fastddpm-inductor-{digest}")
