"""The contracts the reference, the Triton kernels and the C++ kernels share, written once.

Python and Triton import this module; C++ reads the same numbers from ``csrc/contracts.h``, which
``python tools/gen_contracts_header.py`` writes from this file (tests/test_contracts.py fails when the two
differ). This module imports nothing, so every layer may use it.
"""

# ---- objective: what the network predicts, and the code the kernels take for it
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")  # code = index: ε, x_0, v = √ᾱ·ε − √(1−ᾱ)·x_0
PRED_NOISE, PRED_X0, PRED_V = 0, 1, 2

# ---- reduction of the training loss over the batch
REDUCTIONS = ("none", "mean")  # code = index: per-sample [B], mean over the batch
REDUCTION_NONE, REDUCTION_MEAN = 0, 1

# ---- the reverse steps' stacked per-t table [REVERSE_TABLE_ROWS, T] (NoiseSchedule.reverse_table): row r at
# column t holds REVERSE_TABLE[r] at t. The DDIM step reads the first DDIM_TABLE_ROWS rows.
REVERSE_TABLE = (
    "sqrt_recip_alphas_cumprod",      # √(1/ᾱ_t)
    "sqrt_recipm1_alphas_cumprod",    # √(1/ᾱ_t − 1)
    "sqrt_alphas_cumprod",            # √ᾱ_t
    "sqrt_one_minus_alphas_cumprod",  # √(1 − ᾱ_t)
    "posterior_mean_coef1",           # μ̃_t's coefficient of x̂_0 (DDPM eq. 7)
    "posterior_mean_coef2",           # μ̃_t's coefficient of x_t
    "sigma",                          # σ_t of the ancestral step
)
(ROW_SQRT_RECIP_AC, ROW_SQRT_RECIPM1_AC, ROW_SQRT_AC, ROW_SQRT_1M_AC, ROW_POSTERIOR_COEF_X0,
 ROW_POSTERIOR_COEF_XT, ROW_SIGMA) = range(7)
REVERSE_TABLE_ROWS = len(REVERSE_TABLE)
DDIM_TABLE_ROWS = 4

# ---- the in-kernel noise stream: Philox 4×32-10 keyed by seed[0]. For a batch of B samples of N elements
# each, element i of sample b (i in memory order within the sample) takes lane i % PHILOX_LANES of the normals
# at counter  offset + b·⌈N/PHILOX_LANES⌉ + ⌊i/PHILOX_LANES⌋  (philox_counter). One call uses the counters
# [offset, offset + counters_per_call(B, N)); the next call advances offset by that much or takes a new seed.
PHILOX_LANES = 4


def counters_per_sample(per_sample: int) -> int:
    """⌈N / PHILOX_LANES⌉: the Philox counters one sample of N elements uses."""
    return (per_sample + PHILOX_LANES - 1) // PHILOX_LANES


def philox_counter(offset: int, sample: int, per_sample: int, element: int) -> int:
    """The Philox counter of element ``element`` (memory order) of sample ``sample``; its lane is
    element % PHILOX_LANES."""
    return offset + sample * counters_per_sample(per_sample) + element // PHILOX_LANES


def counters_per_call(batch: int, per_sample: int) -> int:
    """How far one call over [batch, per_sample] elements advances the Philox counter."""
    return batch * counters_per_sample(per_sample)


def objective_code(objective: str) -> int:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES.index(objective)


def reduction_code(reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return REDUCTIONS.index(reduction)
