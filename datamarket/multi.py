"""Several data buyers who compete downstream (Bonatti, Dahleh, Hörner & Nouripour 2022).

Buyers share a prior ``theta`` over the states and have private values ``v_i``. A mechanism gives
buyer ``i`` an experiment ``pi_i(v)`` whose signals recommend actions, and charges ``P_i(v)``. With
``x_i = sum_w theta_w pi_i(w, w)`` the chance that an obedient ``i`` acts correctly, ``i`` earns
``v_i (x_i - alpha sum_{j != i} x_j) - P_i``; opting out earns ``v_i (max theta - alpha (n - 1))``
(the others are then fully informed).

Two incentive notions:

* ``expost``: regret over misreports at every profile (RegretNet style), obedience at every profile.
* ``bic``: interim utilities (averaged over the others' values), obedience of the interim
  experiment, interim IR; payments depend on the own report only.

**The Outcome embedding.** A buyer who misreports and then best-responds to its signals earns
``v_i * g_i - P_i`` with ``g_i = decision_value(pi_i) - alpha sum_{j != i} x_j - (max theta -
alpha (n - 1))``, which is linear in its true value. So every market mechanism here is also a
:class:`diffecon.Mechanism` on bids ``[*batch, buyers, 1]`` with ``Outcome(alloc=g[..., None],
pay=P)``: diffecon's utility ``v * alloc - pay`` is then the utility above the outside option of
the joint deviation *misreport and then disobey optimally*, and :func:`diffecon.regret_search`
searches exactly those deviations. The obedient truthful utility is lower by ``v_i (best_i -
x_i)``, which :func:`evaluate_market` adds back (joint regret = searched regret + that gap).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float, PRNGKeyArray

from datamarket._checkpoints import read_meta
from datamarket.experiments import (
    check_prior,
    decision_value,
    full_information,
    no_information,
    obedient_value,
)
from diffecon.distributions import Exponential, IndependentValues, Marginal, Uniform
from diffecon.evaluation import Estimate, mean_estimate
from diffecon.outcome import Outcome, check_bids
from diffecon.regret import RegretConfig, misreport_utility, regret_search
from diffecon.regretnet import MLP
from diffecon.settings import Setting
from diffecon.training import (
    TrainConfig,
    TrainResult,
    restore_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "MARKET_SETTINGS",
    "BICOptimal",
    "ExPostOptimal",
    "MarketNet",
    "MarketOutcome",
    "MarketSetting",
    "MarketTrainConfig",
    "PiecewiseUniform",
    "evaluate_market",
    "interim_metrics",
    "load_market",
    "market_gains",
    "save_market",
    "train_market",
]

Incentive = Literal["expost", "bic"]


# --------------------------------------------------------------------------------------------------
# The irregular value distribution (needs ironing).


@functools.cache
def _ironed_table(marginal: PiecewiseUniform, points: int = 200_001) -> tuple[np.ndarray, ...]:
    """Quantile grid and ironed virtual values on it (derivative of the convex hull of H(q))."""
    q = np.linspace(0.0, 1.0, points)
    v = np.asarray(marginal.icdf_np(q))
    dens = marginal.pdf_np(v)
    phi = v - (1.0 - q) / dens
    h = np.concatenate([[0.0], np.cumsum((phi[1:] + phi[:-1]) / 2 * np.diff(q))])
    hull = [0]  # lower convex hull of (q, h), monotone chain
    for k in range(1, points):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (h[b] - h[a]) * (q[k] - q[a]) >= (h[k] - h[a]) * (q[b] - q[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    hq, hh = q[hull], h[hull]
    slopes = np.diff(hh) / np.diff(hq)
    seg = np.clip(np.searchsorted(hq, q, side="right") - 1, 0, len(slopes) - 1)
    return q.astype(np.float32), slopes[seg].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PiecewiseUniform:
    """A mixture of uniforms on adjacent intervals ``[edges[k], edges[k+1]]`` with ``probs[k]``.

    The spec's irregular distribution is ``PiecewiseUniform((0, 0.3, 0.8), (0.75, 0.25))``
    (``(0.75 U[0,3] + 0.25 U[3,8]) / 10``); its virtual value is ironed.
    """

    edges: tuple[float, ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        e, p = np.asarray(self.edges, float), np.asarray(self.probs, float)
        if e.ndim != 1 or e.size != p.size + 1 or p.size == 0:
            raise ValueError("PiecewiseUniform needs len(edges) == len(probs) + 1 >= 2")
        if np.any(np.diff(e) <= 0) or e[0] < 0:
            raise ValueError(f"edges must be non-negative and increasing, got {self.edges}")
        if np.any(p <= 0) or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"probs must be positive and sum to 1, got {self.probs}")

    @property
    def low(self) -> float:
        return float(self.edges[0])

    @property
    def high(self) -> float:
        return float(self.edges[-1])

    def _cum(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.probs)])

    def icdf(self, u):
        return jnp.interp(u, jnp.asarray(self._cum(), jnp.float32), jnp.asarray(self.edges))

    def icdf_np(self, u):
        return np.interp(u, self._cum(), np.asarray(self.edges, float))

    def cdf(self, v):
        return jnp.interp(v, jnp.asarray(self.edges), jnp.asarray(self._cum(), jnp.float32))

    def pdf_np(self, v):
        e, p = np.asarray(self.edges, float), np.asarray(self.probs, float)
        k = np.clip(np.searchsorted(e, v, side="right") - 1, 0, p.size - 1)
        return p[k] / np.diff(e)[k]

    def virtual_value(self, v):
        q, phi = _ironed_table(self)
        return jnp.interp(self.cdf(v), jnp.asarray(q), jnp.asarray(phi))

    def myerson_reserve(self) -> float:
        q, phi = _ironed_table(self)
        return float(self.icdf_np(q[np.argmax(phi >= 0)]))


IRR = PiecewiseUniform((0.0, 0.3, 0.8), (0.75, 0.25))


# --------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class MarketSetting(Setting):
    """A competitive data market: a diffecon :class:`~diffecon.Setting` with one "item" per buyer.

    Values are ``[*batch, buyers, 1]``. The extra fields describe the market.

    Attributes:
      prior: common prior over the states.
      alpha: the competitive externality.
      incentive: ``expost`` or ``bic``.
      optimum: the optimal revenue (closed form), if known.
      optimum_source: where it comes from.
    """

    prior: tuple[float, ...] = (0.5, 0.5)
    alpha: float = 0.5
    incentive: Incentive = "expost"
    optimum: float | None = None
    optimum_source: str = ""

    def __post_init__(self):
        super().__post_init__()
        check_prior(np.asarray(self.prior), name="MarketSetting.prior")
        if self.n_items != 1:
            raise ValueError(f"a market has one value per buyer (n_items=1), got {self.n_items}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.incentive not in ("expost", "bic"):
            raise ValueError(f"incentive must be 'expost' or 'bic', got {self.incentive!r}")

    @property
    def n_buyers(self) -> int:
        return self.n_bidders

    @property
    def n_states(self) -> int:
        return len(self.prior)

    @property
    def theta(self) -> float:
        """``max_w prior_w``: the chance of acting correctly without information."""
        return max(self.prior)

    @property
    def outside_coefficient(self) -> float:
        """Opting out earns ``v_i`` times this: ``max theta - alpha (n - 1)``."""
        return self.theta - self.alpha * (self.n_buyers - 1)

    @property
    def gain_cap(self) -> float:
        """Largest possible gain over the outside option per unit of value."""
        return 1.0 - self.theta + self.alpha * (self.n_buyers - 1)

    def marginal(self, buyer: int) -> Marginal:
        assert isinstance(self.values, IndependentValues)
        return self.values.marginal(buyer, 0)

    def feasibility_violation(
        self, alloc: Float[Array, "*batch bidders items"]
    ) -> Float[Array, "*batch"]:
        """Always 0: ``alloc`` is a buyer's net gain (not a share of a good) and experiments are
        row-stochastic by construction, so there is nothing to over-allocate."""
        return jnp.zeros(alloc.shape[:-2], alloc.dtype)


def _market(
    values: str,
    marginals: tuple[Marginal, ...],
    theta: float,
    alpha: float,
    incentive: Incentive,
    optimum: float | None,
    source: str,
) -> MarketSetting:
    n = len(marginals)
    name = f"dm_{n}_{values}_theta{theta:g}_alpha{alpha:g}_{incentive}"
    return MarketSetting(
        name=name,
        n_bidders=n,
        n_items=1,
        valuation="additive",
        values=IndependentValues(tuple((m,) for m in marginals)),
        prior=(theta, 1.0 - theta),
        alpha=alpha,
        incentive=incentive,
        optimum=optimum,
        optimum_source=source,
        description=f"{n} data buyers, values {values}, prior ({theta:g}, {1 - theta:g}), "
        f"alpha {alpha:g}, {incentive}",
    )


_SPEC_TABLE = {  # (values, theta, alpha): (ex post optimum, BIC optimum), the spec's table
    ("uniform", 0.5, 0.5): (0.2708, 0.3958),
    ("uniform", 0.5, 2.0): (0.5417, 1.0417),
    ("uniform", 0.75, 0.5): (0.1354, 0.2370),
    ("uniform", 0.75, 2.0): (0.2708, 0.7500),
    ("exp", 0.5, 0.5): (0.4043, 0.6324),
    ("exp", 0.5, 2.0): (0.8086, 1.6127),
    ("exp", 0.75, 0.5): (0.2021, 0.4475),
    ("exp", 0.75, 2.0): (0.4043, 1.4145),
    ("asym", 0.5, 0.5): (0.4219, 0.6094),
    ("asym", 0.5, 2.0): (0.8437, 1.5937),
    ("asym", 0.75, 0.5): (0.2109, 0.3691),
    ("asym", 0.75, 2.0): (0.4219, 1.1354),
    ("irr", 0.5, 0.5): (0.1141, 0.1698),
    ("irr", 0.5, 2.0): (0.2282, 0.4397),
}
_VALUES: dict[str, tuple[Marginal, Marginal]] = {
    "uniform": (Uniform(0.0, 1.0), Uniform(0.0, 1.0)),
    "exp": (Exponential(1.0), Exponential(1.0)),
    "asym": (Uniform(0.0, 1.0), Uniform(0.0, 2.0)),
    "irr": (IRR, IRR),
}
_SRC = {
    "expost": "(1 - theta) E[(phi_1 - alpha phi_2)^+ + (phi_2 - alpha phi_1)^+] (spec table)",
    "bic": "E[sum_i (phi_i - alpha phi_j) 1{truth to i}] (spec table)",
}


def _register() -> dict[str, MarketSetting]:
    out: dict[str, MarketSetting] = {}
    for (values, theta, alpha), optima in _SPEC_TABLE.items():
        for incentive, opt in zip(("expost", "bic"), optima, strict=True):
            s = _market(values, _VALUES[values], theta, alpha, incentive, opt, _SRC[incentive])
            out[s.name] = s
    # Beyond the paper: three buyers, ex post (optimum from the same virtual-value formula).
    s = _market("uniform", (Uniform(0.0, 1.0),) * 3, 0.5, 0.5, "expost", None, "")
    out[s.name] = s
    return out


MARKET_SETTINGS: dict[str, MarketSetting] = _register()


# --------------------------------------------------------------------------------------------------
# Outcomes and the quantities every mechanism is judged by.


@struct.dataclass
class MarketOutcome:
    """What a market mechanism decides for a batch of value profiles.

    Attributes:
      experiments: ``[*batch, buyers, states, signals]`` each buyer's recommendation experiment.
      pay: ``[*batch, buyers]`` payments.
    """

    experiments: Any
    pay: Any


def market_gains(
    experiments: Float[Array, "*batch buyers states signals"], setting: MarketSetting
) -> dict[str, Float[Array, "*batch buyers"]]:
    """Per-buyer quantities of a profile's experiments.

    Returns ``x`` (chance an obedient buyer acts correctly), ``best`` (chance when best-responding),
    ``gain_obedient`` (payoff above the outside option per unit value, everybody obedient) and
    ``gain_deviate`` (the same when this buyer best-responds and the others obey).
    """
    prior = jnp.asarray(setting.prior, jnp.float32)
    x = obedient_value(experiments, prior)
    best = decision_value(experiments, prior)
    others = jnp.sum(x, axis=-1, keepdims=True) - x
    externality = setting.alpha * others + setting.outside_coefficient
    return {
        "x": x,
        "best": best,
        "gain_obedient": x - externality,
        "gain_deviate": best - externality,
    }


def _as_outcome(market: MarketOutcome, setting: MarketSetting) -> Outcome:
    gains = market_gains(market.experiments, setting)
    return Outcome(alloc=gains["gain_deviate"][..., None], pay=market.pay)


# --------------------------------------------------------------------------------------------------
# The learned mechanism (RegretNet style).


class MarketNet(nnx.Module):
    """Experiments and payments of every buyer from the value profile.

    ``market_outcome(bids [*batch, buyers, 1]) -> MarketOutcome``; ``__call__`` gives diffecon's
    :class:`~diffecon.Outcome` (see the module docstring). Experiments are softmaxes over signals.
    Ex post payments are ``v_i sigmoid(net_i(v)) relu(gain_obedient_i)`` (ex post IR by
    construction); BIC payments are ``v_i sigmoid(net_i(v_i)) gain_cap``, a function of the own
    report only (interim IR is penalised in training).

    Args:
      setting: the market (buyers, states, prior, alpha, incentive; the value scales normalise
        the inputs).
      hidden: units per hidden layer.
      layers: hidden layers.
      rngs: initialisation randomness.
    """

    def __init__(
        self, setting: MarketSetting, *, hidden: int = 100, layers: int = 2, rngs: nnx.Rngs
    ):
        n, s = setting.n_buyers, setting.n_states
        self.setting = setting
        self.input_scale = tuple(_value_scale(setting.marginal(i)) for i in range(n))
        self.experiment_net = MLP(
            n, n * s * s, hidden=hidden, layers=layers, rngs=rngs, activation=jax.nn.leaky_relu
        )
        n_pay_in = 1 if setting.incentive == "bic" else n
        self.pay_net = MLP(
            n_pay_in, n, hidden=hidden, layers=layers, rngs=rngs, activation=jax.nn.leaky_relu
        )

    def market_outcome(self, bids: Float[Array, "*batch buyers 1"]) -> MarketOutcome:
        setting = self.setting
        n, s = setting.n_buyers, setting.n_states
        batch = bids.shape[:-2]
        v = bids[..., 0].reshape(-1, n)
        x_in = v / jnp.asarray(self.input_scale, jnp.float32)
        experiments = jax.nn.softmax(self.experiment_net(x_in).reshape(-1, n, s, s), axis=-1)
        if setting.incentive == "expost":
            gains = market_gains(experiments, setting)["gain_obedient"]
            pay = v * jax.nn.sigmoid(self.pay_net(x_in)) * jax.nn.relu(gains)
        else:
            own = self.pay_net(x_in[..., None])  # [B, buyers (own value), buyers (outputs)]
            frac = jax.nn.sigmoid(jnp.diagonal(own, axis1=-2, axis2=-1))
            pay = v * frac * setting.gain_cap
        return MarketOutcome(
            experiments=experiments.reshape(*batch, n, s, s), pay=pay.reshape(*batch, n)
        )

    def __call__(self, bids: Float[Array, "*batch buyers 1"]) -> Outcome:
        check_bids(bids, n_bidders=self.setting.n_buyers, n_items=1)
        return _as_outcome(self.market_outcome(bids), self.setting)


def _value_scale(marginal: Marginal) -> float:
    high = marginal.high
    if math.isfinite(high):
        return float(high)
    return float(marginal.icdf(jnp.asarray(0.9)))


# --------------------------------------------------------------------------------------------------
# The closed-form optima of the spec, as mechanisms.


def _threshold(marginal: Marginal, c: jax.Array, iters: int = 40) -> jax.Array:
    """``inf {t : phi(t) >= c}`` for the (ironed, non-decreasing) virtual value; by bisection in
    quantile space. Returns the support's low end when ``phi(low) >= c``."""
    lo = jnp.zeros_like(c)
    hi = jnp.full_like(c, 1.0 - 1e-7)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        above = marginal.virtual_value(marginal.icdf(mid)) >= c
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    at_low = marginal.virtual_value(marginal.icdf(jnp.zeros_like(c))) >= c
    return jnp.where(at_low, marginal.low, marginal.icdf(hi))


