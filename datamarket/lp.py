"""The exact optimal single-buyer data market on a grid of types, by linear programming.

Revelation principle for information (Bergemann, Bonatti & Smolin 2018): each type ``t`` of a
finite grid reports its type and receives an experiment ``pi_t[state, action]`` whose signals are
action *recommendations*, at price ``p_t``. The program

    max   sum_t weight_t p_t
    s.t.  sum_a pi_t[w, a] = 1, pi_t >= 0                         (experiments)
          V_t(pi_t, follow) >= V_t(pi_t, plan)  for every plan    (obedience)
          V_t(pi_t, follow) - p_t >= scale_t * prior_value_t      (IR)
          V_t(pi_t, follow) - p_t >= V_t(pi_s, plan) - p_s        (IC: misreport s, then any plan)

is linear, with ``V_t(pi, plan) = scale_t sum_w prior_t[w] sum_a pi[w, a] u(w, plan(a))`` and the
plans of :func:`datamarket.experiments.deviation_plans` (follow / flip / always-0 / always-1 for
two actions). It is solved with OR-Tools GLOP. The IC constraints grow as ``N^2 * plans``, so they
are generated lazily: start from each type's nearest neighbours, solve, add every violated
constraint (the worst plan of each violated pair), and repeat until none is violated by more than
``tol``; the result is the exact optimum of the full program.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from ortools.linear_solver import pywraplp

from datamarket.experiments import check_payoff, check_prior, deviation_plans

__all__ = ["LPMenu", "optimal_menu_lp"]


@dataclasses.dataclass(frozen=True)
class LPMenu:
    """The LP's optimal direct mechanism on a type grid.

    Attributes:
      revenue: optimal expected revenue on the grid.
      experiments: ``[types, states, actions]`` the recommendation experiment of each type.
      prices: ``[types]``.
      priors: ``[types, states]`` the grid.
      scales: ``[types]``.
      weights: ``[types]`` probabilities of the grid types.
      max_ic_violation: largest violation of any IC constraint (all ``N^2 * plans`` checked).
      max_obedience_violation: largest violation of obedience.
      n_ic_constraints: IC constraints in the final program (of ``N^2 * plans``).
      rounds: constraint-generation rounds.
      wall_s: solve time.
    """

    revenue: float
    experiments: np.ndarray
    prices: np.ndarray
    priors: np.ndarray
    scales: np.ndarray
    weights: np.ndarray
    max_ic_violation: float
    max_obedience_violation: float
    n_ic_constraints: int
    rounds: int
    wall_s: float


def _deviation_matrix(pi, prices, priors, scales, payoff, plans):
    """``[types, reports, plans]`` utility of type t taking report s's item and playing a plan."""
    # M[s, p, w] = sum_a pi_s[w, a] u(w, plan_p(a))
    u_plan = payoff[:, plans]  # [states, plans, actions]
    m = np.einsum("swa,wpa->spw", pi, u_plan)
    dev = scales[:, None, None] * np.einsum("tw,spw->tsp", priors, m)
    return dev - prices[None, :, None]


