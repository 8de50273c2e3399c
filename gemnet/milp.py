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
import os
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
from ortools.linear_solver import pywraplp

__all__ = [
    "CellProblem",
    "CellSolution",
    "discrete_revenue_milp",
    "pairwise_gap",
    "solve_cell",
    "tighten_prices",
]


def pairwise_gap(v_lo, v_hi, a_lo, a_top, p_lo, p_hi, dom, *, xp: Any = np):
    """Upper bound of ``u_k(v) - u_d(v)`` over a box for every element ``k`` and dominator ``d``.

    ``u_k - u_d = sum_j (alpha_kj - alpha_dj) v_j - (beta_k - beta_d)`` is linear in ``v`` for
    fixed menus, so with the allocation difference in ``[a_lo_k - a_top_d, a_top_k - a_lo_d]``
    its maximum over the box is a sum of the largest of four corner products per item. Where
    ``k`` and ``d`` allocate the same items this is far below ``u_hi[k] - u_lo[d]``, which takes
    the two utilities at opposite corners of the box. Sound for any dominators: an element whose
    bound is negative for some ``d`` is never chosen in the box.

    Args:
      v_lo, v_hi: ``[*batch, m]`` the box of the bidder's own values.
      a_lo, a_top: ``[*batch, K + 1, m]`` allocation bounds.
      p_lo, p_hi: ``[*batch, K + 1]`` price bounds (offsets included).
      dom: ``[*batch, T]`` the dominators' element indices.
      xp: the array module (``numpy``, or ``jax.numpy`` inside the builder's jitted checks).

    Returns:
      ``[*batch, K + 1, T]`` the bounds.
    """
    d_lo = xp.take_along_axis(a_lo, dom[..., None], axis=-2)  # [*batch, T, m]
    d_top = xp.take_along_axis(a_top, dom[..., None], axis=-2)
    d_price = xp.take_along_axis(p_hi, dom, axis=-1)  # [*batch, T]
    hi = a_top[..., :, None, :] - d_lo[..., None, :, :]  # [*batch, K + 1, T, m]
    lo = a_lo[..., :, None, :] - d_top[..., None, :, :]
    vl, vh = v_lo[..., None, None, :], v_hi[..., None, None, :]
    gain = xp.maximum(xp.maximum(hi * vh, hi * vl), xp.maximum(lo * vh, lo * vl))
    return xp.sum(gain, axis=-1) - p_lo[..., :, None] + d_price[..., None, :]


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
      menu: ``(a_lo, a_top [K + 1, m], p_lo, p_hi [K + 1])``, the cell's menu bounds before
        offsets, and ``v_lo, v_hi [boxes, m]`` the boxes' own values: exclusions then use the
        pairwise bound ``u_k - u_d <= gap`` (:func:`pairwise_gap`) instead of
        ``u_hi[k] - u_lo[d]`` (``None``: the latter).
      rel_ok: ``[boxes]`` whether the box may instead be certified relationally, by the rows of
        ``rel_*`` with that box: ``rel_coef * (Delta[rel_k] - Delta[rel_l]) >= rel_need`` each
        (the relational witness of a conflicting pair, linear in the offsets).
    """

    cell: int
    u_hi: np.ndarray
    u_lo: np.ndarray
    bad: np.ndarray
    eps: float
    floor_slacks: tuple[float, ...]
    dominators: int
    time_limit_s: float
    menu: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    v_lo: np.ndarray | None = None
    v_hi: np.ndarray | None = None
    rel_ok: np.ndarray | None = None
    rel_box: np.ndarray | None = None
    rel_k: np.ndarray | None = None
    rel_l: np.ndarray | None = None
    rel_coef: np.ndarray | None = None
    rel_need: np.ndarray | None = None


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
    rel_rows: dict[int, list[int]] = defaultdict(list)
    if p.rel_box is not None:
        for q, b in enumerate(p.rel_box.tolist()):
            rel_rows[int(b)].append(q)
    for b in rows:
        constrained = np.flatnonzero(live_bad[b] & (p.u_hi[b] >= floor[b] - p.eps))
        good = np.flatnonzero(~p.bad[b] & (p.u_lo[b] >= floor[b]))
        good = good[good != null]
        order = np.argsort(-p.u_lo[b, good], kind="stable")[: p.dominators]
        doms = [int(d) for d in good[order]] + ([null] if floor[b] <= 0.0 else [])
        rel = p.rel_ok is not None and bool(p.rel_ok[b])
        if not doms and not rel:
            return None, "NO_DOMINATOR", n_bin
        ys = [solver.BoolVar(f"y_{b}_{d}") for d in doms]
        if rel:  # the relational option: every conflicting pair's witness inequality holds
            assert p.rel_k is not None and p.rel_l is not None
            assert p.rel_coef is not None and p.rel_need is not None
            y_rel = solver.BoolVar(f"r_{b}")
            ys_all = [*ys, y_rel]
            for q in rel_rows.get(b, []):
                k, ell, coef = int(p.rel_k[q]), int(p.rel_l[q]), float(p.rel_coef[q])
                need = float(p.rel_need[q])
                slack = (coef * delta_max + abs(need)) * (1 - y_rel)
                solver.Add(coef * (var(k) - var(ell)) >= need - slack)
        else:
            ys_all = ys
        n_bin += len(ys_all)
        solver.Add(sum(ys_all) == 1)
        gap = p.u_hi[b, constrained][:, None] - p.u_lo[b, doms][None, :]  # [constrained, doms]
        if p.menu is not None and p.v_lo is not None and p.v_hi is not None and doms:
            pair = pairwise_gap(p.v_lo[b], p.v_hi[b], *p.menu, np.asarray(doms))[constrained]
            gap = np.minimum(gap, pair)
        for t, (d, y) in enumerate(zip(doms, ys, strict=True)):
            if d != null:
                solver.Add(p.u_lo[b, d] - var(d) >= floor[b] - big_m * (1 - y))
            for c, k in enumerate(constrained):
                solver.Add(float(gap[c, t]) - var(int(k)) <= -var(d) - p.eps + big_m * (1 - y))
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


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Worker initializer: end this process once ``parent_pid`` is gone.

    A repair killed from outside (SIGTERM, SIGKILL) cannot shut its pool down, and its MILP workers
    would otherwise keep solving; a daemon thread polls the parent's id and exits instead.
    """

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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