def _share_below(marginal: Marginal, c: jax.Array, iters: int = 40) -> jax.Array:
    """``P(phi(V) <= c)`` for the (ironed, non-decreasing) virtual value, by bisection."""
    lo = jnp.zeros_like(c)
    hi = jnp.ones_like(c)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        below = marginal.virtual_value(marginal.icdf(mid)) <= c
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return (lo + hi) / 2


def _closed_form_experiments(informed, setting: MarketSetting, wrong: bool) -> jax.Array:
    s = setting.n_states
    full = jnp.asarray(full_information(s))
    if wrong:  # recommend the wrong action (binary states)
        other = jnp.asarray(full_information(s)[::-1].copy())
    else:  # no information: always recommend the prior's best action
        other = jnp.asarray(no_information(s, int(np.argmax(setting.prior))))
    return jnp.where(informed[..., None, None], full, other)


@struct.dataclass
class ExPostOptimal:
    """The ex post IC and obedient optimum: buyer ``i`` fully informed iff ``phi_i >= alpha
    sum_{j != i} phi_j`` (ironed virtual values), else uninformed; threshold payments.

    Revenue ``(1 - theta) E[sum_i (phi_i - alpha sum_{j != i} phi_j)^+]``; for two buyers the
    spec's formula. Payments charge, for each indicator in the buyer's gain that its own value
    switches on, the gain step times the value at which it switches.
    """

    setting: MarketSetting = struct.field(pytree_node=False)

    def market_outcome(self, bids: Float[Array, "*batch buyers 1"]) -> MarketOutcome:
        setting = self.setting
        n = setting.n_buyers
        v = bids[..., 0]
        phi = jnp.stack([setting.marginal(i).virtual_value(v[..., i]) for i in range(n)], axis=-1)
        a, step = setting.alpha, 1.0 - setting.theta
        rest = jnp.sum(phi, axis=-1, keepdims=True) - phi
        informed = phi >= a * rest
        pays = []
        for i in range(n):
            m = setting.marginal(i)
            pay_i = step * _threshold(m, a * rest[..., i]) * informed[..., i]
            for j in range(n):
                if j == i:
                    continue
                # j is uninformed iff phi_i > phi_j / alpha - sum_{k != i, j} phi_k
                others_k = rest[..., i] - phi[..., j]
                c = phi[..., j] / a - others_k if a > 0 else jnp.full_like(phi[..., j], jnp.inf)
                pay_i = pay_i + a * step * _threshold(m, c) * (~informed[..., j])
            pays.append(pay_i)
        return MarketOutcome(
            experiments=_closed_form_experiments(informed, setting, wrong=False),
            pay=jnp.stack(pays, axis=-1),
        )

    def __call__(self, bids: Float[Array, "*batch buyers 1"]) -> Outcome:
        check_bids(bids, n_bidders=self.setting.n_buyers, n_items=1)
        return _as_outcome(self.market_outcome(bids), self.setting)