def optimal_menu_lp(
    priors: np.ndarray,
    *,
    scales: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    payoff: np.ndarray | None = None,
    neighbours: int = 4,
    tol: float = 1e-7,
    max_rounds: int = 50,
) -> LPMenu:
    """Solve the optimal data-market LP on a grid of types (see the module docstring).

    Args:
      priors: ``[types, states]`` each type's prior (on the simplex).
      scales: ``[types]`` value scales (default 1).
      weights: ``[types]`` type probabilities (default uniform); must sum to 1.
      payoff: ``[states, actions]`` (default matching utility).
      neighbours: IC constraints to every type's nearest ``neighbours`` types start the program.
      tol: an IC constraint counts as violated beyond this.
      max_rounds: constraint-generation rounds before giving up.

    Returns:
      An :class:`LPMenu`.

    Raises:
      ValueError: on priors off the simplex, bad shapes or weights, or when GLOP fails or the
        constraint generation does not converge.
    """
    t0 = time.perf_counter()
    priors = np.asarray(priors, np.float64)
    check_prior(priors, name="priors")
    n, n_states = priors.shape
    scales = np.ones(n) if scales is None else np.asarray(scales, np.float64)
    weights = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, np.float64)
    if scales.shape != (n,) or weights.shape != (n,):
        raise ValueError(
            f"scales and weights must have shape ({n},), got {scales.shape}, {weights.shape}"
        )
    if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
        raise ValueError(f"weights must be >= 0 and sum to 1, got sum {weights.sum():.6g}")
    if np.any(scales < 0):
        raise ValueError("scales must be >= 0")
    u = np.eye(n_states) if payoff is None else check_payoff(payoff, n_states=n_states)
    u = np.asarray(u, np.float64)
    n_actions = u.shape[1]
    plans = deviation_plans(n_actions, n_actions)  # plans[0] is "follow"
    u_plan = u[:, plans]  # [states, plans, actions]
    # coef[t, p, w, a]: V_t(pi, plan p) = sum_{w,a} coef[t, p, w, a] pi[w, a]
    coef = scales[:, None, None, None] * priors[:, None, :, None] * np.transpose(u_plan, (1, 0, 2))

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        raise ValueError("OR-Tools GLOP is not available")
    inf = solver.infinity()
    pi = [
        [
            [solver.NumVar(0.0, 1.0, f"pi_{t}_{w}_{a}") for a in range(n_actions)]
            for w in range(n_states)
        ]
        for t in range(n)
    ]
    price = [solver.NumVar(-inf, inf, f"p_{t}") for t in range(n)]
    for t in range(n):
        for w in range(n_states):
            row = solver.Constraint(1.0, 1.0)
            for a in range(n_actions):
                row.SetCoefficient(pi[t][w][a], 1.0)
        for p in range(1, len(plans)):
            ob = solver.Constraint(0.0, inf)
            for w in range(n_states):
                for a in range(n_actions):
                    ob.SetCoefficient(pi[t][w][a], coef[t, 0, w, a] - coef[t, p, w, a])
        ir = solver.Constraint(scales[t] * float(np.max(priors[t] @ u)), inf)
        for w in range(n_states):
            for a in range(n_actions):
                ir.SetCoefficient(pi[t][w][a], coef[t, 0, w, a])
        ir.SetCoefficient(price[t], -1.0)
    objective = solver.Objective()
    for t in range(n):
        objective.SetCoefficient(price[t], float(weights[t]))
    objective.SetMaximization()

    added: set[tuple[int, int, int]] = set()

    def add_ic(t: int, s: int, p: int) -> None:
        if (t, s, p) in added or t == s:
            return
        added.add((t, s, p))
        c = solver.Constraint(0.0, inf)
        for w in range(n_states):
            for a in range(n_actions):
                c.SetCoefficient(pi[t][w][a], coef[t, 0, w, a])
                c.SetCoefficient(pi[s][w][a], -coef[t, p, w, a])
        c.SetCoefficient(price[t], -1.0)
        c.SetCoefficient(price[s], 1.0)

    features = np.concatenate([priors, scales[:, None]], axis=1)
    dist = np.linalg.norm(features[:, None] - features[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    for t in range(n):
        for s in np.argsort(dist[t])[: min(neighbours, n - 1)]:
            for p in range(len(plans)):
                add_ic(t, int(s), p)

    rounds = 0
    while True:
        rounds += 1
        if rounds > max_rounds:
            raise ValueError(f"constraint generation did not converge in {max_rounds} rounds")
        status = solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            raise ValueError(f"GLOP did not find an optimum (status {status})")
        pi_val = np.array([[[v.solution_value() for v in row] for row in pt] for pt in pi])
        p_val = np.array([v.solution_value() for v in price])
        dev = _deviation_matrix(pi_val, p_val, priors, scales, u, plans)  # [t, s, plans]
        truthful = dev[np.arange(n), np.arange(n), 0]
        gain = dev - truthful[:, None, None]
        gain[np.arange(n), np.arange(n), :] = -np.inf
        worst_plan = np.argmax(gain, axis=-1)
        worst = np.max(gain, axis=-1)
        violated = np.argwhere(worst > tol)
        if violated.size == 0:
            break
        for t, s in violated:
            add_ic(int(t), int(s), int(worst_plan[t, s]))
    own = _deviation_matrix(pi_val, np.zeros(n), priors, scales, u, plans)[
        np.arange(n), np.arange(n)
    ]
    return LPMenu(
        revenue=float(weights @ p_val),
        experiments=pi_val,
        prices=p_val,
        priors=priors,
        scales=scales,
        weights=weights,
        max_ic_violation=float(max(np.max(worst), 0.0)),
        max_obedience_violation=float(max(np.max(own[:, 1:] - own[:, :1]), 0.0)),
        n_ic_constraints=len(added),
        rounds=rounds,
        wall_s=time.perf_counter() - t0,
    )
