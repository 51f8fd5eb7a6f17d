"""fastddpm/contracts.py: the C++ header is generated from it and current; the names agree with the code."""
import subprocess
import sys
from pathlib import Path

import pytest

from fastddpm import contracts

ROOT = Path(__file__).resolve().parent.parent


def test_header_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_contracts_header.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_codes_are_indices():
    assert [contracts.objective_code(o) for o in contracts.OBJECTIVES] == [
        contracts.PRED_NOISE, contracts.PRED_X0, contracts.PRED_V]
    assert [contracts.reduction_code(r) for r in contracts.REDUCTIONS] == [
        contracts.REDUCTION_NONE, contracts.REDUCTION_MEAN]
    assert contracts.REVERSE_TABLE[contracts.ROW_SIGMA] == "sigma"
    assert contracts.REVERSE_TABLE_ROWS == 7 and contracts.DDIM_TABLE_ROWS <= contracts.REVERSE_TABLE_ROWS


@pytest.mark.parametrize("bad, fn", [("eps", contracts.objective_code), ("sum", contracts.reduction_code)])
def test_unknown_names_raise(bad, fn):
    with pytest.raises(ValueError, match=repr(bad)):
        fn(bad)


@pytest.mark.parametrize("per_sample", [1, 3, 4, 5, 3072])
def test_philox_counters_tile_the_call(per_sample):
    """Every (sample, element) gets a distinct (counter, lane), and one call uses exactly
    counters_per_call."""
    batch, offset = 3, 11
    seen = {(contracts.philox_counter(offset, b, per_sample, i), i % contracts.PHILOX_LANES)
            for b in range(batch) for i in range(per_sample)}
    assert len(seen) == batch * per_sample
    counters = {c for c, _ in seen}
    assert min(counters) == offset
    assert max(counters) < offset + contracts.counters_per_call(batch, per_sample)
