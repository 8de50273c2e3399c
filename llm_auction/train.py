"""Train the project's agents: a byte-level LM pretrained on Shakespeare, fine-tuned per edition.

``python -m llm_auction.train`` (options: ``--help``) pretrains :class:`~llm_auction.lm.CausalLM`
on both editions of the plays and poems (Hamlet held out), then fine-tunes one copy on the
modern-spelling texts and one on the First Folio texts, and saves the three models (float16,
orbax) under ``benchmarks/results/checkpoints/llm_auction_{base,modern,folio}`` with their
training history and held-out bits per character in ``meta.json``. Training runs through the
core's loop (:func:`diffecon.train`); a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import nnx
from jaxtyping import Array, Float, Int

from diffecon.training import TrainConfig, train
from llm_auction.corpus import EDITIONS, corpus_tokens
from llm_auction.lm import CausalLM, LMConfig, empty_cache, save_lm

__all__ = ["LMTrainConfig", "bits_per_char", "fit_lm", "main", "sequence_log_probs"]

CHECKPOINTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "checkpoints"


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """The agents' training recipe.

    Attributes:
      lm: the model's shape.
      pretrain_steps: steps on both editions.
      finetune_steps: steps on each edition, starting from the pretrained weights.
      batch_size: windows of ``lm.max_len`` bytes per step.
      learning_rate: peak AdamW rate of pretraining (warm-up, then cosine decay).
      finetune_learning_rate: constant AdamW rate of fine-tuning.
      seed: initialisation and batch seed.
      eval_chars: held-out characters scored for bits per character (0: all of Hamlet).
      out: folder of the checkpoints ``llm_auction_{base,modern,folio}``.
    """

    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    pretrain_steps: int = 1200
    finetune_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 3e-3
    finetune_learning_rate: float = 5e-4
    seed: int = 0
    eval_chars: int = 60_000
    out: str = str(CHECKPOINTS)


def sequence_log_probs(
    model: CausalLM, tokens: Int[Array, " time"]
) -> Float[Array, " time_minus_one"]:
    """Natural-log probability of ``tokens[1:]`` given the tokens before each, in one pass."""
    logits, _ = model(tokens[:-1], empty_cache(model.config), 0, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]


def _window_loss(model: CausalLM, windows: Int[Array, "batch time"]) -> Float[Array, ""]:
    return -jnp.mean(jax.vmap(lambda w: sequence_log_probs(model, w))(windows))


def bits_per_char(model: CausalLM, tokens: np.ndarray, *, batch: int = 16) -> float:
    """Mean bits per character of ``tokens`` in consecutive windows of ``max_len`` (jitted here).

    Each window predicts its characters after the first from those before them in the window.
    """
    t = model.config.max_len + 1
    n = (len(tokens) - 1) // (t - 1)
    if n < 1:
        raise ValueError(f"need more than {t} tokens to score, got {len(tokens)}")
    starts = np.arange(n) * (t - 1)
    windows = np.stack([tokens[s : s + t] for s in starts]).astype(np.int32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def total(params, w):
        m = nnx.merge(graphdef, params)
        return -jnp.sum(jax.vmap(lambda x: sequence_log_probs(m, x))(w))

    nats = 0.0
    for i in range(0, n, batch):
        chunk = windows[i : i + batch]
        pad = batch - len(chunk)
        full = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        per = float(total(params, jnp.asarray(full)))
        nats += per * len(chunk) / batch if pad else per
    return nats / (n * (t - 1)) / math.log(2)


def fit_lm(
    model: CausalLM,
    tokens: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    seed: int,
    run_name: str,
    progress: bool = True,
) -> tuple[CausalLM, list[dict[str, Any]]]:
    """Next-byte cross-entropy training of ``model`` on random windows of ``tokens``.

    Returns the trained model and the loop's metrics history (``loss`` in nats per byte).
    """
    t = model.config.max_len + 1
    if len(tokens) <= t:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one window of {t}")
    graphdef, params = nnx.split(model)
    state = {
        # copies: the loop donates its state, and the caller's model must survive
        "params": jax.tree.map(jnp.copy, params),
        "opt": optimizer.init(params),
        "data": jnp.asarray(tokens, jnp.uint8),
    }

    def sample_batch(key, state):
        starts = jax.random.randint(key, (batch_size,), 0, state["data"].shape[0] - t)
        return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(state["data"], s, t))(starts)

    def step_fn(state, batch, key):
        del key

        def loss_fn(p):
            return _window_loss(nnx.merge(graphdef, p), batch.astype(jnp.int32))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt, "data": state["data"]}, {"loss": loss}

    result = train(
        state,
        step_fn,
        sample_batch,
        TrainConfig(
            steps=steps,
            seed=seed,
            steps_per_call=10,
            log_every=50,
            progress=progress,
            n_devices=1,
            run_name=run_name,
        ),
    )
    return nnx.merge(graphdef, result.state["params"]), result.history


def main(config: LMTrainConfig) -> dict[str, float]:
    """Train and save the three models; returns held-out bits per character by model and text."""
    t0 = time.perf_counter()
    held_out = {e: corpus_tokens((e,), "held_out")[: config.eval_chars or None] for e in EDITIONS}
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(100, config.pretrain_steps), max(config.pretrain_steps, 1)
    )
    base = CausalLM(config.lm, rngs=nnx.Rngs(config.seed))
    base, history = fit_lm(
        base,
        corpus_tokens(EDITIONS),
        steps=config.pretrain_steps,
        batch_size=config.batch_size,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1)),
        seed=config.seed,
        run_name="pretrain",
    )
    models = {"base": (base, history, time.perf_counter() - t0)}
    save_lm(base, Path(config.out) / "llm_auction_base", meta={"partial": "pretrained only"})
    for i, edition in enumerate(EDITIONS):
        t1 = time.perf_counter()
        tuned, hist = fit_lm(
            nnx.clone(base),
            corpus_tokens((edition,)),
            steps=config.finetune_steps,
            batch_size=config.batch_size,
            optimizer=optax.chain(
                optax.clip_by_global_norm(1.0), optax.adamw(config.finetune_learning_rate, 0.1)
            ),
            seed=config.seed + 1 + i,
            run_name=f"finetune {edition}",
        )
        models[edition] = (tuned, hist, time.perf_counter() - t1)
    report: dict[str, float] = {}
    for name, (model, hist, wall) in models.items():
        # the committed weights are float16: score those, not the float32 ones just trained
        model = _float16_rounded(model)
        bpc = {e: bits_per_char(model, tok) for e, tok in held_out.items()}
        report.update({f"{name}/{e}": v for e, v in bpc.items()})
        path = Path(config.out) / f"llm_auction_{name}"
        meta = {
            "name": name,
            "trained_on": list(EDITIONS) if name == "base" else [name],
            "held_out": "hamlet (both editions)",
            "held_out_chars": {e: len(t) for e, t in held_out.items()},
            "held_out_bits_per_char": bpc,
            "train_config": _jsonable(dataclasses.asdict(config)),
            "train_wall_s": round(wall, 1),
            "history": hist,
            "command": "python -m llm_auction.train",
        }
        save_lm(model, path, meta=meta)
        print(f"[llm_auction.train] {name}: held-out bits/char {bpc} ({wall:.0f} s)")
    return report


def _float16_rounded(model: CausalLM) -> CausalLM:
    graphdef, params = nnx.split(model)
    rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.float16).astype(jnp.float32), params)
    return nnx.merge(graphdef, rounded)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_jsonable(v) if isinstance(v, dict) else v) for k, v in d.items()}


if __name__ == "__main__":
    main(tyro.cli(LMTrainConfig))
