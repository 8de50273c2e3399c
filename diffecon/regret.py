"""Misreports, regret and IR violation: the one search every package uses.

Kernel: ``misreport_utility`` evaluates, for every bidder ``i`` at once, the utility bidder ``i``
gets when it alone reports ``misreports[..., i, :]`` while the others report truthfully. It builds
``[..., deviator, bidders, items]`` profiles (RegretNet's mask trick) and calls the mechanism once on
the flattened batch, so a search over many starts is a single batched call per step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from diffecon.outcome import Outcome, utility

__all__ = [
    "ascend_misreports",
    "deviation_profiles",
    "misreport_utility",
]

MechanismFn = Callable[[jax.Array], Outcome]


def deviation_profiles(
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
) -> Float[Array, "*batch deviators bidders items"]:
    """Profiles in which bidder ``i`` (axis ``deviators``) reports ``misreports[..., i, :]``.

    Entry ``[..., i, j, :]`` is ``misreports[..., i, :]`` when ``j == i`` and ``values[..., j, :]``
    otherwise.
    """
    n = values.shape[-2]
    eye = jnp.eye(n, dtype=values.dtype)[:, :, None]  # [deviators, bidders, 1]
    return values[..., None, :, :] * (1 - eye) + misreports[..., :, None, :] * eye


def misreport_utility(
    mechanism: MechanismFn,
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
) -> Float[Array, "*batch bidders"]:
    """Utility of each bidder ``i`` when it alone reports ``misreports[..., i, :]``.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      values: true values ``[*batch, bidders, items]``.
      misreports: ``[*batch, bidders, items]``; row ``i`` is bidder ``i``'s report.

    Returns:
      ``[*batch, bidders]`` utilities under true values.
    """
    n, d = values.shape[-2:]
    batch = values.shape[:-2]
    profiles = deviation_profiles(values, misreports)  # [*batch, dev, n, d]
    out = mechanism(profiles.reshape(-1, n, d))
    u = utility(
        jnp.broadcast_to(values[..., None, :, :], profiles.shape).reshape(-1, n, d), out
    )  # [B*dev, n]
    u = u.reshape(*batch, n, n)
    return jnp.diagonal(u, axis1=-2, axis2=-1)  # bidder i's utility in profile i


def ascend_misreports(
    mechanism: MechanismFn,
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
    *,
    steps: int,
    learning_rate: float | optax.Schedule,
    project: Callable[[jax.Array], jax.Array],
) -> Float[Array, "*batch bidders items"]:
    """Improve misreports by ``steps`` of projected Adam on each bidder's deviation utility.

    Gradients are stopped at the mechanism's parameters (only the misreports move). Each
    (profile, bidder) is optimised independently: Adam is coordinate-wise, so summing the utilities
    into one objective couples nothing.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      values: ``[*batch, bidders, items]`` true values.
      misreports: ``[*batch, bidders, items]`` starting points.
      steps: number of Adam steps (static).
      learning_rate: Adam step size (or an optax schedule).
      project: maps reports onto the support, e.g. ``setting.project``.

    Returns:
      The improved misreports, projected onto the support.
    """
    opt = optax.adam(learning_rate)
    values = jax.lax.stop_gradient(values)

    def objective(mis):
        return -jnp.sum(misreport_utility(mechanism, values, mis))

    def body(carry, _):
        mis, state = carry
        grads = jax.grad(objective)(mis)
        updates, state = opt.update(grads, state, mis)
        mis = project(optax.apply_updates(mis, updates))
        return (mis, state), None

    mis0 = project(jax.lax.stop_gradient(misreports))
    (mis, _), _ = jax.lax.scan(body, (mis0, opt.init(mis0)), None, length=steps)
    return mis
