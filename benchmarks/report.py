"""Turn a pytest-benchmark JSON file into the committed ratio tables (CSV + Markdown).

    python benchmarks/report.py RESULTS.json benchmarks/results/NAME

Every group (one shape) gets median / p20 / p80 per implementation, achieved TFLOP/s (cases that
state FLOPs) or GB/s (cases that state bytes), and on the fused row the time of every other
implementation over the fused one's (>1: fused is faster; for ``copy`` and ``read``, the fraction of
the copy / plain-read bandwidth reached). Rows carry the device, torch, triton and beyond-cls
versions of the run.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import sys
from pathlib import Path


def _percentile(data: list[float], q: float) -> float:
    return statistics.quantiles(data, n=100, method="inclusive")[int(q) - 1] if len(data) > 1 else data[0]


def _cpu_name(machine: dict) -> str:
    """The CPU model recorded by pytest-benchmark (py-cpuinfo's brand), else the platform's machine name."""
    return (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or platform.machine()


def rows_from(results: dict) -> list[dict]:
    import torch

    import beyond_cls

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    groups: dict[str, dict[str, dict]] = {}
    for bench in results["benchmarks"]:
        impl = bench["params"]["impl"]
        data = bench["stats"].get("data") or [bench["stats"]["median"]]
        groups.setdefault(bench["group"], {})[impl] = {
            "median_ms": statistics.median(data) * 1e3,
            "p20_ms": _percentile(data, 20) * 1e3,
            "p80_ms": _percentile(data, 80) * 1e3,
            "extra": bench["extra_info"],
        }
    rows = []
    for group, impls in groups.items():
        for impl, r in impls.items():
            extra = r["extra"]
            seconds = r["median_ms"] * 1e-3
            speedups = ""
            if impl == "fused":  # time of every other implementation over the fused one's
                speedups = " ".join(
                    f"{other}={impls[other]['median_ms'] / r['median_ms']:.3g}" for other in impls if other != "fused"
                )
                copy = impls.get("copy")
                if copy is not None and "bytes" in extra and "bytes" in copy["extra"]:  # bandwidth over the copy's
                    fraction = (extra["bytes"] / r["median_ms"]) / (copy["extra"]["bytes"] / copy["median_ms"])
                    speedups += f" bandwidth/copy={fraction:.0%}"
            rows.append({
                "group": group,
                "impl": impl,
                "shape": " ".join(["x".join(str(x) for x in extra.get("shape", []))] + [extra.get("pass", "")]).strip(),
                "dtype": extra.get("dtype", ""),
                "median_ms": round(r["median_ms"], 4),
                "p20_ms": round(r["p20_ms"], 4),
                "p80_ms": round(r["p80_ms"], 4),
                "tflops": round(extra["flops"] / seconds / 1e12, 3) if "flops" in extra else "",
                "gbps": round(extra["bytes"] / seconds / 1e9, 1) if "bytes" in extra else "",
                "others_over_fused": speedups,
                "device": extra.get("device", ""),
                "threads": extra.get("threads", ""),
                "torch": torch.__version__,
                "triton": triton_version,
                "beyond_cls": beyond_cls.__version__,
                "cpu": _cpu_name(results.get("machine_info", {})),
                "date": results.get("datetime", "")[:10],
            })
    return rows


def write(rows: list[dict], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first = rows[0]
    lines = [
        f"# {stem.name}",
        "",
        f"device: {first['device']} ({first['cpu']}, {first['threads']} threads) · torch {first['torch']} · "
        f"triton {first['triton']} · beyond-cls {first['beyond_cls']} · {first['date']}",
        "",
        "| shape | impl | median ms | p20 | p80 | TFLOP/s | GB/s | time of others / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} {r['dtype']} | {r['impl']} | {r['median_ms']} | {r['p20_ms']} | "
            f"{r['p80_ms']} | {r['tflops']} | {r['gbps']} | {r['others_over_fused']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = rows_from(json.loads(Path(argv[0]).read_text()))
    if not rows:
        print(f"{argv[0]} holds no benchmark results", file=sys.stderr)
        return 2
    write(rows, Path(argv[1]))
    print(Path(argv[1]).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
