"""The price-offset MILP of one cell of ``b_-r`` (numpy and OR-Tools only: it runs in workers).

Within one cell of the other bidders' bids the repairing bidder ``r`` faces a menu whose outputs
lie in known intervals, so over each constrained box of its own values every element ``k`` has
utility bounds ``u_lo[b, k] <= u <= u_hi[b, k]`` before offsets. An element is **bad** in a box if
its allocation upper bound plus what the other (already repaired) bidders may take exceeds 1 for
some item; compatibility holds when no bad element can be chosen. Offsets ``Delta_k >= 0`` (one per
element, shared by all boxes of the cell, so they depend on ``b_-r`` only) lower utilities. A bad
element ``k`` is excluded from a box when some **dominator** ``d`` (a good element or the null one)
keeps ``u_hi[k] - Delta_k <= u_lo[d] - Delta_d - eps``; the dominator must also keep the box's
best lower utility above a floor ``L_floor``, which excludes every element whose upper utility is
below the floor without a constraint. The MILP picks one dominator per box (binaries, big-M) and
minimises the total offset. A floor at the null element's utility (0) is always feasible (price
every bad element out); higher floors make the MILP smaller and are tried first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
from ortools.linear_solver import pywraplp

__all__ = ["CellProblem", "CellSolution", "solve_cell"]


@dataclasses.dataclass(frozen=True)
class CellProblem:
    """One cell's MILP data (element ``K`` is the null element: utility 0, never bad).

    Attributes:
      cell: identifier passed through (the cell key).
      u_hi: ``[boxes, K + 1]`` utility upper bounds before offsets.
      u_lo: ``[boxes, K + 1]`` utility lower bounds before offsets.
      bad: ``[boxes, K + 1]`` whether each element would break compatibility in the box.
      eps: strict margin of exclusions (larger than the checker's utility tolerance).
      floor_slacks: ``L_floor = max(0, L_0 - slack)`` tried in order (``inf``: floor 0).
      dominators: good elements (by lower utility) offered as dominators per box.
      time_limit_s: per solve.
    """

    cell: int
    u_hi: np.ndarray
    u_lo: np.ndarray
    bad: np.ndarray
    eps: float
    floor_slacks: tuple[float, ...]
    dominators: int
    time_limit_s: float


@dataclasses.dataclass(frozen=True)
class CellSolution:
    """``offsets [K + 1]`` (``None`` if no floor worked), the solver status and timings."""

    cell: int
    offsets: np.ndarray | None
    status: str
    floor_slack: float
    n_binaries: int
    wall_s: float


def _solve_with_floor(p: CellProblem, slack: float):
    n_boxes, k1 = p.u_hi.shape
    null = k1 - 1
    best_lo = np.maximum(np.max(p.u_lo, axis=1), 0.0)  # includes the null element's 0
    floor = np.maximum(best_lo - slack, 0.0) if math.isfinite(slack) else np.zeros(n_boxes)
    # Bad elements that might be chosen at all (upper utility >= the floor's least value 0).
    live_bad = p.bad & (p.u_hi >= -p.eps)
    rows = [b for b in range(n_boxes) if live_bad[b].any()]
    if not rows:
        return np.zeros(k1), "TRIVIAL", 0
    span = float(np.max(p.u_hi[rows]) - min(0.0, float(np.min(p.u_lo[rows]))))
    delta_max = span + 2 * p.eps + 1.0
    big_m = 2 * (span + delta_max) + 1.0
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - depends on the OR-Tools build
        raise RuntimeError("OR-Tools was built without SCIP")
    solver.SetTimeLimit(int(p.time_limit_s * 1000))
    delta: dict[int, pywraplp.Variable] = {}

    def var(k: int) -> Any:
        if k == null:
            return 0.0
        if k not in delta:
            delta[k] = solver.NumVar(0.0, delta_max, f"delta_{k}")
        return delta[k]

    n_bin = 0
    for b in rows:
        constrained = np.flatnonzero(live_bad[b] & (p.u_hi[b] >= floor[b] - p.eps))
        good = np.flatnonzero(~p.bad[b] & (p.u_lo[b] >= floor[b]))
        good = good[good != null]
        order = np.argsort(-p.u_lo[b, good], kind="stable")[: p.dominators]
        doms = [int(d) for d in good[order]] + ([null] if floor[b] <= 0.0 else [])
        if not doms:
            return None, "NO_DOMINATOR", n_bin
        ys = [solver.BoolVar(f"y_{b}_{d}") for d in doms]
        n_bin += len(ys)
        solver.Add(sum(ys) == 1)
        for d, y in zip(doms, ys, strict=True):
            if d != null:
                solver.Add(p.u_lo[b, d] - var(d) >= floor[b] - big_m * (1 - y))
            for k in constrained:
                solver.Add(
                    float(p.u_hi[b, k]) - var(int(k))
                    <= float(p.u_lo[b, d]) - var(d) - p.eps + big_m * (1 - y)
                )
    solver.Minimize(solver.Sum(list(delta.values())) if delta else 0.0)
    status = solver.Solve()
    names = {
        pywraplp.Solver.OPTIMAL: "OPTIMAL",
        pywraplp.Solver.FEASIBLE: "FEASIBLE",
        pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
        pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
    }
    name = names.get(status, f"STATUS_{status}")
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None, name, n_bin
    offsets = np.zeros(k1)
    for k, v in delta.items():
        offsets[k] = max(v.solution_value(), 0.0)
    return offsets, name, n_bin


def solve_cell(problem: CellProblem) -> CellSolution:
    """Solve one cell's MILP, relaxing the floor until a solution is found (or none works)."""
    t0 = time.perf_counter()
    status, n_bin, slack = "NOT_RUN", 0, math.inf
    for slack in problem.floor_slacks:
        offsets, status, n_bin = _solve_with_floor(problem, slack)
        if offsets is not None:
            return CellSolution(
                problem.cell, offsets, status, slack, n_bin, time.perf_counter() - t0
            )
    return CellSolution(problem.cell, None, status, slack, n_bin, time.perf_counter() - t0)
