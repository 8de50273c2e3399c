"""Matplotlib figures shared by every package (PNG, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from diffecon.outcome import Outcome
from diffecon.settings import Setting

__all__ = ["plot_allocation_map", "plot_revenue_bars", "plot_training_curves", "save_figure"]


def save_figure(fig: Figure, path: str) -> str:
    """Save ``fig`` as PNG at ``path`` and close it."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_allocation_map(
    mechanism: Callable[[jax.Array], Outcome],
    setting: Setting,
    *,
    bidder: int = 0,
    others: np.ndarray | None = None,
    resolution: int = 101,
    title: str | None = None,
) -> Figure:
    """Heat maps of a bidder's allocation of each item, and its payment, over its two values.

    For settings with two items (the bidder's values on the axes) and the other bidders' bids held
    at ``others`` (``[bidders - 1, 2]``; default: the middle of their supports).
    """
    if setting.value_dim != 2:
        raise ValueError(
            f"allocation maps need two items, {setting.name!r} has {setting.value_dim}"
        )
    lo, hi = setting.low[bidder], setting.high[bidder]
    if not np.all(np.isfinite(hi)):
        raise ValueError(f"allocation maps need a bounded support; {setting.name!r} is unbounded")
    xs = np.linspace(lo[0], hi[0], resolution, dtype=np.float32)
    ys = np.linspace(lo[1], hi[1], resolution, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys)
    own = np.stack([gx.ravel(), gy.ravel()], -1)
    n = setting.n_bidders
    if others is None:
        mids = (setting.low + setting.high) / 2
        others = np.delete(mids, bidder, axis=0)
    bids = np.repeat(np.asarray(others, np.float32)[None], own.shape[0], 0)
    bids = np.insert(bids, bidder, own, axis=1).reshape(-1, n, 2)
    out = jax.jit(mechanism)(jnp.asarray(bids))
    alloc = np.asarray(out.alloc[:, bidder]).reshape(resolution, resolution, 2)
    pay = np.asarray(out.pay[:, bidder]).reshape(resolution, resolution)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    extent = (lo[0], hi[0], lo[1], hi[1])
    for j in range(2):
        im = axes[j].imshow(
            alloc[..., j],
            origin="lower",
            extent=extent,
            vmin=0,
            vmax=1,
            cmap="viridis",
            aspect="auto",
        )
        axes[j].set_title(f"P(bidder {bidder} gets item {j + 1})")
        fig.colorbar(im, ax=axes[j])
    im = axes[2].imshow(pay, origin="lower", extent=extent, cmap="magma", aspect="auto")
    axes[2].set_title(f"payment of bidder {bidder}")
    fig.colorbar(im, ax=axes[2])
    for ax in axes:
        ax.set_xlabel("value for item 1")
        ax.set_ylabel("value for item 2")
    fig.suptitle(
        title or f"{setting.name}: bidder {bidder}, others at {np.round(others, 3).tolist()}"
    )
    return fig


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    *,
    keys: Sequence[str] = ("revenue", "regret"),
    title: str = "",
    log_scale: Sequence[str] = ("regret",),
) -> Figure:
    """One panel per metric of a training history (rows of ``{step, metric...}``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    steps = [row["step"] for row in history]
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot(steps, [row.get(k, np.nan) for row in history])
        ax.set_xlabel("step")
        ax.set_ylabel(k)
        if k in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_revenue_bars(
    rows: Sequence[Mapping[str, Any]],
    *,
    references: Mapping[str, float] | None = None,
    title: str = "",
) -> Figure:
    """Revenue ± 2 SE per mechanism for one setting, with reference lines (e.g. the optimum).

    Args:
      rows: dicts with ``mechanism``, ``value`` and ``stderr``.
      references: label -> value, drawn as dashed horizontal lines.
      title: figure title.
    """
    fig, ax = plt.subplots(figsize=(1.2 * max(len(rows), 3) + 2, 3.6))
    names = [r["mechanism"] for r in rows]
    vals = [r["value"] for r in rows]
    errs = [2 * r["stderr"] for r in rows]
    ax.bar(names, vals, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    for i, (label, v) in enumerate((references or {}).items()):
        ax.axhline(v, ls="--", color=f"C{i + 1}", label=f"{label} {v:.4g}")
    if references:
        ax.legend(loc="lower right", fontsize=8)
    lo = min([*vals, *(references or {}).values()])
    hi = max([*vals, *(references or {}).values()])
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel("revenue (± 2 SE)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return fig