def tighten_prices(
    utilities: np.ndarray, probs: np.ndarray, *, margin: float, limit: float
) -> np.ndarray | None:
    """Largest revenue price rises that keep every type's choice, for a finite set of types.

    Within one cell of ``b_-i`` of a discrete setting, bidder ``i``'s types ``v`` (its support
    points) face one fixed menu. Each type keeps its current choice ``c(v)`` (the ``argmax`` of
    ``utilities``) if the rises ``r >= 0`` satisfy ``u_c - r_c >= u_l - r_l + margin`` for every
    other element ``l`` (the null element, last, never rises). The linear program maximises the
    expected extra payment ``sum_v probs[v] * r_c(v)`` (GLOP).

    Args:
      utilities: ``[types, K + 1]`` utilities of each element before the rises.
      probs: ``[types]`` probability of each type (any positive weights).
      margin: the strict utility margin every choice keeps over every other element.
      limit: upper bound of a rise (for elements nobody chooses).

    Returns:
      ``[K + 1]`` rises (0 for the null element), or ``None`` when some type's choice is within
      ``margin`` of the null element or of another element that cannot be raised away.
    """
    n_types, k1 = utilities.shape
    null = k1 - 1
    choice = np.argmax(utilities, axis=1)
    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - depends on the OR-Tools build
        raise RuntimeError("OR-Tools was built without GLOP")
    rise = [solver.NumVar(0.0, limit, f"r_{k}") for k in range(null)] + [0.0]
    for v in range(n_types):
        c = int(choice[v])
        for k in range(k1):
            if k != c:
                gap = float(utilities[v, c] - utilities[v, k])
                solver.Add(rise[c] - rise[k] <= gap - margin)
    solver.Maximize(
        sum(float(probs[v]) * rise[int(choice[v])] for v in range(n_types) if choice[v] != null)
    )
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    out = np.zeros(k1)
    for k in range(null):
        out[k] = max(rise[k].solution_value(), 0.0)
    return out


