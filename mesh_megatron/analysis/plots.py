"""PNG plots of a probe.json result (matplotlib's object API: no pyplot, no display needed).

    relative_update.png   bar chart, one bar per block application (+- std over sequences)
    cka.png               heatmap of RBF-CKA between every pair of states
    spectrum.png          normalised singular values of each state, log scale
    state_rms.png         RMS of each state along the loop (+- std over sequences)
    routers.png           MeSH only: mean write and read weight per step (rows) and slot (cols)

Each file is drawn to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from typing import Any

from matplotlib import cm
from matplotlib.figure import Figure


def _save(fig: Figure, path: str) -> str:
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _title(result: dict[str, Any], what: str) -> str:
    m = result.get("model", {})
    return f"{what}: {m.get('variant', '?')} {m.get('layout', '')}".strip()


def _heatmap(ax, values, rows, cols, vmin=None, vmax=None, fmt="{:.2f}"):
    image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    lo = min(min(r) for r in values) if vmin is None else vmin
    hi = max(max(r) for r in values) if vmax is None else vmax
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            bright = (v - lo) / (hi - lo) > 0.6 if hi > lo else False
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
    return image


def plot_relative_update(result: dict[str, Any], path: str) -> str:
    blocks = result["relative_update"]
    fig = Figure(figsize=(max(4.0, 0.7 * len(blocks) + 1.5), 3.5))
    ax = fig.add_subplot()
    ax.bar(range(len(blocks)), [b["mean"] for b in blocks], yerr=[b["std"] for b in blocks],
           color="tab:blue", capsize=3)
    ax.set_xticks(range(len(blocks)), [f"{b['block']}\n{b['from']}->{b['to']}" for b in blocks],
                  fontsize=7, rotation=45 if len(blocks) > 8 else 0)
    ax.set_ylabel("2|f(h)-h| / (|f(h)|+|h|)")
    ax.set_title(_title(result, "relative update per block"))
    return _save(fig, path)


def plot_cka(result: dict[str, Any], path: str) -> str:
    names = result["states"]
    fig = Figure(figsize=(1.0 + 0.55 * len(names), 0.6 + 0.5 * len(names)))
    ax = fig.add_subplot()
    image = _heatmap(ax, result["cka"], names, names, vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="CKA (RBF)")
    ax.set_title(_title(result, "CKA between states"))
    return _save(fig, path)


def plot_spectrum(result: dict[str, Any], path: str) -> str:
    names = result["states"]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    colors = cm.viridis([i / max(1, len(names) - 1) for i in range(len(names))])
    for name, values, color in zip(names, result["spectrum"], colors):
        # zeros (exactly rank-deficient states) have no place on a log axis
        points = [(i + 1, v) for i, v in enumerate(values) if v > 0]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(result, "normalised spectrum"))
    return _save(fig, path)


def plot_state_rms(result: dict[str, Any], path: str) -> str:
    rows = result["state_rms"]
    fig = Figure(figsize=(1.5 + 0.6 * len(rows), 3.2))
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ax.errorbar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", capsize=3)
    ax.set_xticks(x, [r["state"] for r in rows])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("RMS over tokens and channels")
    ax.set_title(_title(result, "state magnitude"))
    return _save(fig, path)


def plot_routers(result: dict[str, Any], path: str) -> str:
    routers = result["routers"]
    slots = [f"slot {b}" for b in range(routers["slots"])]
    fig = Figure(figsize=(2.5 + 1.4 * len(slots), 1.6 + 0.5 * len(routers["steps"])), layout="constrained")
    for k, which in enumerate(("write", "read")):
        ax = fig.add_subplot(1, 2, k + 1)
        image = _heatmap(ax, routers[which], routers["steps"], slots, vmin=0.0, vmax=1.0)
        ax.set_title(f"{which} weights")
        if k:
            ax.tick_params(labelleft=False)
    fig.colorbar(image, ax=fig.axes, label="mean weight")
    fig.suptitle(_title(result, "MeSH routers"))
    return _save(fig, path)


def write_plots(result: dict[str, Any], out_dir: str) -> list[str]:
    paths = [plot_relative_update(result, os.path.join(out_dir, "relative_update.png")),
             plot_cka(result, os.path.join(out_dir, "cka.png")),
             plot_spectrum(result, os.path.join(out_dir, "spectrum.png")),
             plot_state_rms(result, os.path.join(out_dir, "state_rms.png"))]
    if result.get("routers"):
        paths.append(plot_routers(result, os.path.join(out_dir, "routers.png")))
    return paths
