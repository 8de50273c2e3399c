"""Training GEM-Rec's sequence model and the SASRec / popularity baselines on a split.

Both sequence models train through :func:`genrec.fit.fit` (the core loop) on the same training
targets of a :class:`genrec.data.Split` (every impression before each user's validation target,
its history the ``history`` impressions before it), and both are evaluated on the same held-out
targets. SASRec (Kang & McAuley, 2018) is a causal transformer over item ids trained with full
softmax cross-entropy at every position.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from diffecon.training import (
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from genrec.data import Split, window
from genrec.fit import fit
from genrec.model import PAD, GemRec, GemRecConfig, _Block, event_tokens, sequence_loss

__all__ = [
    "SASRec",
    "SASRecConfig",
    "SeqTrainConfig",
    "gemrec_inputs",
    "load_model",
    "popularity_ranking",
    "sasrec_ranking",
    "save_model",
    "train_gemrec",
    "train_sasrec",
]


@dataclasses.dataclass(frozen=True)
class SeqTrainConfig:
    """Optimisation of a sequence model.

    Attributes:
      batch_size: training targets per step.
      learning_rate: peak AdamW step size (linear warm-up, cosine decay to 5%).
      warmup_steps: warm-up length.
      weight_decay: AdamW decay.
    """

    batch_size: int = 256
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01


def _optimizer(config: SeqTrainConfig, steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        min(config.warmup_steps, max(steps - 1, 1)),
        max(steps, 2),
        end_value=0.05 * config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay)
    )


def _fit_sequence_model(model, loss, sample, data, config, optim, train_config):
    targets = int(data["positions"].shape[0])
    return fit(
        model,
        loss,
        sample,
        data,
        optimizer=_optimizer(optim, train_config.steps),
        train_config=train_config,
        fingerprint={"model": repr(config), "optim": repr(optim), "targets": targets},
    )


def gemrec_inputs(
    split: Split, codes: Int[np.ndarray, "items levels"], *, history: int, codebook_size: int
) -> np.ndarray:
    """``[users, history + columns, 1 + levels]`` impression tokens, left-padded by ``history``.

    Column ``c`` of the split is column ``c + history`` here, so the history of the target at
    ``c`` is the slice ``[c, c + history)`` for every ``c``.
    """
    tokens = event_tokens(codes, split.events, split.is_ad, codebook_size=codebook_size)
    pad = np.full((split.n_users, history, tokens.shape[-1]), PAD, np.int32)
    return np.concatenate([pad, tokens], axis=1)


def _gather(tokens, users, columns, length):
    def one(u, c):
        return jax.lax.dynamic_slice_in_dim(tokens[u], c, length, axis=0)

    return jax.vmap(one)(users, columns)


def train_gemrec(
    split: Split,
    codes: Int[np.ndarray, "items levels"],
    config: GemRecConfig,
    optim: SeqTrainConfig,
    train_config: TrainConfig,
) -> tuple[GemRec, TrainResult]:
    """Train the encoder-decoder with next-token cross-entropy on ``[flag, codes]``."""
    if codes.shape[1] != config.levels:
        raise ValueError(f"codes have {codes.shape[1]} levels, the model expects {config.levels}")
    h = config.history
    data = {
        "tokens": jnp.asarray(
            gemrec_inputs(split, codes, history=h, codebook_size=config.codebook_size)
        ),
        "positions": jnp.asarray(split.train_positions),
    }
    n = split.train_positions.shape[0]
    model = GemRec(config, rngs=nnx.Rngs(params=jax.random.key(train_config.seed)))

    def sample(key, data):
        pick = data["positions"][jax.random.randint(key, (optim.batch_size,), 0, n)]
        users, cols = pick[:, 0], pick[:, 1]
        window_ = _gather(data["tokens"], users, cols, h + 1)
        return {"users": users, "history": window_[:, :h], "target": window_[:, h]}

    def loss(model: GemRec, batch, key):
        logits = model(batch["users"], batch["history"], batch["target"], key=key)
        total, flag = sequence_loss(logits, batch["target"])
        return total, {"flag_loss": flag}

    return _fit_sequence_model(model, loss, sample, data, config, optim, train_config)


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """SASRec's shape (its blocks are GEM-Rec's encoder blocks, causally masked).

    Attributes:
      d_model: width.
      heads: attention heads.
      layers: blocks.
      mlp: feed-forward width.
      history: items it reads.
      dropout: dropout rate.
    """

    d_model: int = 64
    heads: int = 2
    layers: int = 2
    mlp: int = 256
    history: int = 20
    dropout: float = 0.2


class SASRec(nnx.Module):
    """Causal self-attention over the last ``history`` items; logits over the catalogue."""

    def __init__(self, config: SASRecConfig, n_items: int, *, rngs: nnx.Rngs):
        block = GemRecConfig(
            d_model=config.d_model,
            heads=config.heads,
            head_dim=config.d_model // config.heads,
            mlp=config.mlp,
            dropout=config.dropout,
        )
        self.config = config
        self.items = nnx.Embed(n_items + 1, config.d_model, rngs=rngs)  # 0: padding
        self.positions = nnx.Embed(config.history, config.d_model, rngs=rngs)
        self.blocks = nnx.List([_Block(block, rngs, cross=False) for _ in range(config.layers)])
        self.norm = nnx.RMSNorm(config.d_model, rngs=rngs)

    def __call__(
        self, items: Int[Array, "*batch history"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch history items"]:
        """Next-item logits at every position (``items`` are indices, ``-1`` pads)."""
        length = items.shape[-1]
        x = self.items(items + 1) * np.sqrt(self.config.d_model)
        x = x + self.positions(jnp.arange(length))
        mask = jnp.tril(jnp.ones((length, length), bool)) & (items >= 0)[..., None, :]
        mask = mask | jnp.eye(length, dtype=bool)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, key=None if key is None else jax.random.fold_in(key, i))
        return self.norm(x) @ self.items.embedding[...][1:].T


def train_sasrec(
    split: Split,
    n_items: int,
    config: SASRecConfig,
    optim: SeqTrainConfig,
    train_config: TrainConfig,
) -> tuple[SASRec, TrainResult]:
    """Train SASRec with full cross-entropy on every position of windows ending at training
    targets."""
    s = config.history
    events = np.concatenate([np.full((split.n_users, s), -1, np.int32), split.events], axis=1)
    data = {"events": jnp.asarray(events), "positions": jnp.asarray(split.train_positions)}
    n = split.train_positions.shape[0]
    model = SASRec(config, n_items, rngs=nnx.Rngs(params=jax.random.key(train_config.seed)))

    def sample(key, data):
        pick = data["positions"][jax.random.randint(key, (optim.batch_size,), 0, n)]
        # columns [c - s, c] of the split: s inputs and, shifted by one, their next items
        seq = _gather(data["events"][..., None], pick[:, 0], pick[:, 1], s + 1)[..., 0]
        return {"inputs": seq[:, :s], "targets": seq[:, 1:]}

    def loss(model: SASRec, batch, key):
        logits = model(batch["inputs"], key=key)
        target = batch["targets"]
        valid = (target >= 0) & (batch["inputs"] >= 0)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
        total = jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)
        return total, {}

    return _fit_sequence_model(model, loss, sample, data, config, optim, train_config)


def sasrec_ranking(
    model: SASRec,
    split: Split,
    which: str,
    *,
    k: int = 10,
    exclude: Bool[np.ndarray, "users items"] | None = None,
) -> np.ndarray:
    """``[users, k]`` SASRec's top-``k`` items for the test or validation targets, never an
    item of ``exclude`` (e.g. :meth:`Split.seen`)."""
    col = split.target_column(which)
    items = jnp.asarray(window(split.events, col, model.config.history))
    logits = jax.jit(lambda m, x: m(x)[:, -1])(model, items)
    if exclude is not None:
        logits = jnp.where(jnp.asarray(exclude), -jnp.inf, logits)
    return np.asarray(jax.lax.top_k(logits, k)[1])


def popularity_ranking(
    split: Split,
    n_items: int,
    *,
    k: int = 10,
    exclude: Bool[np.ndarray, "users items"] | None = None,
) -> np.ndarray:
    """The items most often seen before the validation targets (ties: lower index): ``[k]``,
    or ``[users, k]`` skipping each user's ``exclude`` items when it is given (``-1`` pads a
    list when fewer than ``k`` items are left)."""
    train = split.events[:, : split.target_column("valid")]
    counts = np.bincount(train[train >= 0], minlength=n_items)
    order = np.argsort(-counts, kind="stable")
    if exclude is None:
        return order[:k]
    exclude = np.asarray(exclude, bool)
    if exclude.shape != (split.n_users, n_items):
        raise ValueError(f"exclude must be [{split.n_users}, {n_items}], got {exclude.shape}")
    keep = ~exclude[:, order]
    # the first k kept positions of each row, in popularity order
    ranks = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(keep, ranks, axis=1), order[ranks], -1)


def save_model(model: nnx.Module, directory: str | Path, *, meta: dict[str, Any]) -> Path:
    """Save a module's state with JSON-able ``meta`` (orbax, atomic)."""
    _, state = nnx.split(model)
    return save_checkpoint(directory, 0, state, meta={"genrec": json.dumps(meta)}, max_to_keep=1)


def load_model(like: nnx.Module, directory: str | Path) -> tuple[Any, dict[str, Any]]:
    """Restore a module saved by :func:`save_model` into the structure of ``like``.

    Raises:
      ValueError: no checkpoint, or one that does not match ``like``.
    """
    if latest_checkpoint(directory) is None:
        raise ValueError(f"no checkpoint in {str(directory)!r}")
    graphdef, state = nnx.split(like)
    restored, meta = restore_checkpoint(directory, state)
    return nnx.merge(graphdef, restored), json.loads(meta.get("genrec", "{}"))