@functools.cache
def _bic_integral_table(setting: MarketSetting, buyer: int, points: int = 20_001):
    """``t -> int_low^t G_i(s) ds`` on a grid (trapezoid), for the BIC optimum's payments."""
    m = setting.marginal(buyer)
    with jax.ensure_compile_time_eval():  # a constant table, even when first needed under jit
        high = m.high if math.isfinite(m.high) else float(m.icdf(jnp.asarray(1.0 - 1e-6)))
        t = np.linspace(m.low, high, points, dtype=np.float64)
        g = np.asarray(_bic_interim_gain(setting, buyer, jnp.asarray(t, jnp.float32)), np.float64)
    integral = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(t))])
    return t.astype(np.float32), integral.astype(np.float32)


def _bic_interim_gain(setting: MarketSetting, i: int, t: jax.Array) -> jax.Array:
    """Interim gain ``G_i(t) = X_i - theta - alpha (X_ji - 1)`` of the BIC optimum (two buyers)."""
    j = 1 - i
    mi, mj = setting.marginal(i), setting.marginal(j)
    a, theta = setting.alpha, setting.theta
    c_i = mi.virtual_value(mi.icdf(jnp.asarray(theta)))
    c_j = mj.virtual_value(mj.icdf(jnp.asarray(theta)))
    phi_i = mi.virtual_value(t)
    x_i = _share_below(mj, jnp.maximum(phi_i / a, c_j))
    x_j = jnp.where(phi_i <= c_i, 1.0, 1.0 - _share_below(mj, a * phi_i))
    return x_i - theta - a * (x_j - 1.0)


