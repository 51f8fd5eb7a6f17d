"""Print pytest-benchmark JSON files as one table: a row per case, the median time of each provider side by
side, fastddpm's speed-up against eager and torch.compile, its GB/s and (on a GPU) its fraction of a
device-to-device copy.

    python tools/bench_table.py build/bench.json [more.json ...]

Several files (e.g. the steps of tools/device_check.sh) are merged into one table; the header names the first.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

PROVIDERS = ("eager", "compile", "fastddpm")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def param(value) -> str:
    """A parameter as the case's name shows it: a shape as 128x3x32x32, a (device, shape) pair as
    cuda-128x3x32x32."""
    if not isinstance(value, (list, tuple)):
        return str(value)
    if all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return "-".join(param(v) for v in value)


def host_cost(providers: dict) -> str:
    """The per-call host cost of eager and fastddpm (GPU cases), in µs."""
    costs = [providers.get(p, {}).get("extra_info", {}).get("per-call host (s)")
             for p in ("eager", "fastddpm")]
    return ("—" if all(c is None for c in costs)
            else ", ".join("—" if c is None else f"{c * 1e6:.0f}" for c in costs))


def table(data: dict) -> str:
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        params = bench.get("params") or {}
        provider = params.get("provider")
        if provider not in PROVIDERS:
            continue
        others = "-".join(param(v) for k, v in params.items() if k != "provider")
        case = bench["name"].split("[")[0].removeprefix("test_") + (f"[{others}]" if others else "")
        rows[case][provider] = bench
    lines = ["| case | eager | torch.compile | fastddpm | × eager | × compile | fastddpm GB/s | of copy | "
             "host µs/call (eager, fastddpm) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case in sorted(rows):
        median = {p: rows[case][p]["stats"]["median"] if p in rows[case] else None for p in PROVIDERS}
        fast = rows[case].get("fastddpm", {})
        extra = fast.get("extra_info", {})
        speedup = {p: (f"{median[p] / median['fastddpm']:.2f}" if median[p] and median["fastddpm"] else "—")
                   for p in ("eager", "compile")}
        gbps = (extra.get("bytes", 0) / median["fastddpm"] / 1e9 if median["fastddpm"] and extra.get("bytes")
                else None)
        frac = extra.get("fraction of copy")
        lines.append(f"| {case} | {fmt_time(median['eager'])} | {fmt_time(median['compile'])} | "
                     f"{fmt_time(median['fastddpm'])} | {speedup['eager']} | {speedup['compile']} | "
                     f"{'—' if gbps is None else f'{gbps:.1f}'} | {'—' if frac is None else f'{frac:.0%}'} | "
                     f"{host_cost(rows[case])} |")
    machine = data.get("machine_info", {})
    header = (f"{data.get('datetime', '')} — "
              f"{machine.get('cpu', {}).get('brand_raw', machine.get('processor', ''))}")
    return header + "\n\n" + "\n".join(lines)


def merged(paths: list[str]) -> dict:
    data: dict = {}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if not data:
            data = part
        else:
            data["benchmarks"] = data["benchmarks"] + part["benchmarks"]
    return data


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(merged(sys.argv[1:])))
