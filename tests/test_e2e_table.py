"""benchmarks/e2e_ratios.py --table: issue 18's table from the end-to-end benchmark files, as
tools/device_check.sh prints it (without torch)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "e2e_ratios.py")


def training(provider, median):
    return {"name": f"test_training_step[cuda-cifar10-fp32-{provider}]", "stats": {"median": median},
            "params": {"device": "cuda", "net_name": "cifar10", "amp": "fp32", "provider": provider}}


def test_table_has_every_provider_and_the_fast_paths_speed_ups(tmp_path):
    medians = {"eager": 64.5e-3, "compile": 50e-3, "diffusers": 75e-3, "diffusers-compile": 59.1e-3,
               "fastddpm": 63.3e-3, "fast-path": 19.7e-3}
    other = {"name": "test_q_sample[cuda-eager]", "stats": {"median": 1.0}, "params": {"provider": "eager"}}
    sampling = {"name": "test_sampling_loop[cuda-cifar10-1-fast-path]", "stats": {"median": 10e-3},
                "params": {"device": "cuda", "net_name": "cifar10", "batch": 1, "provider": "fast-path"}}
    path = tmp_path / "bench.json"
    benchmarks = [training(p, m) for p, m in medians.items()] + [sampling, other]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    out = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "--table", str(path)],
                         capture_output=True, text=True, check=True)
    assert ("| cuda | cifar10 | training step, fp32 | 64.50 ms | 50.00 ms | 75.00 ms | 59.10 ms | 63.30 ms | "
            "19.70 ms | 3.27× | 3.00× |") in out.stdout
    assert "| cuda | cifar10 | DDIM sampling, batch 1, per step | — | — | — | — | — | 1.00 ms | — | — |" \
        in out.stdout
    assert "q_sample" not in out.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")]
    assert imported and "torch" not in imported and "fastddpm" not in imported
    path.write_text(json.dumps({"benchmarks": [other]}))
    out = subprocess.run([sys.executable, SCRIPT, "--table", str(path)], capture_output=True, text=True,
                         check=True)
    assert out.stdout == ""
