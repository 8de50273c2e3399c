"""The exact revenue-optimal DSIC auction of a small discrete setting, as a linear program.

With independent discrete values and additive bidders there are finitely many value profiles, and a
(randomised) mechanism is a table of allocation probabilities ``alloc[profile, bidder, item]`` and
payments ``pay[profile, bidder]``. Dominant-strategy incentive compatibility, ex post individual
rationality and feasibility are linear in that table and expected revenue is a linear objective, so
the optimal mechanism is the solution of one linear program (Conitzer & Sandholm's automated
mechanism design), solved here with OR-Tools' GLOP:

* maximise ``sum_p prob[p] * sum_i pay[p, i]``
* subject to ``0 <= alloc <= 1`` and ``sum_i alloc[p, i, j] <= 1`` (each item at most once),
* IR: ``t . alloc[(t, b_-i), i] - pay[(t, b_-i), i] >= 0`` for every bidder ``i``, type ``t``
  and profile ``b_-i`` of the others,
* DSIC: ``t . alloc[(t, b_-i), i] - pay[(t, b_-i), i] >= t . alloc[(t', b_-i), i] -
  pay[(t', b_-i), i]`` for every bidder, profile of the others, true type ``t`` and report ``t'``.

Payments are free variables (the LP may subsidise); ex post IR keeps truthful utilities >= 0.
The number of DSIC constraints is ``sum_i profiles * (types_i - 1)``, so the LP suits small settings
such as ``yao_2x2_discrete_37`` (16 profiles, 96 DSIC constraints).

:meth:`OptimalLP.mechanism` turns the solution into a mechanism under the project's contract: a
pytree whose call maps ``bids [*batch, bidders, items]`` to an :class:`~diffecon.outcome.Outcome`
by looking the profile up in the table.

References:
  Conitzer & Sandholm, "Complexity of mechanism design", UAI (2002).
  Yao, "Dominant-strategy versus Bayesian multi-item auctions: maximum revenue determination and
  comparison", ACM EC (2017).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float
from ortools.linear_solver import pywraplp

from diffecon.distributions import Discrete, IndependentValues
from diffecon.outcome import Outcome, check_bids
from diffecon.settings import Setting

__all__ = [
    "MAX_LP_CONSTRAINTS",
    "MAX_PROFILES",
    "LookupMechanism",
    "OptimalLP",
    "optimal_dsic_lp",
]

MAX_PROFILES = 4096
"""Largest number of value profiles :func:`optimal_dsic_lp` accepts by default."""

MAX_LP_CONSTRAINTS = 1_000_000
"""Largest number of DSIC constraints :func:`optimal_dsic_lp` builds by default."""

# Pytree fields are annotated ``Any``: JAX rebuilds these dataclasses with placeholder leaves, which
# a run-time array check on the constructor would reject (as in :mod:`diffecon.baselines`).
_Leaf = Any


@struct.dataclass(eq=False)
class LookupMechanism:
    """A mechanism given by a table over the finitely many value profiles of a discrete setting.

    Each bid is rounded to the nearest support point of its bidder and item (ties: the lower point),
    and the outcome is the table's row of the resulting profile. Rounding makes the mechanism
    defined on every bid; because every bid maps to some support report, a DSIC table stays DSIC
    against any misreport, not only support points, for values on the support.

    Attributes:
      support: ``[bidders, items, points]`` support points, padded with ``inf`` past each
        marginal's own points (never nearest).
      strides: ``[bidders, items]`` int32 profile-index strides: a profile with support indices
        ``k[i, j]`` is row ``sum(k * strides)`` of the tables.
      alloc: ``[profiles, bidders, items]`` allocation probabilities.
      pay: ``[profiles, bidders]`` payments.
    """

    support: _Leaf
    strides: _Leaf
    alloc: _Leaf
    pay: _Leaf

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Look ``bids [*batch, bidders, items]`` up, each rounded to its nearest support point."""
        n, m, _ = self.support.shape
        check_bids(bids, n_bidders=n, n_items=m)
        bids = jnp.asarray(bids)
        dtype = bids.dtype
        distance = jnp.abs(bids[..., None] - self.support.astype(dtype))  # [*batch, n, m, points]
        nearest = jnp.argmin(distance, axis=-1)  # first (lower) point among ties
        profile = jnp.sum(nearest * self.strides, axis=(-2, -1))  # [*batch]
        alloc = jnp.take(self.alloc.astype(dtype), profile, axis=0)
        pay = jnp.take(self.pay.astype(dtype), profile, axis=0)
        return Outcome(alloc=alloc, pay=pay)