@struct.dataclass
class BICOptimal:
    """The BIC optimum with interim obedience (two buyers, two states): tell buyer ``i`` the truth
    iff ``phi_j <= max(phi_i / alpha, phi_j(v_j*))`` with ``F_j(v_j*) = theta``, else recommend
    the wrong action. Interim payments ``P_i(v_i) = v_i G_i(v_i) - int_0^{v_i} G_i``."""

    setting: MarketSetting = struct.field(pytree_node=False)

    def __post_init__(self):
        if self.setting.n_buyers != 2 or self.setting.n_states != 2:
            raise ValueError("the BIC closed form is for two buyers and two states")

    def market_outcome(self, bids: Float[Array, "*batch buyers 1"]) -> MarketOutcome:
        setting = self.setting
        v = bids[..., 0]
        a, theta = setting.alpha, setting.theta
        phi = [setting.marginal(i).virtual_value(v[..., i]) for i in range(2)]
        truth, pays = [], []
        for i in range(2):
            j = 1 - i
            mj = setting.marginal(j)
            c_j = mj.virtual_value(mj.icdf(jnp.asarray(theta)))
            truth.append(phi[j] <= jnp.maximum(phi[i] / a, c_j))
            grid, integral = _bic_integral_table(setting, i)
            gain = _bic_interim_gain(setting, i, v[..., i])
            pays.append(v[..., i] * gain - jnp.interp(v[..., i], grid, integral))
        informed = jnp.stack(truth, axis=-1)
        return MarketOutcome(
            experiments=_closed_form_experiments(informed, setting, wrong=True),
            pay=jnp.stack(pays, axis=-1),
        )

    def __call__(self, bids: Float[Array, "*batch buyers 1"]) -> Outcome:
        check_bids(bids, n_bidders=2, n_items=1)
        return _as_outcome(self.market_outcome(bids), self.setting)


