"""``tokenspout bench --plot``: latency distributions per concurrency, and the sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenspout.client.bench import SYNTHETIC_TITLE, LevelResult


def check_path(path: Path) -> None:
    """Refuse, before a run, a file name ``plot`` could not write as given: matplotlib takes
    the format from the suffix, raises for one it does not know, and adds ``.png`` to a
    name without one (``--plot out`` wrote ``out.png``)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.removeprefix(".").lower() not in formats:
        raise ValueError(
            f"{path.name} does not end in .png or another image format matplotlib writes "
            f"({', '.join(sorted(formats))})"
        )


def plot(levels: Sequence[LevelResult], path: Path, *, synthetic: bool = False) -> None:
    """Write a PNG: histograms of TTFT, ITL and E2EL (one colour per concurrency), and
    median TTFT and output tok/s against concurrency; a run against the synthetic engine
    says so across the top, as the table does (an image is quoted on its own)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    series = {
        "TTFT (ms)": lambda lv: [r.ttft for r in lv.results if r.success and r.ttft is not None],
        "ITL (ms)": lambda lv: [g for r in lv.results if r.success for g in r.itl],
        "E2EL (ms)": lambda lv: [r.e2el for r in lv.results if r.success and r.e2el is not None],
    }
    for ax, (title, values_of) in zip(axes.flat, series.items(), strict=False):
        for level in levels:
            values = [v * 1000.0 for v in values_of(level)]
            if values:
                ax.hist(values, bins=40, alpha=0.5, label=f"concurrency {level.concurrency}")
        ax.set_title(title)
        ax.set_ylabel("requests" if title != "ITL (ms)" else "gaps")
        ax.legend(fontsize="small")

    sweep = axes.flat[3]
    xs = [level.concurrency for level in levels]
    sweep.plot(xs, [lv.summary["output_throughput"] for lv in levels], "o-", color="tab:blue")
    sweep.set_xlabel("concurrency")
    sweep.set_ylabel("output tok/s", color="tab:blue")
    sweep.set_xscale("log", base=2)
    ttft = sweep.twinx()
    ttft.plot(xs, [lv.summary["median_ttft_ms"] for lv in levels], "s--", color="tab:red")
    ttft.set_ylabel("median TTFT (ms)", color="tab:red")
    sweep.set_title("concurrency sweep")
    if synthetic:
        fig.suptitle(SYNTHETIC_TITLE, color="tab:red", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
