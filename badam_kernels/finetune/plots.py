"""The loss plot of a run: loss per step, a smoothed curve, the eval loss where evaluated, and a vertical
line at each block switch."""
from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Dict, List


def read_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(values: List[float], weight: float = 0.9) -> List[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss(records: List[Dict], path: str, title: str = "badam-finetune") -> str:
    """Write the loss curve of ``records`` (dicts with ``step``, ``loss``, ``active_block``, and
    ``eval_loss`` at the evaluated steps) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    steps = [r["step"] for r in points]
    losses = [r["loss"] for r in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    if len(losses) > 1:
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="loss (smoothed)")
    evals = [(r["step"], r["eval_loss"]) for r in records
             if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], color="tab:orange", linewidth=1.5, marker="o",
                markersize=4, label="eval loss")
    switches = [(cur["step"], cur["active_block"]) for prev, cur in zip(records, records[1:])
                if cur["active_block"] != prev["active_block"]]
    for i, (step, _) in enumerate(switches):
        ax.axvline(step - 0.5, color="tab:gray", linestyle="--", linewidth=0.8,
                   label="block switch" if i == 0 else None)
    if records and len(switches) <= 24:  # name the block of each segment while they stay legible
        starts = [(records[0]["step"], records[0]["active_block"])] + switches
        for step, block in starts:
            ax.annotate(f"{block}", xy=(step, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", va="top", fontsize=7, color="tab:gray")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _fit_title(ax, title + ("  (numbers: active block)" if switches else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.94), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fit_title(ax, title: str, fontsize: float) -> None:
    """Set ``title``, wrapped into lines that fit the figure: a long model path would be cut at both sides."""
    renderer = ax.figure.canvas.get_renderer()
    room = 0.9 * ax.figure.bbox.width  # the title centres on the axes, which sit right of the figure's centre
    chars = len(title)
    while True:
        width = ax.set_title("\n".join(textwrap.wrap(title, chars)), fontsize=fontsize).get_window_extent(renderer).width
        if width <= room or chars <= 20:
            return
        chars = max(20, min(chars - 1, int(chars * room / width)))  # glyph widths vary: measure again