# --------------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class MarketTrainConfig:
    """Hyperparameters of the multi-buyer training (augmented Lagrangian, RegretNet style).

    Attributes:
      hidden: units per hidden layer.
      layers: hidden layers.
      batch_size: ex post: fresh profiles per step.
      misreport_grid: ex post: misreports per buyer per step, a jittered quantile grid of its own
        distribution (so always on the true support).
      bic_types: BIC: own types per buyer per step (jittered quantiles); the step evaluates the
        product of all buyers' types (``bic_types ** buyers`` profiles), so the others' values are
        fresh every step and each type's interim quantities average over them.
      learning_rate: AdamW step size (cosine decay to ``final_lr_fraction`` of it).
      final_lr_fraction: see above.
      weight_decay: AdamW weight decay.
      lagrange_init: initial multiplier of every constraint (regret, obedience, IR per buyer).
      lagrange_every: steps between multiplier updates ``lambda += rho * violation``.
      rho_init: initial quadratic penalty weight.
      rho_increment: added to rho every ``rho_every`` steps.
      rho_every: see above.
    """

    hidden: int = 64
    layers: int = 2
    batch_size: int = 256
    misreport_grid: int = 48
    bic_types: int = 128
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.1
    weight_decay: float = 1e-4
    lagrange_init: float = 10.0
    lagrange_every: int = 100
    rho_init: float = 1.0
    rho_increment: float = 10.0
    rho_every: int = 1000


@struct.dataclass
class MarketTrainState:
    params: Any
    opt_state: Any
    lagrange: Any  # [3, buyers]: regret, obedience, IR
    rho: Any
    step: Any


