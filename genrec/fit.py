"""One way to fit an NNX module with optax through :func:`diffecon.train`.

The RQ-VAE, GEM-Rec's sequence model and the SASRec baseline all train the same way: a fixed
training set rides in the train state (so the jitted loop indexes it without baking it into the
program as a constant), a sampler draws a batch from it, and a loss of ``(model, batch, key)``
is minimised with an optax transformation. The loop, checkpoints and resume are the core's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx, struct

from diffecon.training import TrainConfig, TrainResult, train

__all__ = ["FitState", "fit"]

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
SampleFn = Callable[[jax.Array, Any], Any]


@struct.dataclass
class FitState:
    """The carried state: ``params``, ``opt_state`` and the fixed training ``data``."""

    params: Any
    opt_state: Any
    data: Any


def fit(
    model: nnx.Module,
    loss_fn: LossFn,
    sample_fn: SampleFn,
    data: Any,
    *,
    optimizer: optax.GradientTransformation,
    train_config: TrainConfig,
    fingerprint: Mapping[str, Any] | None = None,
) -> tuple[Any, TrainResult]:
    """Minimise ``loss_fn(model, sample_fn(key, data), key)`` over the model's parameters.

    Args:
      model: the initial module.
      loss_fn: ``(model, batch, key) -> (loss, metrics)``; pure.
      sample_fn: ``(key, data) -> batch`` with a leading batch axis on every leaf.
      data: a pytree of arrays the sampler reads (kept in the state, never updated).
      optimizer: the optax transformation.
      train_config: the core loop's settings (steps, seed, checkpoints, ...).
      fingerprint: facts a resumed run must share.

    Returns:
      ``(trained model, run)``.
    """
    graphdef, params = nnx.split(model)
    state = FitState(params=params, opt_state=optimizer.init(params), data=data)

    def step(state: FitState, batch, key):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, p), batch, key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = FitState(params=params, opt_state=opt_state, data=state.data)
        return new, {"loss": loss, **metrics}

    def sample(key, state: FitState):
        return sample_fn(key, state.data)

    result = train(state, step, sample, train_config, fingerprint=fingerprint)
    return nnx.merge(graphdef, result.state.params), result