@dataclasses.dataclass(frozen=True, eq=False)
class OptimalLP:
    """The solution of :func:`optimal_dsic_lp`.

    Profiles enumerate every combination of support indices, with the (bidder, item) coordinates
    in row-major order: the last item of the last bidder changes fastest.

    Attributes:
      revenue: optimal expected revenue (the LP objective).
      support: ``support[i][j]``, the support points of bidder ``i``'s value for item ``j``.
      profiles: ``[profiles, bidders, items]`` every value profile.
      probs: ``[profiles]`` prior probability of each profile.
      alloc: ``[profiles, bidders, items]`` optimal allocation probabilities.
      pay: ``[profiles, bidders]`` optimal payments.
    """

    revenue: float
    support: tuple[tuple[tuple[float, ...], ...], ...]
    profiles: Float[np.ndarray, "profiles bidders items"]
    probs: Float[np.ndarray, " profiles"]
    alloc: Float[np.ndarray, "profiles bidders items"]
    pay: Float[np.ndarray, "profiles bidders"]

    def mechanism(self) -> LookupMechanism:
        """The solution as a mechanism: ``bids [*batch, bidders, items] -> Outcome`` (pure JAX).

        Bids are rounded to the nearest support point per bidder and item; see
        :class:`LookupMechanism`.
        """
        n, m = len(self.support), len(self.support[0])
        width = max(len(points) for row in self.support for points in row)
        padded = np.full((n, m, width), np.inf, np.float32)
        for i, j in itertools.product(range(n), range(m)):
            padded[i, j, : len(self.support[i][j])] = self.support[i][j]
        sizes = [len(points) for row in self.support for points in row]
        strides = np.asarray([math.prod(sizes[k + 1 :]) for k in range(len(sizes))], np.int32)
        return LookupMechanism(
            support=jnp.asarray(padded),
            strides=jnp.asarray(strides.reshape(n, m)),
            alloc=jnp.asarray(self.alloc, jnp.float32),
            pay=jnp.asarray(self.pay, jnp.float32),
        )


def _discrete_marginals(setting: Setting) -> tuple[tuple[Discrete, ...], ...]:
    if setting.valuation != "additive":
        raise ValueError(
            f"optimal_dsic_lp supports additive settings; setting {setting.name!r} is "
            f"{setting.valuation}"
        )
    if not isinstance(setting.values, IndependentValues):
        raise ValueError(
            f"optimal_dsic_lp needs IndependentValues; setting {setting.name!r} has "
            f"{type(setting.values).__name__}"
        )
    rows: list[tuple[Discrete, ...]] = []
    for row in setting.values.marginals:
        discrete = tuple(mg for mg in row if isinstance(mg, Discrete))
        if len(discrete) != len(row):
            other = next(mg for mg in row if not isinstance(mg, Discrete))
            raise ValueError(
                f"optimal_dsic_lp needs Discrete marginals; setting {setting.name!r} has {other!r}"
            )
        rows.append(discrete)
    return tuple(rows)


