"""Outcomes of mechanisms, the shape conventions every package shares, and input validation.

Shape conventions (named axes used in every docstring of the project):

* ``bids`` and ``values``: ``[*batch, bidders, items]`` float32. For combinatorial settings the last
  axis indexes *bundles* instead of items (see :class:`diffecon.Setting.bundles`); everything below
  is written so that the same code serves both.
* ``Outcome.alloc``: ``[*batch, bidders, items]`` probabilities (expected allocations of lotteries).
* ``Outcome.pay``: ``[*batch, bidders]`` payments.

Value checks (NaN, negative, wrong sizes) happen once at the public boundary and only on concrete
arrays: under ``jax.jit`` the checks reduce to trace-time shape checks and cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.core import Tracer
from jaxtyping import Array, Float

__all__ = [
    "Mechanism",
    "Outcome",
    "check_bids",
    "is_concrete",
    "utility",
]


@struct.dataclass
class Outcome:
    """What a mechanism decides for a batch of bid profiles.

    Attributes:
      alloc: ``[*batch, bidders, items]`` allocation probabilities in ``[0, 1]``.
      pay: ``[*batch, bidders]`` payments (non-negative for every mechanism in this project).
    """

    # Annotated ``Any``: JAX rebuilds pytrees with placeholder leaves (``ShapeDtypeStruct`` under
    # ``eval_shape``, numpy arrays after ``device_get``), which a run-time array check would reject.
    alloc: Any
    pay: Any

    @property
    def revenue(self) -> Float[Array, "*batch"]:
        """Total payment of each profile, ``[*batch]``."""
        return jnp.sum(self.pay, axis=-1)


@runtime_checkable
class Mechanism(Protocol):
    """A pure function of bids: ``mechanism(bids [*batch, bidders, items]) -> Outcome``.

    Baselines are frozen pytree dataclasses and learned mechanisms are Flax NNX modules; both read
    no RNG and mutate nothing when called, so they can be closed over or passed through ``jax.jit``.
    """

    def __call__(self, bids: Float[Array, "*batch bidders items"]) -> Outcome: ...


MechanismFn = Callable[[jax.Array], Outcome]


def utility(
    values: Float[Array, "*batch bidders items"], outcome: Outcome
) -> Float[Array, "*batch bidders"]:
    """Quasi-linear utility ``sum(values * alloc, -1) - pay`` of each bidder.

    Serves additive and unit-demand bidders, and combinatorial bidders when the last axis indexes
    bundles (a bidder's value for a lottery over bundles is linear in the bundle probabilities).
    """
    return jnp.sum(values * outcome.alloc, axis=-1) - outcome.pay


def is_concrete(x: object) -> bool:
    """True when ``x`` holds actual numbers (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, Tracer)


def check_bids(
    bids: Float[Array, "*batch bidders items"] | np.ndarray,
    *,
    n_bidders: int,
    n_items: int,
    name: str = "bids",
) -> None:
    """Validate a bid array at a public boundary; raise ``ValueError`` naming the problem.

    The shape is always checked (at trace time under ``jit``); values are checked only when ``bids``
    is concrete: they must be finite and non-negative.

    Args:
      bids: ``[*batch, bidders, items]`` array.
      n_bidders: expected size of the ``bidders`` axis.
      n_items: expected size of the ``items`` (or bundles) axis.
      name: how the array is called in error messages.

    Raises:
      ValueError: on a wrong rank, wrong trailing shape, non-float dtype, NaN/inf or negative entry.
    """
    shape = tuple(np.shape(bids))
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape [*batch, bidders={n_bidders}, items={n_items}], "
            f"got shape {shape} (rank {len(shape)} < 2)"
        )
    if shape[-2:] != (n_bidders, n_items):
        raise ValueError(
            f"{name} must have shape [*batch, bidders={n_bidders}, items={n_items}], "
            f"got shape {shape}"
        )
    dtype = getattr(bids, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {dtype}")
    if not is_concrete(bids):
        return
    arr = np.asarray(bids)
    if arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains NaN or infinite entries (first at index {tuple(bad.tolist())}: "
            f"{arr[tuple(bad)]})"
        )
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(
            f"{name} contains negative entries (first at index {tuple(bad.tolist())}: "
            f"{arr[tuple(bad)]}); values and bids must be >= 0"
        )
