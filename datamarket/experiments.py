"""Experiments (signaling schemes), buyer values, obedience and deviation plans.

Shape conventions (named axes used in every docstring of the package):

* ``experiment``: ``[*batch, states, signals]`` row-stochastic matrix ``pi[w, s]``, the chance of
  signal ``s`` in state ``w``. When signals are *recommendations*, signal ``s`` recommends action
  ``s`` (so ``signals == actions``).
* ``prior``: ``[*batch, states]`` a point of the simplex (the buyer's belief about the state).
* ``payoff``: ``[states, actions]`` the buyer's decision payoff ``u(w, a)``; ``None`` means matching
  utility ``u(w, a) = 1[a = w]`` (``actions == states``).

The value of an experiment to a buyer who best-responds to every signal is
``sum_s max_a sum_w prior_w pi(w, s) u(w, a)`` (:func:`decision_value`); an *obedient* buyer takes
the recommended action and gets ``sum_s sum_w prior_w pi(w, s) u(w, s)`` (:func:`obedient_value`);
the recommendation is obedient when the two agree (:func:`obedience_violation`). A buyer who may
disobey uses a *deviation plan*, a map from signals to actions (:func:`deviation_plans`,
:func:`plan_values`); with two signals and two actions these are follow, flip, always-0, always-1.

Value checks (row sums, simplex, NaN) run only on concrete arrays at the public boundary
(:func:`check_experiment`, :func:`check_prior`); under ``jit`` they reduce to shape checks.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from diffecon.outcome import is_concrete

__all__ = [
    "check_experiment",
    "check_payoff",
    "check_prior",
    "decision_value",
    "deviation_plans",
    "full_information",
    "matching_payoff",
    "no_information",
    "obedience_violation",
    "obedient_value",
    "plan_values",
    "prior_value",
    "softmax_experiment",
]

ROW_SUM_TOL = 1e-4


def check_experiment(
    experiment: Float[Array, "*batch states signals"] | np.ndarray,
    *,
    n_states: int | None = None,
    name: str = "experiment",
    atol: float = ROW_SUM_TOL,
) -> None:
    """Raise ``ValueError`` unless ``experiment`` is row-stochastic ``[*batch, states, signals]``.

    Shapes are always checked; entries only when the array is concrete: finite, non-negative and
    every row (state) summing to 1 within ``atol``.
    """
    shape = tuple(np.shape(experiment))
    if len(shape) < 2:
        raise ValueError(f"{name} must have shape [*batch, states, signals], got shape {shape}")
    if n_states is not None and shape[-2] != n_states:
        raise ValueError(f"{name} must have {n_states} states (axis -2), got shape {shape}")
    if not is_concrete(experiment):
        return
    arr = np.asarray(experiment, np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    if np.any(arr < -atol):
        bad = np.argwhere(arr < -atol)[0]
        raise ValueError(
            f"{name} is not stochastic: negative entry {arr[tuple(bad)]:.4g} at index "
            f"{tuple(bad.tolist())}"
        )
    sums = arr.sum(-1)
    if np.any(np.abs(sums - 1.0) > atol):
        bad = np.argwhere(np.abs(sums - 1.0) > atol)[0]
        raise ValueError(
            f"{name} is not row-stochastic: row {tuple(bad.tolist())} (a state) sums to "
            f"{sums[tuple(bad)]:.6g}, not 1"
        )


def check_prior(
    prior: Float[Array, "*batch states"] | np.ndarray,
    *,
    n_states: int | None = None,
    name: str = "prior",
    atol: float = ROW_SUM_TOL,
) -> None:
    """Raise ``ValueError`` unless ``prior`` lies on the probability simplex (last axis)."""
    shape = tuple(np.shape(prior))
    if len(shape) < 1 or shape[-1] < 2:
        raise ValueError(f"{name} must have shape [*batch, states >= 2], got shape {shape}")
    if n_states is not None and shape[-1] != n_states:
        raise ValueError(f"{name} must have {n_states} states (last axis), got shape {shape}")
    if not is_concrete(prior):
        return
    arr = np.asarray(prior, np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    if np.any(arr < -atol):
        raise ValueError(f"{name} is off the simplex: negative entry {arr.min():.4g}")
    sums = arr.sum(-1)
    if np.any(np.abs(sums - 1.0) > atol):
        worst = sums.reshape(-1)[np.argmax(np.abs(sums - 1.0).reshape(-1))]
        raise ValueError(f"{name} is off the simplex: its entries sum to {worst:.6g}, not 1")


def check_payoff(payoff: np.ndarray | jax.Array, *, n_states: int) -> np.ndarray:
    """Validate a ``[states, actions]`` payoff matrix; returns it as float32 numpy."""
    arr = np.asarray(payoff, np.float32)
    if arr.ndim != 2 or arr.shape[0] != n_states or arr.shape[1] < 2:
        raise ValueError(
            f"payoff must have shape [states={n_states}, actions >= 2], got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("payoff contains NaN or infinite entries")
    return arr


def matching_payoff(n_states: int) -> np.ndarray:
    """``u(w, a) = 1[a = w]``: the buyer wants to match the state."""
    return np.eye(n_states, dtype=np.float32)


def _payoff(payoff, n_states: int) -> jax.Array:
    return jnp.asarray(matching_payoff(n_states) if payoff is None else payoff, jnp.float32)


def _joint(experiment, prior) -> jax.Array:
    """``[*batch, states, signals]`` joint probability ``prior_w * pi(w, s)``."""
    return jnp.asarray(prior)[..., :, None] * experiment


def decision_value(
    experiment: Float[Array, "... states signals"],
    prior: Float[Array, "... states"],
    payoff: Float[Array, "states actions"] | np.ndarray | None = None,
) -> Float[Array, ...]:
    """Expected payoff of a buyer who best-responds to every signal.

    ``sum_s max_a sum_w prior_w pi(w, s) u(w, a)``; with matching utility
    ``sum_s max_w prior_w pi(w, s)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(decision_value(jnp.eye(2), jnp.array([0.3, 0.7])))  # full information
      1.0
      >>> float(decision_value(jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.array([0.3, 0.7])))
      0.7
    """
    joint = _joint(experiment, prior)
    u = _payoff(payoff, experiment.shape[-2])
    per_action = jnp.einsum("...ws,wa->...sa", joint, u)
    return jnp.sum(jnp.max(per_action, axis=-1), axis=-1)


def obedient_value(
    experiment: Float[Array, "... states signals"],
    prior: Float[Array, "... states"],
    payoff: Float[Array, "states actions"] | np.ndarray | None = None,
) -> Float[Array, ...]:
    """Expected payoff of a buyer who takes the recommended action (signal ``s`` = action ``s``).

    With matching utility this is ``x = sum_w prior_w pi(w, w)``, the chance of acting correctly.
    """
    u = _payoff(payoff, experiment.shape[-2])
    if u.shape[1] != experiment.shape[-1]:
        raise ValueError(
            f"recommendations need one signal per action: payoff has {u.shape[1]} actions, the "
            f"experiment {experiment.shape[-1]} signals"
        )
    return jnp.sum(_joint(experiment, prior) * u, axis=(-2, -1))


def obedience_violation(
    experiment: Float[Array, "... states signals"],
    prior: Float[Array, "... states"],
    payoff: Float[Array, "states actions"] | np.ndarray | None = None,
) -> Float[Array, ...]:
    """``relu(decision_value - obedient_value)``: what disobeying the recommendations gains."""
    return jax.nn.relu(
        decision_value(experiment, prior, payoff) - obedient_value(experiment, prior, payoff)
    )


def prior_value(
    prior: Float[Array, "... states"],
    payoff: Float[Array, "states actions"] | np.ndarray | None = None,
) -> Float[Array, ...]:
    """Payoff of the best action without information: ``max_a sum_w prior_w u(w, a)``."""
    u = _payoff(payoff, prior.shape[-1])
    return jnp.max(jnp.asarray(prior) @ u, axis=-1)


def deviation_plans(n_signals: int, n_actions: int) -> np.ndarray:
    """``[plans, signals]`` every map from signals to actions, the identity (obedience) first.

    With two signals and two actions: follow ``(0, 1)``, flip ``(1, 0)``, always-0 ``(0, 0)`` and
    always-1 ``(1, 1)``.
    """
    if n_signals < 1 or n_actions < 1:
        raise ValueError(f"need n_signals, n_actions >= 1, got {n_signals}, {n_actions}")
    plans = [tuple(p) for p in itertools.product(range(n_actions), repeat=n_signals)]
    follow = tuple(range(n_signals))
    if n_signals == n_actions:
        plans.remove(follow)
        plans.insert(0, follow)
    return np.asarray(plans, np.int32)


def plan_values(
    experiment: Float[Array, "... states signals"],
    prior: Float[Array, "... states"],
    payoff: Float[Array, "states actions"] | np.ndarray | None = None,
) -> Float[Array, "... plans"]:
    """Expected payoff under each plan of :func:`deviation_plans` (their maximum is the value)."""
    u = _payoff(payoff, experiment.shape[-2])
    plans = jnp.asarray(deviation_plans(experiment.shape[-1], u.shape[1]))
    u_plan = u[:, plans]  # [states, plans, signals]: payoff of the action each plan takes
    return jnp.einsum("...ws,wps->...p", _joint(experiment, prior), u_plan)


def softmax_experiment(
    logits: Float[Array, "*batch states signals"], *, temperature: float = 1.0
) -> Float[Array, "*batch states signals"]:
    """A row-stochastic experiment from unconstrained logits (softmax over signals)."""
    return jax.nn.softmax(logits / temperature, axis=-1)


def full_information(n_states: int) -> np.ndarray:
    """The fully informative experiment (signal = state)."""
    return np.eye(n_states, dtype=np.float32)


def no_information(n_states: int, signal: int = 0, n_signals: int | None = None) -> np.ndarray:
    """The uninformative experiment that always sends ``signal``."""
    n_signals = n_states if n_signals is None else n_signals
    out = np.zeros((n_states, n_signals), np.float32)
    out[:, signal] = 1.0
    return out