def optimal_dsic_lp(
    setting: Setting,
    *,
    max_profiles: int = MAX_PROFILES,
    max_constraints: int = MAX_LP_CONSTRAINTS,
) -> OptimalLP:
    """Solve for the revenue-optimal DSIC, ex post IR (randomised) auction of a discrete setting.

    See the module docstring for the linear program. Allocations may be lotteries; payments are
    free (no sign constraint).

    Args:
      setting: an additive setting whose values are :class:`~diffecon.IndependentValues` of
        :class:`~diffecon.Discrete` marginals.
      max_profiles: raise rather than build an LP with more value profiles than this.
      max_constraints: raise rather than build more DSIC constraints than this.

    Returns:
      The optimal revenue and mechanism table, an :class:`OptimalLP`.

    Raises:
      ValueError: for non-additive settings, other value models or marginals, or too many profiles
        or constraints.
      RuntimeError: if GLOP does not report an optimal solution.

    Examples:
      >>> from diffecon.distributions import Discrete, IndependentValues
      >>> from diffecon.settings import Setting
      >>> one = Setting(
      ...     name="doc_1x1_discrete", n_bidders=1, n_items=1, valuation="additive",
      ...     values=IndependentValues.iid(
      ...         Discrete((1.0, 2.0), (0.5, 0.5)), n_bidders=1, n_items=1
      ...     ),
      ... )
      >>> round(optimal_dsic_lp(one).revenue, 6)  # posting 1 or 2 both earn 1
      1.0
    """
    marginals = _discrete_marginals(setting)
    n, m = setting.n_bidders, setting.n_items
    sizes = [len(mg.points) for row in marginals for mg in row]
    n_profiles = math.prod(sizes)
    if n_profiles > max_profiles:
        raise ValueError(
            f"setting {setting.name!r} has {' x '.join(map(str, sizes))} = {n_profiles} value "
            f"profiles, more than max_profiles={max_profiles}"
        )
    n_types = [math.prod(sizes[i * m : (i + 1) * m]) for i in range(n)]
    n_dsic = sum(n_profiles * (k - 1) for k in n_types)
    if n_dsic > max_constraints:
        raise ValueError(
            f"setting {setting.name!r} needs {n_dsic} DSIC constraints, more than "
            f"max_constraints={max_constraints}"
        )

    # Profiles as support indices [P, n * m], in row-major order over (bidder, item).
    index = np.asarray(list(itertools.product(*[range(s) for s in sizes])), np.int64)
    index = index.reshape(n_profiles, n * m)
    points = [np.asarray(mg.points, np.float64) for row in marginals for mg in row]
    probs_1d = [np.asarray(mg.probs, np.float64) for row in marginals for mg in row]
    profiles = np.stack([points[c][index[:, c]] for c in range(n * m)], -1).reshape(-1, n, m)
    probs = np.prod(np.stack([probs_1d[c][index[:, c]] for c in range(n * m)], -1), axis=-1)
    by_bidder = index.reshape(n_profiles, n, m)  # [P, n, m] support indices per bidder and item

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - GLOP ships with every ortools wheel
        raise RuntimeError("OR-Tools could not create a GLOP solver")
    alloc = [
        [[solver.NumVar(0.0, 1.0, f"x_{p}_{i}_{j}") for j in range(m)] for i in range(n)]
        for p in range(n_profiles)
    ]
    infinity = solver.infinity()
    pay = [
        [solver.NumVar(-infinity, infinity, f"p_{p}_{i}") for i in range(n)]
        for p in range(n_profiles)
    ]

    for p, j in itertools.product(range(n_profiles), range(m)):
        solver.Add(solver.Sum([alloc[p][i][j] for i in range(n)]) <= 1.0)

    def utility(true_type: np.ndarray, p: int, i: int):
        return solver.Sum([float(true_type[j]) * alloc[p][i][j] for j in range(m)]) - pay[p][i]

    for i in range(n):
        # Profiles that share the others' reports b_-i: bidder i's menu at b_-i.
        others = np.delete(by_bidder, i, axis=1).reshape(n_profiles, -1)
        groups: dict[tuple[int, ...], list[int]] = {}
        for p in range(n_profiles):
            groups.setdefault(tuple(others[p].tolist()), []).append(p)
        for group in groups.values():
            for p in group:
                truthful = utility(profiles[p, i], p, i)
                solver.Add(truthful >= 0.0)
                for q in group:
                    if q != p:
                        solver.Add(truthful >= utility(profiles[p, i], q, i))

    solver.Maximize(
        solver.Sum([float(probs[p]) * pay[p][i] for p in range(n_profiles) for i in range(n)])
    )
    status = solver.Solve()
    if status != pywraplp.Solver.OPTIMAL:
        names = {
            pywraplp.Solver.FEASIBLE: "FEASIBLE",
            pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
            pywraplp.Solver.UNBOUNDED: "UNBOUNDED",
            pywraplp.Solver.ABNORMAL: "ABNORMAL",
            pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
        }
        raise RuntimeError(
            f"GLOP did not solve the DSIC LP of setting {setting.name!r} to optimality "
            f"(status {names.get(status, status)})"
        )

    alloc_values = np.asarray(
        [
            [[alloc[p][i][j].solution_value() for j in range(m)] for i in range(n)]
            for p in range(n_profiles)
        ],
        np.float64,
    )
    pay_values = np.asarray(
        [[pay[p][i].solution_value() for i in range(n)] for p in range(n_profiles)], np.float64
    )
    return OptimalLP(
        revenue=float(solver.Objective().Value()),
        support=tuple(tuple(tuple(float(x) for x in mg.points) for mg in row) for row in marginals),
        profiles=profiles,
        probs=probs,
        alloc=alloc_values,
        pay=pay_values,
    )
