"""Write benchmark results: JSON of every figure, Markdown tables, a Pareto plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import Row

MATCHED_SPEEDUPS = (1.5, 2.0, 3.0, 4.0, 5.0)


def _fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}%}" if pct else f"{value:.{digits}f}"
    return str(value)


def quality_table(rows: Sequence[Row]) -> str:
    """One Markdown table per guidance scale."""
    out = []
    for guidance in sorted({r.guidance for r in rows}, reverse=True):
        out.append(f"\n**CFG {guidance}**\n")
        out.append("| variant | speedup | PSNR dB | SSIM | feat. dist. | class acc. | FD-digits | hit rate | FLOPs skipped | achieved / FLOP bound | cache MiB | peak MiB (CUDA) | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.guidance != guidance:
                continue
            out.append(
                f"| {r.name} | {_fmt(r.speedup)}x | {_fmt(r.psnr)} | {_fmt(r.ssim, 4)} | {_fmt(r.perceptual, 3)} | "
                f"{_fmt(r.accuracy, 1, True)} | {_fmt(r.fd_digits)} | {_fmt(r.hit_rate, 1, True)} | {_fmt(r.flops_skipped, 1, True)} | "
                f"{_fmt(r.achieved_over_bound)} | {_fmt(r.cache_mib, 3)} | {_fmt(r.peak_mib, 1)} | {r.note or ''} |"
            )
    return "\n".join(out)


def speed_table(rows: Sequence[Row]) -> str:
    out = ["| model | variant | s / generation | ms / step | speedup | hit rate | FLOP bound | achieved / bound |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.note} | {r.name} | {_fmt(r.seconds, 3)} | {_fmt(r.extra.get('ms_per_step'), 1)} | {_fmt(r.speedup)}x | "
            f"{_fmt(r.hit_rate, 1, True)} | {_fmt(r.flop_bound)}x | {_fmt(r.achieved_over_bound)} |"
        )
    return "\n".join(out)


def overhead_table(rows: Sequence[Row]) -> str:
    """Per-step cost of caching machinery that skips nothing, relative to the bare model."""
    out = ["| model | variant | ms / step | overhead vs bare model |", "|---|---|---|---|"]
    for r in rows:
        ratio = r.extra.get("overhead")
        out.append(f"| {r.note} | {r.name} | {_fmt(r.extra.get('ms_per_step'), 1)} | {_fmt(ratio, 3)}x |" if ratio else f"| {r.note} | {r.name} | — | {'1.000x' if r.family == 'full' else '—'} |")
    return "\n".join(out)


def matched_table(rows: Sequence[Row], targets: Sequence[float] = MATCHED_SPEEDUPS) -> str:
    """For each family and target speedup, the best PSNR among configurations at least that fast."""
    out = []
    for guidance in sorted({r.guidance for r in rows}, reverse=True):
        families = sorted({r.family for r in rows if r.guidance == guidance and r.family != "full"})
        out.append(f"\n**CFG {guidance}**: best PSNR (dB) of each family at speedup ≥ target, with its FD-digits (configuration and speedup in brackets)\n")
        out.append("| family | " + " | ".join(f"≥{t:g}x" for t in targets) + " |")
        out.append("|---|" + "---|" * len(targets))
        for family in families:
            cells = []
            for target in targets:
                best = max(
                    (r for r in rows if r.guidance == guidance and r.family == family and r.speedup and r.speedup >= target and r.psnr is not None),
                    key=lambda r: r.psnr,
                    default=None,
                )
                fd = "" if best is None or best.fd_digits is None else f", FD {best.fd_digits:.0f}"
                cells.append("—" if best is None else f"{best.psnr:.1f}{fd} ({best.name}, {best.speedup:.2f}x)")
            out.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def pareto_plot(rows: Sequence[Row], path: str | Path) -> Path | None:
    """Speedup against PSNR, one curve per family and guidance scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - bench extra not installed
        return None
    scales = sorted({r.guidance for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(scales), figsize=(6.5 * len(scales), 4.8), squeeze=False)
    families = sorted({r.family for r in rows if r.family != "full"})
    colors = plt.get_cmap("tab20")
    for ax, guidance in zip(axes[0], scales):
        for index, family in enumerate(families):
            pts = sorted(
                (r.speedup, r.psnr) for r in rows
                if r.guidance == guidance and r.family == family and r.speedup and r.psnr is not None and math.isfinite(r.psnr)
            )
            if pts:
                ours = family.startswith("adacache")  # adacache solid with dots, the anchors dashed with crosses
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if ours else "x",
                        linestyle="-" if ours else "--", color=colors(index % 20), label=family)
        ax.set_xlabel("wall-clock speedup vs full computation")
        ax.set_ylabel("PSNR vs full computation (dB)")
        ax.set_title(f"CFG {guidance}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(out_dir: str | Path, quality: Sequence[Row], speed: Sequence[Row], info: dict[str, Any], overhead: Sequence[Row] = ()) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``pareto.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps({"machine": info, "quality": [r.to_dict() for r in quality], "speed": [r.to_dict() for r in speed], "overhead": [r.to_dict() for r in overhead]}, indent=2, default=str))
    parts = [f"Measured with adacache bench; machine: {info.get('processor')}, {info.get('torch_threads')} torch threads, versions {info.get('versions')}."]
    if quality:
        parts += ["\n## Quality track (reference model)", quality_table(quality), "\n## At matched speedups", matched_table(quality)]
    if speed:
        parts += ["\n## Speed track (random weights)", speed_table(speed)]
    if overhead:
        parts += ["\n## Overhead with nothing skipped", overhead_table(overhead)]
    paths["markdown"].write_text("\n".join(parts) + "\n")
    if quality:
        plot = pareto_plot(quality, out / "pareto.png")
        if plot:
            paths["plot"] = plot
    return paths
