"""Pictures of an adapter (``info --plot``) and of a comparison (``diff --plot``), as PNG files.

matplotlib is an optional extra (``pip install 'loratool[plot]'``), imported only here and only when a
plot is asked for; figures are drawn on matplotlib's Agg canvas (no display, no global pyplot state)
and written atomically. Panels:

* ``info``: ‖ΔW‖F per block (√Σ‖ΔWᵢ‖F² over its modules), the mean effective rank per block (blocks of
  :mod:`loratool.ops.blocks`: SD U-Net down / mid / up, DiT double / single blocks, LLM layers), and the
  singular values σ₁ ≥ σ₂ ≥ … of the largest modules by ‖ΔW‖F (computed from the factors, float64);
* ``diff``: cosine of ΔW per block, norm ratio ‖ΔW_B‖ / ‖ΔW_A‖ per block, subspace overlap per block
  (:mod:`loratool.ops.diff`).

Each function returns what it drew (:class:`PlotResult`: the axes' titles and the pixel size) so callers
and tests know the panels without decoding the image.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import UsageError

DPI = 80
TOP_MODULES = 6  # spectra drawn in the info figure
MISSING = "--plot needs matplotlib, an optional extra: pip install 'loratool[plot]'"


@dataclass
class PlotResult:
    path: Path
    panels: list[str]  # the axes' titles, top to bottom
    width: int  # pixels
    height: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "panels": self.panels, "width": self.width, "height": self.height}


def _figure(rows: int, width_in: float = 9.0, row_in: float = 2.6):
    """A matplotlib Figure on an Agg canvas; a :class:`UsageError` when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(MISSING) from None
    fig = Figure(figsize=(width_in, row_in * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def check_plot_path(out: str | os.PathLike, inputs=(), force: bool = False) -> Path:
    """The PNG output path, refused like every output (exists without --force, is an input, not ``.png``)."""
    from loratool.io.atomic import check_output

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: --plot writes a PNG; name it *.png")
    return check_output(out, inputs=inputs, force=force, folder=False)


def _save(fig, out: Path) -> PlotResult:
    from loratool.io.atomic import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(out, buf.getvalue())
    width, height = (int(round(x)) for x in fig.get_size_inches() * DPI)
    return PlotResult(out, [ax.get_title() for ax in fig.axes], width, height)


def _bars(ax, labels: list[str], values: list[float], title: str, ylabel: str, color: str) -> None:
    ax.bar(range(len(values)), values, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 12 else 0, ha="right"
                  if len(labels) > 12 else "center", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_info(report, adapter, out: str | os.PathLike, *, top: int = TOP_MODULES) -> PlotResult:
    """ΔW norm and effective rank per block, and the spectra of the ``top`` largest modules, of an
    :class:`~loratool.ops.inspect.InfoReport` read with stats and its adapter."""
    from loratool.ops.inspect import singular_values

    blocks = report.block_stats or []
    fig, axes = _figure(3)
    name = Path(report.path).name
    labels = [b["block"] for b in blocks]
    _bars(axes[0], labels, [b["norm"] for b in blocks], f"{name}: ‖ΔW‖F per block", "‖ΔW‖F", "#3b6ea8")
    _bars(axes[1], labels, [b["effective_rank"] for b in blocks], "mean effective rank per block", "eff. rank",
          "#c06c2b")
    largest = sorted((m for m in report.modules if m.stats is not None), key=lambda m: -m.stats.norm)[:top]
    ax = axes[2]
    for info in largest:
        s, _ = singular_values(adapter[info.component, info.path])
        s = s[s > 0]
        if s.numel():
            ax.semilogy(range(1, s.numel() + 1), s.tolist(), marker="o", markersize=3,
                        label=f"{info.component}:{info.path}"[-48:])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"singular values of the {len(largest)} largest modules")
    ax.set_xlabel("i")
    ax.set_ylabel("σᵢ")
    ax.grid(alpha=0.3)
    if largest:
        ax.legend(fontsize=7, loc="upper right")
    return _save(fig, Path(out))


def plot_diff(report, out: str | os.PathLike) -> PlotResult:
    """Cosine, norm ratio and subspace overlap per block of a :class:`~loratool.ops.diff.DiffReport`."""
    fig, axes = _figure(3)
    labels = [b.block for b in report.blocks]
    _bars(axes[0], labels, [b.cosine for b in report.blocks], f"cosine of ΔW per block ({report.verdict})",
          "cosine", "#3b6ea8")
    axes[0].set_ylim(-1.05, 1.05)
    _bars(axes[1], labels, [b.norm_ratio for b in report.blocks], "norm ratio ‖ΔW_B‖ / ‖ΔW_A‖ per block",
          "ratio", "#c06c2b")
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    _bars(axes[2], labels, [b.overlap for b in report.blocks], "subspace overlap per block (mean cos² of the "
          "principal angles)", "overlap", "#4c9a52")
    axes[2].set_ylim(0, 1.05)
    return _save(fig, Path(out))