def _distinct_allocations(alloc: np.ndarray, prices: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """``[bidders, cells, K + 1]``: the cheapest element of each group of (near-)equal allocations.

    When prices may be re-set freely, elements with the same allocation are interchangeable; the
    others are priced out, which removes the MILP's symmetric copies.
    """
    keep = np.zeros(prices.shape, bool)
    for i, c in np.ndindex(*prices.shape[:2]):
        kept: list[np.ndarray] = []
        for k in np.argsort(prices[i, c], kind="stable"):
            a = alloc[i, c, k]
            if all(np.max(np.abs(a - b)) > tol for b in kept):
                kept.append(a)
                keep[i, c, k] = True
    return keep


def discrete_revenue_milp(
    utilities: np.ndarray,
    prices: np.ndarray,
    alloc_hi: np.ndarray,
    cell_of: np.ndarray,
    type_of: np.ndarray,
    probs: np.ndarray,
    *,
    eps: float,
    alloc_margin: float,
    time_limit_s: float,
    signed: bool = False,
) -> tuple[np.ndarray | None, str, float]:
    """Revenue-maximising price rises of every bidder at once, for a discrete setting.

    With finitely many profiles the repair can be exact: every bidder ``i`` and cell ``c`` of
    ``b_-i`` gets rises ``r[i, c, k] >= 0`` (the null element, last, never rises), every type ``t``
    of bidder ``i`` in cell ``c`` a chosen element (binaries ``z[i, c, t, k]``) that beats every
    other element by ``eps`` after the rises, the chosen allocations are compatible at every
    profile, and the expected payment ``sum_p probs[p] sum_i (price + rise)`` of the chosen
    elements is maximal (big-M linearisation; SCIP).

    Args:
      utilities: ``[bidders, cells, types, K + 1]`` utilities before the rises.
      prices: ``[bidders, cells, K + 1]`` prices before the rises.
      alloc_hi: ``[bidders, cells, K + 1, items]`` allocation upper bounds (capped at 1).
      cell_of: ``[profiles, bidders]`` the cell of ``b_-i`` at each profile.
      type_of: ``[profiles, bidders]`` bidder ``i``'s own type at each profile.
      probs: ``[profiles]`` profile probabilities.
      eps: the strict utility margin of every choice.
      alloc_margin: two or more bidders' allocations of an item sum to at most ``1 - alloc_margin``.
      time_limit_s: solver time limit.
      signed: let prices also fall (down to 0): the rises may be negative. Strategy-proofness
        does not care (they still depend on ``b_-i`` only); the menu is then re-priced optimally
        for its allocations.

    Returns:
      ``(rises [bidders, cells, K + 1] or None, solver status, objective)``.
    """
    if signed:
        return _repriced_revenue_milp(
            utilities,
            prices,
            alloc_hi,
            cell_of,
            type_of,
            probs,
            eps=eps,
            alloc_margin=alloc_margin,
            time_limit_s=time_limit_s,
        )
    n, n_cells, n_types, k1 = utilities.shape
    m = alloc_hi.shape[-1]
    null = k1 - 1
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - depends on the OR-Tools build
        raise RuntimeError("OR-Tools was built without SCIP")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    span = float(np.max(utilities) - np.min(utilities) + np.max(prices))
    r_max = span + 2 * eps + 1.0
    used = np.zeros((n, n_cells, n_types), bool)
    used[np.arange(n)[None, :], cell_of, type_of] = True
    rise: list[list[list[Any]]] = [
        [[solver.NumVar(0.0, r_max, "") for _ in range(null)] + [0.0] for _ in range(n_cells)]
        for _ in range(n)
    ]
    z: dict[tuple[int, int, int], list[Any]] = {}
    revenue_terms = []
    weight = np.zeros((n, n_cells, n_types))
    np.add.at(weight, (np.arange(n)[None, :], cell_of, type_of), probs[:, None])
    for i, c, t in zip(*np.nonzero(used), strict=True):
        # Payment = value of the chosen allocation - the type's utility U (linear, no products):
        # U >= u_l - r_l + eps for every element not chosen, U = u_k - r_k for the chosen one.
        u = utilities[i, c, t]
        welfare = u + prices[i, c]
        zs = [solver.BoolVar("") for _ in range(k1)]
        z[(i, c, t)] = zs
        solver.Add(sum(zs) == 1)
        top = max(float(np.max(u)), 0.0)
        utility = solver.NumVar(-r_max - span, top, "")
        for k in range(k1):
            solver.Add(utility >= float(u[k]) - rise[i][c][k] + eps * (1 - zs[k]))
            big_m = top - float(u[k]) + (r_max if k != null else 0.0)
            solver.Add(utility <= float(u[k]) - rise[i][c][k] + big_m * (1 - zs[k]))
        revenue_terms.append(
            weight[i, c, t] * (sum(float(welfare[k]) * zs[k] for k in range(k1)) - utility)
        )
    # Allocations padded by alloc_margin where positive: one bidder alone may take all of an item.
    padded = np.where(alloc_hi > 0, alloc_hi + alloc_margin, 0.0)
    for p in range(len(probs)):
        for j in range(m):
            solver.Add(
                sum(
                    float(padded[i, cell_of[p, i], k, j]) * z[(i, cell_of[p, i], type_of[p, i])][k]
                    for i in range(n)
                    for k in range(k1)
                    if padded[i, cell_of[p, i], k, j] > 0
                )
                <= 1.0 + alloc_margin
            )
    solver.Maximize(sum(revenue_terms))
    status = solver.Solve()
    names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE"}
    if status not in names:
        return None, f"STATUS_{status}", math.nan
    out = np.zeros((n, n_cells, k1))
    for i in range(n):
        for c in range(n_cells):
            for k in range(null):
                out[i, c, k] = max(rise[i][c][k].solution_value(), 0.0)
    return out, names[status], solver.Objective().Value()


def _repriced_revenue_milp(
    utilities, prices, alloc_hi, cell_of, type_of, probs, *, eps, alloc_margin, time_limit_s
):
    """The signed case of :func:`discrete_revenue_milp` in the type-space formulation.

    When prices may be set freely (>= 0), a cell's menu is a choice of one element per type plus
    the types' utilities ``U``: incentive compatibility between types ``t`` and ``s`` of the same
    cell reads ``U_t >= U_s + (v_t - v_s) . alloc(s) + eps`` (linear in the binaries, no big-M);
    an element chosen by several types has one price; elements nobody chooses are priced out.
    """
    n, n_cells, n_types, k1 = utilities.shape
    m = alloc_hi.shape[-1]
    null = k1 - 1
    welfare = utilities + prices[:, :, None, :]  # v_t . alloc_k
    keep = _distinct_allocations(alloc_hi, prices)
    keep[..., null] = True
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - depends on the OR-Tools build
        raise RuntimeError("OR-Tools was built without SCIP")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    top = float(np.max(welfare)) + 1.0
    used = np.zeros((n, n_cells, n_types), bool)
    used[np.arange(n)[None, :], cell_of, type_of] = True
    weight = np.zeros((n, n_cells, n_types))
    np.add.at(weight, (np.arange(n)[None, :], cell_of, type_of), probs[:, None])
    z: dict[tuple[int, int, int], dict[int, Any]] = {}
    utility: dict[tuple[int, int, int], Any] = {}
    objective = []
    for i, c, t in zip(*np.nonzero(used), strict=True):
        zs = {int(k): solver.BoolVar("") for k in np.flatnonzero(keep[i, c])}
        z[(i, c, t)] = zs
        solver.Add(sum(zs.values()) == 1)
        u = solver.NumVar(0.0, top, "")
        utility[(i, c, t)] = u
        value = sum(float(welfare[i, c, t, k]) * zk for k, zk in zs.items())
        solver.Add(u >= eps * (1 - zs[null]))  # strictly better than the null element...
        solver.Add(u <= top * (1 - zs[null]))  # ...or the null element itself
        solver.Add(u <= value)  # payments are >= 0
        objective.append(weight[i, c, t] * (value - u))
    for i, c in np.ndindex(n, n_cells):
        types = [t for t in range(n_types) if used[i, c, t]]
        for t in types:
            for s_ in types:
                if s_ == t:
                    continue
                zt, zs = z[(i, c, t)], z[(i, c, s_)]
                # same = 1 iff t and s choose the same element (only bounded above: it relaxes)
                same = []
                for k in zs:
                    y = solver.NumVar(0.0, 1.0, "")
                    solver.Add(y <= zt[k])
                    solver.Add(y <= zs[k])
                    same.append(y)
                gain = sum(
                    float(welfare[i, c, t, k] - welfare[i, c, s_, k]) * zk for k, zk in zs.items()
                )
                solver.Add(utility[(i, c, t)] >= utility[(i, c, s_)] + gain + eps * (1 - sum(same)))
    padded = np.where(alloc_hi > 0, alloc_hi + alloc_margin, 0.0)
    for p in range(len(probs)):
        for j in range(m):
            solver.Add(
                sum(
                    float(padded[i, cell_of[p, i], k, j]) * zk
                    for i in range(n)
                    for k, zk in z[(i, cell_of[p, i], type_of[p, i])].items()
                    if padded[i, cell_of[p, i], k, j] > 0
                )
                <= 1.0 + alloc_margin
            )
    solver.Maximize(sum(objective))
    status = solver.Solve()
    names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE"}
    if status not in names:
        return None, f"STATUS_{status}", math.nan
    # Prices from the solution: a chosen element costs v_s . alloc - U_s; the rest are priced out.
    span = float(np.max(utilities) - np.min(utilities) + np.max(prices))
    out = np.zeros((n, n_cells, k1))
    out[..., :null] = span + 2 * eps + 1.0
    for (i, c, t), zs in z.items():
        k = max(zs, key=lambda k: zs[k].solution_value())
        if k != null:
            price = float(welfare[i, c, t, k]) - utility[(i, c, t)].solution_value()
            out[i, c, k] = max(price, 0.0) - prices[i, c, k]
    return out, names[status], solver.Objective().Value()