def _quantile_grid(setting: MarketSetting, key: PRNGKeyArray, points: int) -> jax.Array:
    """``[points, buyers]`` jittered quantiles of every buyer's distribution (one per stratum)."""
    u = jnp.arange(points)[:, None] + jax.random.uniform(key, (points, setting.n_buyers))
    u = jnp.clip(u / points, 0.0, 1.0 - 1e-6)
    cols = [setting.marginal(i).icdf(u[:, i]) for i in range(setting.n_buyers)]
    return jnp.stack(cols, axis=-1).astype(jnp.float32)


def expost_violations(model, setting: MarketSetting, values, misreports):
    """Ex post constraint violations of a batch, per buyer, and the revenue.

    Args:
      model: a market mechanism (``market_outcome`` and ``__call__``).
      setting: the market.
      values: ``[batch, buyers, 1]`` true values.
      misreports: ``[reports, buyers, 1]`` misreports tried by every buyer at every profile.

    Returns:
      ``(revenue, {"regret", "obedience", "ir"} -> [buyers])``; regret is that of the joint
      deviation (misreport and then best-respond) against obedient truth-telling.
    """
    out = model.market_outcome(values)
    gains = market_gains(out.experiments, setting)
    v = values[..., 0]
    u_obedient = v * gains["gain_obedient"] - out.pay
    u_disobey = v * gains["gain_deviate"] - out.pay
    b, g = values.shape[0], misreports.shape[0]
    tiled = jnp.broadcast_to(values[:, None], (b, g, *values.shape[1:]))
    mis = jnp.broadcast_to(misreports[None], tiled.shape)
    u_mis = jnp.max(misreport_utility(model, tiled, mis), axis=1)  # [batch, buyers]
    regret = jax.nn.relu(jnp.maximum(u_mis, u_disobey) - u_obedient)
    return jnp.mean(jnp.sum(out.pay, -1)), {
        "regret": jnp.mean(regret, 0),
        "obedience": jnp.mean(jax.nn.relu(gains["best"] - gains["x"]), 0),
        "ir": jnp.mean(jax.nn.relu(-u_obedient), 0),
    }


def _interim(model, setting: MarketSetting, own: jax.Array, others: jax.Array | None = None):
    """Interim quantities of each buyer at each own report.

    Args:
      own: ``[K, buyers]`` own reports (column ``i`` for buyer ``i``).
      others: ``[M, buyers]`` the others' value profiles averaged over (default: ``own``, i.e.
        the product of all buyers' reports).

    Returns:
      dict of ``[K, buyers]`` arrays: ``x`` (interim chance of acting correctly, obedient),
      ``best`` (interim, best-responding), ``others_x`` (sum of the others' interim x), ``pay``.
    """
    n = setting.n_buyers
    others = own if others is None else others
    k, m = own.shape[0], others.shape[0]
    prior = jnp.asarray(setting.prior, jnp.float32)
    cols = {key: [] for key in ("x", "best", "others_x", "pay")}
    for i in range(n):
        profiles = jnp.broadcast_to(others[None], (k, m, n))
        profiles = profiles.at[:, :, i].set(jnp.broadcast_to(own[:, i : i + 1], (k, m)))
        out = model.market_outcome(profiles[..., None])
        bar = jnp.mean(out.experiments, axis=1)  # [K, buyers, states, signals]
        x_all = obedient_value(bar, prior)  # [K, buyers] (linear: interim x)
        cols["x"].append(x_all[:, i])
        cols["best"].append(decision_value(bar[:, i], prior))
        cols["others_x"].append(jnp.sum(x_all, -1) - x_all[:, i])
        cols["pay"].append(jnp.mean(out.pay[..., i], axis=1))
    return {key: jnp.stack(c, axis=-1) for key, c in cols.items()}


def bic_violations(model, setting: MarketSetting, own, others=None, reports=None):
    """Interim (BIC) constraint violations per buyer and the expected revenue.

    Every own type may report any of ``reports`` (default: the own types) and then best-respond
    to the interim experiment of that report.

    Returns:
      ``(revenue, {"regret", "obedience", "ir"} -> [K, buyers])`` per own type.
    """
    truth = _interim(model, setting, own, others)
    dev = truth if reports is None else _interim(model, setting, reports, others)
    ext = setting.alpha * truth["others_x"] + setting.outside_coefficient
    u_obedient = own * (truth["x"] - ext) - truth["pay"]
    dev_gain = dev["best"] - setting.alpha * dev["others_x"] - setting.outside_coefficient
    # u[k, r, i]: type k of buyer i reports r and best-responds
    u_dev = own[:, None, :] * dev_gain[None] - dev["pay"][None]
    u_truth_br = own * (truth["best"] - ext) - truth["pay"]
    best_dev = jnp.maximum(jnp.max(u_dev, axis=1), u_truth_br)
    return jnp.mean(jnp.sum(truth["pay"], -1)), {
        "regret": jax.nn.relu(best_dev - u_obedient),
        "obedience": jax.nn.relu(truth["best"] - truth["x"]),
        "ir": jax.nn.relu(-u_obedient),
    }


