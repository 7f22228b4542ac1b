"""Learning curves of ICL and IWL per run or sweep point, in the style of the
paper's figures: two panels, training step against accuracy, one line per
point (mean over seeds, shaded +- one standard deviation), the swept values
in the legend."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from . import runs, sweep
from .errors import EiclError
from .eval_modes import ICL_MODE
from .report import Row


def _label(row: Row, keys: list[str]) -> str:
    """The legend entry: the swept values (just the value when one key is swept)."""
    shown = [k for k in keys if k in row.values and k != "label"]
    if len(keys) == 1 and shown:
        text = sweep.format_value(row.values[shown[0]])
    else:
        parts = [f"{sweep.short_names(keys)[k]}={sweep.format_value(row.values[k])}" for k in shown]
        if "label" in row.values:
            parts = [str(row.values["label"])]  # a zip label names the whole tuple
        elif not row.source and ("label" in keys or len(parts) > 2):
            # A lone run beside a zip sweep's labels, or among several keys:
            # its folder's name, and what sets it apart where that is short.
            parts = [row.label] + (parts if len(parts) <= 2 else [])
        text = ", ".join(parts) if parts else row.label
    if row.source and not keys:
        text = f"{row.source}: {text}"
    if row.synthetic:
        text += " (synthetic)"
    return text


def _order(rows: list[Row], keys: list[str]) -> list[Row]:
    """Sort by the first swept key when it is numeric, so colours run in order."""
    if len(keys) >= 1 and all(isinstance(r.values.get(keys[0]), (int, float))
                              and not isinstance(r.values.get(keys[0]), bool) for r in rows):
        return sorted(rows, key=lambda r: r.values[keys[0]])
    return rows


def _steps_tick(x: float, _pos: int) -> str:
    """Training steps as 0, 500, 2k, 1.5M: readable at any scale."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def check_png_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise EiclError(f"--plot {path}: the plot is written as PNG; give a file name ending in .png")
    if not path.parent.exists():
        raise EiclError(f"--plot {path}: folder {path.parent} does not exist")
    return path


def plot_curves(rows: list[Row], keys: list[str], path: Path,
                metric: str = "accuracy_query", title: str = "") -> Path:
    """Write a PNG with an ICL panel and an IWL panel; returns its path.

    Solid lines are `metric`; the ICL panel also draws the other accuracy
    (strict or closed) dashed in the same colour, since a model that only
    learned to emit one of the context's labels scores well above 0 strict
    but stays at chance closed."""
    path = check_png_path(path)
    rows = [r for r in rows if r.runs]
    if not any(r.curve(w, metric)[0] for r in rows for w in ("ICL", "IWL")):
        raise EiclError("nothing to plot: none of the runs has an evaluation yet")
    rows = _order(rows, keys)

    fig = Figure(figsize=(11, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    cmap = matplotlib.colormaps["viridis"]
    n = max(1, len(rows))
    strict = metric == "accuracy_query"
    other = "accuracy_closed" if strict else "accuracy_query"
    names = {"accuracy_query": "strict (all labels)", "accuracy_closed": "closed (ways labels)"}
    few_points = max(len(r.curve(w, metric)[0]) for r in rows for w in ("ICL", "IWL")) < 16
    iwl_modes = sorted({r.iwl_mode for r in rows if r.iwl_mode})
    panels = (("ICL", f"In-context learning: {ICL_MODE}"),
              ("IWL", "In-weights learning: " + (" / ".join(iwl_modes) or "no_support")))
    for ax, (which, heading) in zip(axes, panels):
        for i, row in enumerate(rows):
            colour = cmap(0.9 * i / max(1, n - 1)) if n > 1 else "tab:blue"
            steps, means, stds = row.curve(which, metric)
            if not steps:
                continue
            ax.plot(steps, means, color=colour, lw=1.8, marker="o" if few_points else None,
                    ms=3, label=_label(row, keys))
            band = [(s, m, d) for s, m, d in zip(steps, means, stds) if d is not None]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band],
                                [b[1] + b[2] for b in band], color=colour, alpha=0.2, lw=0)
            if which == "ICL":
                o_steps, o_means, _ = row.curve(which, other)
                ax.plot(o_steps, o_means, color=colour, lw=1.1, ls="--", alpha=0.8)
        if which == "ICL":
            ways = {r.runs[0].config.sequences.ways for r in rows}
            ceilings = {r.ceiling for r in rows}
            if len(ceilings) == 1 and None not in ceilings:
                ax.axhline(next(iter(ceilings)), color="grey", ls=":", lw=1)
            if len(ways) == 1:
                ax.axhline(1.0 / next(iter(ways)), color="grey", ls="-.", lw=0.8)
        ax.set_title(heading, fontsize=11)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_tick))
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    shown = [k for k in keys if k != "label"]
    legend_title = sweep.short_names(keys)[shown[0]] if len(shown) == 1 and "label" not in keys else None
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.80, 0.88),
               fontsize=9, title=legend_title, frameon=False)
    styles = [Line2D([], [], color="black", lw=1.8, label=names[metric]),
              Line2D([], [], color="black", lw=1.1, ls="--", label=names[other] + ", ICL"),
              Line2D([], [], color="grey", lw=0.8, ls="-.", label="ICL chance (1/ways)"),
              Line2D([], [], color="grey", lw=1, ls=":", label="ICL ceiling")]
    fig.legend(handles=styles, loc="lower left", bbox_to_anchor=(0.80, 0.12), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.07, right=0.79, bottom=0.13, top=0.86 if title else 0.9, wspace=0.08)
    buf = io.BytesIO()
    # A long legend entry (a run named beside a sweep's labels) runs past the
    # right edge of the fixed layout: grow the image to hold it.
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)
    runs.atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- probe

