"""Adversarial search for over-allocation: profiles where the chosen menu elements collide.

The hard choice is piecewise constant in the bids, so its over-allocation has no useful gradient.
The search ascends a smooth surrogate instead: the over-allocation of the soft choice
``softmax(kappa * u)``, with ``kappa`` growing along the run so that the surrogate sharpens towards
the hard choice; every iterate is projected onto the support and scored by the **hard** choice,
and the worst iterate per start is kept. Many random starts (and the profiles of a random sample)
make it a search, not a proof; the certificate is the proof.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PRNGKeyArray

from diffecon.evaluation import Estimate, mean_estimate
from diffecon.settings import Setting
from gemnet.model import choose, menu_utilities
from gemnet.train import over_allocation

__all__ = ["OverAllocationSearch", "adversarial_over_allocation", "repair_breakdown"]


@dataclasses.dataclass(frozen=True)
class OverAllocationSearch:
    """What the search found.

    Attributes:
      max_over_allocation: the largest hard over-allocation found (0 when none).
      rate: share of starts whose search found a profile with over-allocation > ``threshold``.
      worst_profile: ``[bidders, items]`` the profile achieving the maximum.
      n_starts: starts searched.
      steps: ascent steps per start.
    """

    max_over_allocation: float
    rate: float
    worst_profile: jax.Array
    n_starts: int
    steps: int


def adversarial_over_allocation(
    mechanism,
    setting: Setting,
    *,
    key: PRNGKeyArray,
    n_starts: int = 4096,
    steps: int = 200,
    learning_rate: float = 0.02,
    kappa_init: float = 20.0,
    kappa_final: float = 5000.0,
    threshold: float = 1e-6,
) -> OverAllocationSearch:
    """Search profiles that maximise over-allocation of a menu mechanism (GemNet or repaired).

    Args:
      mechanism: anything with ``menus(bids) -> Menus`` (``GemNet``, ``RepairedGemNet``).
      setting: supplies start profiles and the support to project on.
      key: randomness of the starts.
      n_starts: start profiles (drawn from the setting).
      steps: Adam steps per start on the soft surrogate.
      learning_rate: Adam step size, relative to the support width.
      kappa_init: initial inverse temperature of the surrogate (per unit of the price scale).
      kappa_final: final inverse temperature.
      threshold: over-allocation counted in ``rate``.
    """
    width = jnp.asarray(setting.high - setting.low)
    scale = float(jnp.max(jnp.sum(jnp.asarray(setting.high), axis=-1)))
    start = setting.sample(key, (n_starts,))
    opt = optax.adam(learning_rate)

    def hard(bids):
        return over_allocation(choose(mechanism.menus(bids), bids).outcome.alloc)

    def surrogate(x, kappa):
        bids = setting.project(setting.low + x * width)
        menus = mechanism.menus(bids)
        weights = jax.nn.softmax(kappa / scale * menu_utilities(menus, bids), axis=-1)
        alloc = jnp.einsum("...k,...km->...m", weights, menus.alloc)
        return jnp.sum(jax.nn.relu(jnp.sum(alloc, axis=-2) - 1.0))

    @jax.jit
    def run(start):
        x0 = (start - setting.low) / width
        ratio = jnp.log(kappa_final / kappa_init)

        def body(carry, t):
            x, state, best, best_x = carry
            kappa = kappa_init * jnp.exp(ratio * t / max(steps - 1, 1))
            grad = jax.grad(surrogate)(x, kappa)
            updates, state = opt.update(-grad, state, x)
            x = jnp.clip(cast(jax.Array, optax.apply_updates(x, updates)), 0.0, 1.0)
            score = hard(setting.low + x * width)
            better = score > best
            best_x = jnp.where(better[:, None, None], x, best_x)
            return (x, state, jnp.maximum(score, best), best_x), None

        best0 = hard(start)
        carry = (x0, opt.init(x0), best0, x0)
        (_, _, best, best_x), _ = jax.lax.scan(body, carry, jnp.arange(steps))
        return best, setting.low + best_x * width

    best, profiles = run(start)
    worst = int(jnp.argmax(best))
    return OverAllocationSearch(
        max_over_allocation=float(best[worst]),
        rate=float(jnp.mean(best > threshold)),
        worst_profile=profiles[worst],
        n_starts=n_starts,
        steps=steps,
    )


def repair_breakdown(
    model,
    repaired,
    setting: Setting,
    *,
    key: PRNGKeyArray,
    n_samples: int = 200_000,
    chunk_size: int = 50_000,
) -> dict[str, Estimate]:
    """Where a repair's revenue goes: trained against repaired menus, profile by profile.

    ``model`` is the trained :class:`~gemnet.GemNet`, ``repaired`` its
    :class:`~gemnet.RepairedGemNet`. Per sampled profile, over bidders: the revenue change from
    bidders who keep their element but pay its offset (``revenue_change_kept``) and from bidders
    who switch element (``revenue_change_switched``); the share of bidders who switch, and of those
    who switch to the null element; the offset on the element chosen after repair. The
    ``..._at_conflicts`` entries count only profiles where the trained menus over-allocate (what
    the repair must change); the rest of the switches are spill-over of offsets that hold for a
    whole cell of ``b_-i`` onto profiles that were compatible. Each with its standard error over
    profiles.
    """
    n = setting.n_bidders

    @jax.jit
    def chunk(k):
        bids = setting.sample(k, (chunk_size,))
        before, after = choose(model.menus(bids), bids), choose(repaired.menus(bids), bids)
        offsets = repaired.offsets(bids)
        kept = before.index == after.index  # [B, n]
        change = after.outcome.pay - before.outcome.pay
        null = offsets.shape[-1] - 1
        chosen_offset = jnp.take_along_axis(offsets, after.index[..., None], -1)[..., 0]
        conflict = jnp.any(jnp.sum(before.outcome.alloc, -2) > 1.0 + 1e-6, -1)[..., None]
        return {
            "revenue_change_kept": jnp.sum(jnp.where(kept, change, 0.0), -1),
            "revenue_change_switched": jnp.sum(jnp.where(kept, 0.0, change), -1),
            "share_switched": jnp.mean(~kept, -1),
            "share_switched_to_null": jnp.mean(~kept & (after.index == null), -1),
            "offset_on_chosen": jnp.sum(chosen_offset, -1) / n,
            "revenue_change_switched_at_conflicts": jnp.sum(
                jnp.where(~kept & conflict, change, 0.0), -1
            ),
            "share_switched_at_conflicts": jnp.mean(~kept & conflict, -1),
        }

    parts: dict[str, list[np.ndarray]] = {}
    for c in range(-(-n_samples // chunk_size)):
        for name, x in jax.device_get(chunk(jax.random.fold_in(key, c))).items():
            parts.setdefault(name, []).append(np.asarray(x, np.float64))
    return {name: mean_estimate(np.concatenate(x)[:n_samples]) for name, x in parts.items()}
