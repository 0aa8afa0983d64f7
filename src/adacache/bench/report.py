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


def _speedup(row: Row) -> str:
    """``2.91x [2.85–2.97]``: the median paired ratio and its interquartile range; ``⚠`` in
    front when the timing run did not settle."""
    if row.speedup is None:
        return "—"
    text = f"{row.speedup:.2f}x"
    if row.speedup_low is not None and row.speedup_high is not None:
        text += f" [{row.speedup_low:.2f}–{row.speedup_high:.2f}]"
    return f"⚠ {text}" if row.speed_unreliable else text


def _by_reason(rows: Sequence[Row]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for r in rows:
        if r.speed_unreliable:
            found.setdefault(r.speed_unreliable, []).append(r.name)
    return found


def _unreliable_banner(rows: Sequence[Row]) -> list[str]:
    timed = [r for r in rows if r.speedup is not None and r.family != "full"]
    out = []
    for reason, names in _by_reason(rows).items():
        which = "Speed columns" if len(names) == len(timed) else "Speed of " + ", ".join(names)
        out.append(f"\n⚠ **{which} unreliable**: {reason}.")
    return out


def unreliable_speed(*tracks: Sequence[Row]) -> list[str]:
    """One line per timing run and reason its numbers did not settle, naming the rows."""
    lines = []
    for rows in tracks:
        for run in sorted({(r.guidance, r.note if not r.guidance else None) for r in rows}, key=str):
            members = [r for r in rows if (r.guidance, r.note if not r.guidance else None) == run]
            where = f"CFG {run[0]}" if run[0] else (run[1] or "")
            for reason, names in _by_reason(members).items():
                lines.append(f"{where}: {', '.join(names)}: {reason}" if where else f"{', '.join(names)}: {reason}")
    return lines


def quality_table(rows: Sequence[Row]) -> str:
    """One Markdown table per guidance scale; speedups with the interquartile range of their
    paired ratios, marked when the timing did not settle."""
    out = []
    for guidance in sorted({r.guidance for r in rows}, reverse=True):
        out.append(f"\n**CFG {guidance}**\n")
        out += _unreliable_banner([r for r in rows if r.guidance == guidance])
        out.append("| variant | speedup | PSNR dB | SSIM | feat. dist. | class acc. | FD-digits | hit rate | FLOPs skipped | achieved / FLOP bound | cache MiB | peak MiB (CUDA) | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.guidance != guidance:
                continue
            out.append(
                f"| {r.name} | {_speedup(r) if r.family != 'full' else _fmt(r.speedup) + 'x'} | {_fmt(r.psnr)} | {_fmt(r.ssim, 4)} | {_fmt(r.perceptual, 3)} | "
                f"{_fmt(r.accuracy, 1, True)} | {_fmt(r.fd_digits)} | {_fmt(r.hit_rate, 1, True)} | {_fmt(r.flops_skipped, 1, True)} | "
                f"{_fmt(r.achieved_over_bound)} | {_fmt(r.cache_mib, 3)} | {_fmt(r.peak_mib, 1)} | {r.note or ''} |"
            )
    return "\n".join(out)


def speed_table(rows: Sequence[Row]) -> str:
    out = [*_unreliable_banner(rows), "| model | variant | s / generation | ms / step | speedup | hit rate | FLOP bound | achieved / bound |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.note} | {r.name} | {_fmt(r.seconds, 3)} | {_fmt(r.extra.get('ms_per_step'), 1)} | "
            f"{_speedup(r) if r.family != 'full' else _fmt(r.speedup) + 'x'} | "
            f"{_fmt(r.hit_rate, 1, True)} | {_fmt(r.flop_bound)}x | {_fmt(r.achieved_over_bound)} |"
        )
    return "\n".join(out)


def overhead_table(rows: Sequence[Row]) -> str:
    """Per-step cost of caching machinery that skips nothing, relative to the bare model."""
    out = [*_unreliable_banner(rows), "| model | variant | ms / step | overhead vs bare model |", "|---|---|---|---|"]
    for r in rows:
        ratio = r.extra.get("overhead")
        mark = "⚠ " if r.speed_unreliable else ""
        out.append(f"| {r.note} | {r.name} | {_fmt(r.extra.get('ms_per_step'), 1)} | {mark}{_fmt(ratio, 3)}x |" if ratio else f"| {r.note} | {r.name} | — | {'1.000x' if r.family == 'full' else '—'} |")
    return "\n".join(out)


def matched_table(rows: Sequence[Row], targets: Sequence[float] = MATCHED_SPEEDUPS) -> str:
    """For each family and target speedup, the best PSNR among configurations at least that fast."""
    out = []
    for guidance in sorted({r.guidance for r in rows}, reverse=True):
        families = sorted({r.family for r in rows if r.guidance == guidance and r.family not in ("full", "control")})
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
                mark = "⚠ " if best is not None and best.speed_unreliable else ""
                cells.append("—" if best is None else f"{mark}{best.psnr:.1f}{fd} ({best.name}, {best.speedup:.2f}x)")
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
    families = sorted({r.family for r in rows if r.family not in ("full", "control")})
    colors = plt.get_cmap("tab20")
    for ax, guidance in zip(axes[0], scales):
        for index, family in enumerate(families):
            pts = sorted(
                (r.speedup, r.psnr, r.speedup_low if r.speedup_low is not None else r.speedup,
                 r.speedup_high if r.speedup_high is not None else r.speedup) for r in rows
                if r.guidance == guidance and r.family == family and r.speedup and r.psnr is not None and math.isfinite(r.psnr)
            )
            if pts:
                ours = family.startswith("adacache")  # adacache solid with dots, the anchors dashed with crosses
                # Horizontal error bars: the interquartile range of the paired speed ratios.
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            xerr=[[max(0.0, p[0] - p[2]) for p in pts], [max(0.0, p[3] - p[0]) for p in pts]],
                            marker="o" if ours else "x", linestyle="-" if ours else "--", capsize=2,
                            color=colors(index % 20), label=family)
        if any(r.speed_unreliable for r in rows if r.guidance == guidance):
            ax.text(0.01, 0.01, "⚠ speed unreliable: the timing did not settle", transform=ax.transAxes, fontsize=8, color="red")
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