_HEATMAPS = (("label_match", "label attention: query → labels of its label", "viridis"),
             ("image_match", "match attention: query → images of its label", "viridis"),
             ("previous_token", "previous-token: label → image before it", "viridis"),
             ("ablated", "Δ ICL strict with the head ablated", "RdBu"))


def plot_probe(results: list, heads: list[tuple[int, int]], path: Path, title: str = "") -> Path:
    """Heatmaps (layer x head) of the last checkpoint's scores and ablation
    effect; with several checkpoints, a second row: the `heads`' label
    attention and ablation effect over training, beside ICL and IWL."""
    import numpy as np
    path = check_png_path(path)
    last = results[-1]
    modes = last.modes
    icl = next((m for m in modes if modes[m]["role"] == "ICL"), None) or next(iter(modes))
    iwl = next((m for m in modes if modes[m]["role"] == "IWL"), None)
    dynamics = len(results) > 1
    fig = Figure(figsize=(15, 7.6 if dynamics else 3.8), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.subplots(2 if dynamics else 1, 4, squeeze=False)
    m = modes[icl]
    for ax, (key, heading, cmap) in zip(grid[0], _HEATMAPS):
        if key == "ablated":
            base = m["accuracy"]["accuracy_query"]
            values = np.array([[a["accuracy_query"] - base for a in row]
                               for row in m["head_ablated"]])
            bound = max(0.05, float(np.abs(values).max()))
            limits = {"vmin": -bound, "vmax": bound}
        elif m["scores"][key] is None:
            bound = 0.0
            ax.set_axis_off()
            ax.set_title(heading + " (none)", fontsize=9)
            continue
        else:
            values = np.array(m["scores"][key])
            bound = max(0.05, float(values.max()))
            limits = {"vmin": 0.0, "vmax": bound}
        image = ax.imshow(values, cmap=cmap, aspect="auto", **limits)
        layers, n_heads = values.shape
        for i in range(layers):
            for j in range(n_heads):
                v = values[i, j]
                dark = abs(v) > 0.6 * bound if key == "ablated" else v < 0.6 * limits["vmax"]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(layers))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{heading}\nstep {last.step}, {icl}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if dynamics:
        steps = [max(r.step, 1) for r in results]
        colours = matplotlib.colormaps["tab10"]
        ax_att, ax_abl, ax_acc, ax_prev = grid[1]
        for c, (layer, head) in enumerate(heads):
            label = f"layer {layer} head {head}"
            att = [r.modes[icl]["scores"]["label_match"] for r in results]
            ax_att.plot(steps, [a[layer][head] if a else np.nan for a in att],
                        color=colours(c), label=label)
            prev = [r.modes[icl]["scores"]["previous_token"] for r in results]
            ax_prev.plot(steps, [p[layer][head] if p else np.nan for p in prev],
                         color=colours(c), label=label)
            ax_abl.plot(steps, [r.modes[icl]["head_ablated"][layer][head]["accuracy_query"]
                                - r.modes[icl]["accuracy"]["accuracy_query"] for r in results],
                        color=colours(c), label=label)
        for k, style in (("accuracy_query", "-"), ("accuracy_closed", "--")):
            ax_acc.plot(steps, [r.modes[icl]["accuracy"][k] for r in results], color="tab:blue",
                        ls=style, label=f"ICL {'strict' if style == '-' else 'closed'}")
        if iwl:
            ax_acc.plot(steps, [r.modes[iwl]["accuracy"]["accuracy_query"] for r in results],
                        color="tab:orange", label=f"IWL ({iwl})")
        for ax, heading in ((ax_att, "top heads: label attention"),
                            (ax_abl, "top heads: Δ ICL strict when ablated"),
                            (ax_acc, "accuracy (unablated)"),
                            (ax_prev, "top heads: previous-token score")):
            ax.set_xscale("log")
            ax.set_xlabel("training step")
            ax.set_title(heading, fontsize=9)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_formatter(FuncFormatter(_steps_tick))
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    runs.atomic_write_bytes(path, buffer.getvalue())
    return path