def _optimizer(config: MarketTrainConfig, steps: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(
        config.learning_rate, max(steps, 1), alpha=config.final_lr_fraction
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def _step_fn(graphdef, setting: MarketSetting, config: MarketTrainConfig, steps: int):
    opt = _optimizer(config, steps)

    def step(state: MarketTrainState, batch, key):
        del key

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            if setting.incentive == "expost":
                revenue, viol = expost_violations(
                    model, setting, batch["values"], batch["misreports"][..., None]
                )
            else:
                revenue, per_type = bic_violations(model, setting, batch["own"])
                viol = {k: jnp.mean(v, 0) for k, v in per_type.items()}
            c = jnp.stack([viol["regret"], viol["obedience"], viol["ir"]])  # [3, buyers]
            loss = -revenue + jnp.sum(state.lagrange * c) + 0.5 * state.rho * jnp.sum(c**2)
            return loss, (revenue, c)

        (loss, (revenue, c)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        t = state.step + 1
        lagrange = jnp.where(
            t % config.lagrange_every == 0, state.lagrange + state.rho * c, state.lagrange
        )
        rho = jnp.where(t % config.rho_every == 0, state.rho + config.rho_increment, state.rho)
        metrics = {
            "revenue": revenue,
            "regret": jnp.mean(c[0]),
            "obedience": jnp.mean(c[1]),
            "ir": jnp.mean(c[2]),
            "loss": loss,
            "rho": state.rho,
        }
        return MarketTrainState(params, opt_state, lagrange, rho, t), metrics

    return step


def _sample_fn(setting: MarketSetting, config: MarketTrainConfig):
    def sample(key, state):
        del state
        k_val, k_mis = jax.random.split(key)
        if setting.incentive == "expost":
            return {
                "values": setting.sample(k_val, (config.batch_size,)),
                "misreports": _quantile_grid(setting, k_mis, config.misreport_grid),
            }
        return {"own": _quantile_grid(setting, k_val, config.bic_types)}

    return sample


def _new_model(setting: MarketSetting, config: MarketTrainConfig, key) -> MarketNet:
    return MarketNet(setting, hidden=config.hidden, layers=config.layers, rngs=nnx.Rngs(params=key))


def train_market(
    setting: MarketSetting, config: MarketTrainConfig, train_config: TrainConfig
) -> tuple[MarketNet, TrainResult]:
    """Train a :class:`MarketNet` on ``setting`` through :func:`diffecon.train`."""
    if setting.incentive == "bic" and config.bic_types**setting.n_buyers > 2**20:
        raise ValueError(
            f"bic_types ** buyers = {config.bic_types**setting.n_buyers} profiles per step is "
            "too many; lower bic_types"
        )
    model = _new_model(setting, config, jax.random.key(train_config.seed))
    graphdef, params = nnx.split(model)
    steps = train_config.steps
    state = MarketTrainState(
        params=params,
        opt_state=_optimizer(config, steps).init(params),
        lagrange=jnp.full((3, setting.n_buyers), config.lagrange_init, jnp.float32),
        rho=jnp.asarray(config.rho_init, jnp.float32),
        step=jnp.asarray(0, jnp.int32),
    )
    result = train(
        state,
        _step_fn(graphdef, setting, config, steps),
        _sample_fn(setting, config),
        train_config,
        fingerprint={"setting": setting.name, **dataclasses.asdict(config)},
    )
    return nnx.merge(graphdef, result.state.params), result


def save_market(
    model: MarketNet,
    directory: str | Path,
    *,
    config: MarketTrainConfig,
    step: int,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Save a trained :class:`MarketNet` (parameters and config) with orbax."""
    _, params = nnx.split(model)
    meta = {
        "setting": model.setting.name,
        "market_config": dataclasses.asdict(config),
        **(extra_meta or {}),
    }
    return save_checkpoint(directory, step, params, meta=meta, max_to_keep=1)


def load_market(
    directory: str | Path, setting: MarketSetting
) -> tuple[MarketNet, MarketTrainConfig, dict[str, Any]]:
    """Load a :class:`MarketNet` saved by :func:`save_market`; ``ValueError`` if missing, for
    another setting, or corrupt."""
    step, meta = read_meta(directory, setting.name, "market")
    config = MarketTrainConfig(**meta["market_config"])
    graphdef, like = nnx.split(_new_model(setting, config, jax.random.key(0)))
    params, meta = restore_checkpoint(directory, like, step=step)
    return nnx.merge(graphdef, params), config, meta


# --------------------------------------------------------------------------------------------------
# Evaluation.

STRONG_SEARCH = RegretConfig(
    grid_points=201,
    n_starts=16,
    n_grid_starts=6,
    n_noise_starts=4,
    steps=100,
    learning_rate=0.02,
    profile_chunk=100,
)


def interim_metrics(
    mechanism,
    setting: MarketSetting,
    *,
    key: PRNGKeyArray,
    n_types: int = 1000,
    n_others: int = 1000,
    n_reports: int = 500,
) -> dict[str, Estimate]:
    """BIC metrics: interim regret (misreport on a grid, then best-respond to the interim
    experiment), interim obedience and IR violations, with SEs over sampled own types.

    Own types are ``n_types`` draws per buyer; the others' values are ``n_others`` quantile
    midpoints of each distribution (independently shuffled per buyer: exact quadrature for two
    buyers); reports are a ``n_reports``-point quantile grid plus the sampled types themselves.
    """
    k_types, k_perm = jax.random.split(key)
    own = setting.sample(k_types, (n_types,))[..., 0]  # [K, buyers]
    mids = (jnp.arange(n_others) + 0.5) / n_others
    cols = []
    for i in range(setting.n_buyers):
        perm = jax.random.permutation(jax.random.fold_in(k_perm, i), n_others)
        cols.append(setting.marginal(i).icdf(mids[perm]))
    others = jnp.stack(cols, -1).astype(jnp.float32)
    qs = (jnp.arange(n_reports) + 0.5) / n_reports
    grid = jnp.stack([setting.marginal(i).icdf(qs) for i in range(setting.n_buyers)], -1)
    reports = jnp.concatenate([grid.astype(jnp.float32), own], 0)

    @jax.jit
    def run(own, others, reports):
        return bic_violations(mechanism, setting, own, others, reports)

    _, per_type = jax.device_get(run(own, others, reports))
    return {
        name: mean_estimate(np.mean(np.asarray(x, np.float64), axis=-1))
        for name, x in (
            ("regret", per_type["regret"]),
            ("obedience_violation", per_type["obedience"]),
            ("ir_violation", per_type["ir"]),
        )
    }


def evaluate_market(
    mechanism,
    setting: MarketSetting,
    *,
    key: PRNGKeyArray,
    n_samples: int = 1_000_000,
    regret_profiles: int = 2000,
    regret_config: RegretConfig = STRONG_SEARCH,
    chunk_size: int = 100_000,
    progress: bool = False,
) -> dict[str, Estimate]:
    """Revenue, regret, obedience and IR violations of a market mechanism, each with its SE.

    Revenue on ``n_samples`` profiles. ``expost`` settings: ex post obedience and IR on the same
    profiles, and regret of the joint deviation (misreport, then disobey optimally) by
    :func:`diffecon.regret_search` on ``regret_profiles`` profiles. ``bic`` settings: the interim
    metrics of :func:`interim_metrics` on ``regret_profiles`` own types per buyer. Both report
    ``envelope_excess``, revenue minus the virtual surplus ``E[sum_i phi_i g_i]`` of the mechanism's
    own gains: IC and IR bound it by 0 (for BIC through the interim gains, whose virtual surplus is
    the same), so a positive excess is revenue bought with incentive violations, which regret,
    being second order in the payment distortion where the allocation is steep, can understate.
    """
    k_rev, k_prof, k_search = jax.random.split(key, 3)

    @jax.jit
    def chunk(k):
        values = setting.sample(k, (chunk_size,))
        out = mechanism.market_outcome(values)
        gains = market_gains(out.experiments, setting)
        u = values[..., 0] * gains["gain_obedient"] - out.pay
        phi = jnp.stack(
            [setting.marginal(i).virtual_value(values[..., i, 0]) for i in range(setting.n_buyers)],
            axis=-1,
        )
        return {
            "revenue": jnp.sum(out.pay, -1),
            # revenue - E[sum_i phi_i g_i]: at most 0 for an IC, IR mechanism (Myerson's
            # envelope); positive values are revenue that only incentive violations can buy
            "envelope_excess": jnp.sum(out.pay - phi * gains["gain_obedient"], -1),
            "obedience_expost": jnp.mean(jax.nn.relu(gains["best"] - gains["x"]), -1),
            "ir_expost": jnp.mean(jax.nn.relu(-u), -1),
        }

    parts: dict[str, list[np.ndarray]] = {}
    for c in range(-(-n_samples // chunk_size)):
        for name, x in jax.device_get(chunk(jax.random.fold_in(k_rev, c))).items():
            parts.setdefault(name, []).append(np.asarray(x, np.float64))
    est = {name: mean_estimate(np.concatenate(x)[:n_samples]) for name, x in parts.items()}
    if setting.incentive == "bic":
        est.update(interim_metrics(mechanism, setting, key=k_search, n_types=regret_profiles))
        return est
    values = setting.sample(k_prof, (regret_profiles,))
    found = regret_search(
        mechanism, values, key=k_search, setting=setting, config=regret_config, progress=progress
    )
    out = jax.jit(mechanism.market_outcome)(values)
    gains = market_gains(out.experiments, setting)
    gap = np.asarray(values[..., 0] * (gains["best"] - gains["x"]))
    joint = np.asarray(found.regret) + gap  # [profiles, buyers]
    est["regret"] = mean_estimate(joint.mean(-1))
    est["regret_max"] = Estimate(float(joint.max()), 0.0, regret_profiles)
    est["obedience_violation"] = est.pop("obedience_expost")
    est["ir_violation"] = est.pop("ir_expost")
    return est
