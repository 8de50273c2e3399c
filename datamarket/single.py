"""One data buyer with a private prior (and, for enlarged types, a private value scale).

A seller posts a menu of experiments with prices plus a free uninformative item; the buyer of
type ``(prior, scale)`` buys the item maximising ``scale * decision_value(pi, prior) - price``
(Bergemann, Bonatti & Smolin, 2018). :class:`ExperimentMenu` learns such a menu RochetNet-style:
``K`` experiments as softmaxes of free logits (temperature ``experiment_temperature``), free
prices, and a soft choice (temperature ``choice_temperature``) during training; the hard choice
(argmax) at evaluation. :func:`prune_menu` drops, outside ``jit``, the items no type buys and
returns a :class:`Menu`, the explicit form that learned menus and the closed-form optima of the
spec share, so that :func:`evaluate_menu` measures both with the same code.

Type distributions are :class:`BuyerTypes`; the named settings of the spec are in
:data:`SINGLE_BUYER_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float, Int, PRNGKeyArray
from scipy import stats

from datamarket._checkpoints import read_meta
from datamarket.experiments import (
    check_experiment,
    check_payoff,
    decision_value,
    full_information,
    matching_payoff,
    obedient_value,
    plan_values,
    prior_value,
    softmax_experiment,
)
from diffecon.evaluation import Estimate, mean_estimate
from diffecon.training import (
    TrainConfig,
    TrainResult,
    restore_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "SINGLE_BUYER_SETTINGS",
    "BuyerTypes",
    "ExperimentMenu",
    "Menu",
    "MenuTrainConfig",
    "evaluate_menu",
    "full_information_menu",
    "load_menu",
    "mix_two_item_menu",
    "prune_menu",
    "save_menu",
    "train_menu",
]


@dataclasses.dataclass(frozen=True)
class BuyerTypes:
    """Distribution of a single buyer's type ``(prior, scale)`` with two states.

    ``prior = (t, 1 - t)`` with ``t`` drawn from a mixture of Beta distributions (``Beta(1, 1)``
    is ``U[0, 1]``); ``scale ~ U[scale_low, scale_high]`` for enlarged types, else 1.

    Attributes:
      name: registry name (``dm_single_uniform``...).
      beta_weights: mixture weights of the Beta components of ``t``.
      beta_a: first Beta parameters.
      beta_b: second Beta parameters.
      scale_low: lower end of the value scale (``None``: the scale is fixed at 1).
      scale_high: upper end of the value scale.
      payoff: ``[states, actions]`` decision payoff (``None``: matching utility).
      optimum: the optimal revenue where known (closed form or LP), for tables.
      optimum_source: where it comes from.
    """

    name: str
    beta_weights: tuple[float, ...] = (1.0,)
    beta_a: tuple[float, ...] = (1.0,)
    beta_b: tuple[float, ...] = (1.0,)
    scale_low: float | None = None
    scale_high: float = 1.0
    payoff: tuple[tuple[float, ...], ...] | None = None
    optimum: float | None = None
    optimum_source: str = ""

    def __post_init__(self):
        k = len(self.beta_weights)
        if not (len(self.beta_a) == len(self.beta_b) == k) or k == 0:
            raise ValueError("BuyerTypes needs one (weight, a, b) per Beta component")
        if (
            not math.isclose(sum(self.beta_weights), 1.0, abs_tol=1e-9)
            or min(self.beta_weights) < 0
        ):
            raise ValueError(f"Beta mixture weights must be >= 0 and sum to 1: {self.beta_weights}")
        if self.scale_low is not None and not 0 <= self.scale_low < self.scale_high:
            raise ValueError(f"need 0 <= scale_low < scale_high, got {self.scale_low}")
        if self.payoff is not None:
            check_payoff(np.asarray(self.payoff), n_states=2)

    @property
    def n_states(self) -> int:
        return 2

    @property
    def payoff_matrix(self) -> np.ndarray:
        """``[states, actions]`` (matching utility if none was given)."""
        if self.payoff is None:
            return matching_payoff(self.n_states)
        return np.asarray(self.payoff, np.float32)

    @property
    def n_actions(self) -> int:
        return self.payoff_matrix.shape[1]

    @property
    def enlarged(self) -> bool:
        return self.scale_low is not None

    def sample(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n states"], Float[Array, " n"]]:
        """``n`` types: priors ``[n, 2]`` and scales ``[n]``."""
        k_comp, k_beta, k_scale = jax.random.split(key, 3)
        comp = jax.random.choice(
            k_comp, len(self.beta_weights), (n,), p=jnp.asarray(self.beta_weights)
        )
        a = jnp.asarray(self.beta_a, jnp.float32)[comp]
        b = jnp.asarray(self.beta_b, jnp.float32)[comp]
        t = jax.random.beta(k_beta, a, b).astype(jnp.float32)
        priors = jnp.stack([t, 1.0 - t], axis=-1)
        if self.scale_low is None:
            scales = jnp.ones((n,), jnp.float32)
        else:
            scales = jax.random.uniform(k_scale, (n,), jnp.float32, self.scale_low, self.scale_high)
        return priors, scales

    def prior_quantiles(self, u: np.ndarray) -> np.ndarray:
        """Quantiles of ``t`` (numpy, float64), by bisection on the mixture CDF."""
        u = np.asarray(u, np.float64)
        lo, hi = np.zeros_like(u), np.ones_like(u)
        for _ in range(60):
            mid = (lo + hi) / 2
            cdf = sum(
                w * stats.beta.cdf(mid, a, b)
                for w, a, b in zip(self.beta_weights, self.beta_a, self.beta_b, strict=True)
            )
            lo, hi = np.where(cdf < u, mid, lo), np.where(cdf < u, hi, mid)
        return (lo + hi) / 2

    def grid(self, n_priors: int, n_scales: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A type grid for the LP: quantile midpoints, each of equal probability.

        Returns ``(priors [N, 2], scales [N], weights [N])`` with ``N = n_priors * n_scales``
        (``n_scales`` is ignored unless the types are enlarged).
        """
        t = self.prior_quantiles((np.arange(n_priors) + 0.5) / n_priors)
        if self.scale_low is None:
            scales = np.ones(1)
        else:
            scales = self.scale_low + (self.scale_high - self.scale_low) * (
                (np.arange(n_scales) + 0.5) / n_scales
            )
        tt, ss = np.meshgrid(t, scales, indexing="ij")
        priors = np.stack([tt.ravel(), 1 - tt.ravel()], -1)
        weights = np.full(tt.size, 1.0 / tt.size)
        return priors, ss.ravel(), weights


SINGLE_BUYER_SETTINGS: dict[str, BuyerTypes] = {
    s.name: s
    for s in (
        BuyerTypes(
            name="dm_single_uniform",
            optimum=1 / 8,
            optimum_source="full information at price 1/4 (Bergemann, Bonatti & Smolin 2018)",
        ),
        BuyerTypes(
            name="dm_single_mix",
            beta_weights=(0.5, 0.5),
            beta_a=(8.0, 60.0),
            beta_b=(30.0, 30.0),
            optimum=0.16732,
            optimum_source="full information at 0.2551 plus [[0.787, 0.213], [0, 1]] at 0.1380",
        ),
        BuyerTypes(
            name="dm_single_enlarged_uniform",
            scale_low=0.0,
            optimum=0.14233 * (1 - 2 * 0.14233 + 2 * 0.14233 * math.log(2 * 0.14233)),
            optimum_source="full information at p* = 0.14233, revenue p(1 - 2p + 2p ln 2p)",
        ),
        BuyerTypes(
            name="dm_single_3actions",
            payoff=((1.0, 0.0, 0.8), (0.0, 1.0, 0.8)),
            optimum=None,
            optimum_source="LP on a type grid (datamarket.optimal_menu_lp)",
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# Explicit menus: what learned menus are pruned into and what the closed forms are written as.


@struct.dataclass
class Menu:
    """An explicit menu: experiments with prices; the free uninformative item is implicit.

    Attributes:
      experiments: ``[items, states, signals]`` row-stochastic.
      prices: ``[items]``.
    """

    experiments: Any
    prices: Any

    def utilities(
        self,
        priors: Float[Array, "*batch states"],
        scales: Float[Array, "*batch"],
        payoff: np.ndarray | jax.Array | None = None,
    ) -> Float[Array, "*batch items_plus_1"]:
        """Utility over the no-information payoff of every item; the last column (0) opts out."""
        values = decision_value(self.experiments, priors[..., None, :], payoff)  # [*b, items]
        base = prior_value(priors, payoff)[..., None]
        u = scales[..., None] * (values - base) - self.prices
        return jnp.concatenate([u, jnp.zeros((*u.shape[:-1], 1), u.dtype)], axis=-1)

    def choose(
        self,
        priors: Float[Array, "*batch states"],
        scales: Float[Array, "*batch"],
        payoff: np.ndarray | jax.Array | None = None,
    ) -> Int[Array, "*batch"]:
        """Index of the item each type buys (``items`` = the uninformative item)."""
        return jnp.argmax(self.utilities(priors, scales, payoff), axis=-1)


def full_information_menu(price: float, n_states: int = 2) -> Menu:
    """Sell full information at ``price`` (the single-buyer optimum for uniform priors)."""
    return Menu(
        experiments=jnp.asarray(full_information(n_states))[None],
        prices=jnp.asarray([price], jnp.float32),
    )


def mix_two_item_menu() -> Menu:
    """The spec's optimum for the ``Mix`` prior: full information at 0.2551 plus a partial item."""
    partial = np.array([[0.787, 0.213], [0.0, 1.0]], np.float32)
    return Menu(
        experiments=jnp.asarray(np.stack([full_information(2), partial])),
        prices=jnp.asarray([0.2551, 0.1380], jnp.float32),
    )


def evaluate_menu(
    menu: Menu,
    types: BuyerTypes,
    *,
    key: PRNGKeyArray,
    n_samples: int = 1_000_000,
    chunk_size: int = 200_000,
) -> dict[str, Estimate]:
    """Revenue, regret, obedience and IR violations of a menu's direct mechanism, with SEs.

    Each type buys its favourite item; the direct mechanism recommends the action each signal of
    that item makes optimal (signals relabelled by the best response). Regret is the largest gain,
    over every menu item and every deviation plan (misreport and then disobey), above the
    recommended behaviour; obedience violation is the gain of disobeying one's own item's
    recommendations; IR violation is the shortfall below the uninformative payoff.
    """
    check_experiment(menu.experiments, n_states=types.n_states, name="menu.experiments")
    payoff = types.payoff_matrix
    n_actions = payoff.shape[1]
    ex = jnp.asarray(menu.experiments, jnp.float32)
    prices = jnp.asarray(menu.prices, jnp.float32)
    # Append the uninformative item (price 0) so the choice indexes every option.
    ex_all = jnp.concatenate([ex, jnp.ones((1, ex.shape[1], ex.shape[2])) / ex.shape[2]], axis=0)
    prices_all = jnp.concatenate([prices, jnp.zeros((1,))])

    @jax.jit
    def chunk(k):
        priors, scales = types.sample(k, chunk_size)
        full = Menu(ex, prices).utilities(priors, scales, payoff)
        choice = jnp.argmax(full, axis=-1)
        chosen = ex_all[choice]  # [B, states, signals]
        # Relabel the chosen item's signals by the buyer's best response: a recommendation.
        per_action = jnp.einsum("bw,bws,wa->bsa", priors, chosen, jnp.asarray(payoff))
        best = jnp.argmax(per_action, axis=-1)  # [B, signals]
        rec = jnp.einsum("bws,bsa->bwa", chosen, jax.nn.one_hot(best, n_actions))
        obedient = scales * obedient_value(rec, priors, payoff)
        deviations = scales[:, None] * jnp.max(
            plan_values(ex_all[None], priors[:, None], payoff), axis=-1
        )  # [B, items + 1]: best deviation plan on every item
        paid = prices_all[choice]
        truthful_u = obedient - paid
        regret = jax.nn.relu(jnp.max(deviations - prices_all, axis=-1) - truthful_u)
        own_best = scales * jnp.max(plan_values(rec, priors, payoff), axis=-1)
        return {
            "revenue": paid,
            "regret": regret,
            "obedience_violation": jax.nn.relu(own_best - obedient),
            "ir_violation": jax.nn.relu(scales * prior_value(priors, payoff) - truthful_u),
            "bought_informative": (choice < ex.shape[0]).astype(jnp.float32),
        }

    parts: dict[str, list[np.ndarray]] = {}
    for c in range(-(-n_samples // chunk_size)):
        out = jax.device_get(chunk(jax.random.fold_in(key, c)))
        for name, x in out.items():
            parts.setdefault(name, []).append(np.asarray(x, np.float64))
    return {name: mean_estimate(np.concatenate(xs)[:n_samples]) for name, xs in parts.items()}


# --------------------------------------------------------------------------------------------------
# The learned menu (RochetNet style).


class ExperimentMenu(nnx.Module):
    """``K`` learnable experiments with prices, plus the free uninformative item.

    Args:
      n_items: menu size ``K`` (the spec: 1000).
      n_states: states.
      n_signals: signals per experiment (the number of actions suffices).
      max_price: initial prices are drawn from ``U[0, max_price]``.
      experiment_temperature: softmax temperature of the experiments (the spec: 0.2).
      rngs: initialisation randomness.
    """

    def __init__(
        self,
        *,
        n_items: int,
        n_states: int = 2,
        n_signals: int = 2,
        max_price: float = 0.5,
        experiment_temperature: float = 0.2,
        rngs: nnx.Rngs,
    ):
        key = rngs.params()
        k_logits, k_prices = jax.random.split(key)
        self.logits = nnx.Param(jax.random.normal(k_logits, (n_items, n_states, n_signals)))
        self.prices = nnx.Param(jax.random.uniform(k_prices, (n_items,), maxval=max_price))
        self.experiment_temperature = experiment_temperature

    def experiments(self) -> Float[Array, "items states signals"]:
        return softmax_experiment(self.logits[...], temperature=self.experiment_temperature)

    def menu(self) -> Menu:
        """The full (unpruned) menu."""
        return Menu(experiments=self.experiments(), prices=self.prices[...])


def prune_menu(
    model: ExperimentMenu | Menu,
    types: BuyerTypes,
    *,
    key: PRNGKeyArray,
    n_samples: int = 200_000,
    min_share: float = 0.0,
    merge_tol: float = 1e-3,
) -> Menu:
    """Drop the items that no sampled type buys (or fewer than ``min_share``), outside ``jit``.

    Items whose experiments and prices agree within ``merge_tol`` are merged into one. Removing
    items nobody chooses leaves every type's choice, and so the mechanism, unchanged on the sample.
    """
    menu = model.menu() if isinstance(model, ExperimentMenu) else model
    priors, scales = types.sample(key, n_samples)
    choice = np.asarray(jax.jit(menu.choose)(priors, scales, types.payoff_matrix))
    n_items = menu.prices.shape[0]
    share = np.bincount(choice, minlength=n_items + 1)[:n_items] / n_samples
    keep = [k for k in np.argsort(-share) if share[k] > min_share]
    ex = np.asarray(menu.experiments)
    prices = np.asarray(menu.prices)
    kept: list[int] = []
    for k in keep:
        duplicate = any(
            np.max(np.abs(ex[k] - ex[j])) < merge_tol and abs(prices[k] - prices[j]) < merge_tol
            for j in kept
        )
        if not duplicate:
            kept.append(k)
    idx = np.asarray(kept, np.int64)
    if idx.size == 0:  # nobody buys: an empty menu (only the free item)
        return Menu(
            experiments=jnp.zeros((0, *ex.shape[1:]), jnp.float32),
            prices=jnp.zeros((0,), jnp.float32),
        )
    return Menu(experiments=jnp.asarray(ex[idx]), prices=jnp.asarray(prices[idx]))


@dataclasses.dataclass(frozen=True)
class MenuTrainConfig:
    """Hyperparameters of the menu training.

    Attributes:
      n_items: menu size ``K``.
      batch_size: fresh types per step.
      learning_rate: Adam step size (cosine decay to ``final_lr_fraction`` of it).
      final_lr_fraction: see above.
      experiment_temperature: softmax temperature of the experiments.
      choice_temperature: softmax temperature of the buyer's soft choice over utilities.
      max_price: initial prices are ``U[0, max_price]``.
    """

    n_items: int = 256
    batch_size: int = 8192
    learning_rate: float = 0.01
    final_lr_fraction: float = 0.05
    experiment_temperature: float = 0.2
    choice_temperature: float = 0.005
    max_price: float = 0.5


@struct.dataclass
class MenuTrainState:
    params: Any
    opt_state: Any


def _menu_model(types: BuyerTypes, config: MenuTrainConfig, key) -> ExperimentMenu:
    return ExperimentMenu(
        n_items=config.n_items,
        n_states=types.n_states,
        n_signals=types.n_actions,
        max_price=config.max_price,
        experiment_temperature=config.experiment_temperature,
        rngs=nnx.Rngs(params=key),
    )


def train_menu(
    types: BuyerTypes, config: MenuTrainConfig, train_config: TrainConfig
) -> tuple[ExperimentMenu, TrainResult]:
    """Learn a menu for ``types`` by maximising soft-choice revenue (via :func:`diffecon.train`)."""
    model = _menu_model(types, config, jax.random.key(train_config.seed))
    graphdef, params = nnx.split(model)
    opt = optax.adam(
        optax.cosine_decay_schedule(
            config.learning_rate, max(train_config.steps, 1), alpha=config.final_lr_fraction
        )
    )
    payoff = types.payoff_matrix

    def sample(key, state):
        del state
        return types.sample(key, config.batch_size)

    def step(state: MenuTrainState, batch, key):
        del key
        priors, scales = batch

        def loss_fn(p):
            menu = nnx.merge(graphdef, p).menu()
            u = menu.utilities(priors, scales, payoff)
            weights = jax.nn.softmax(u / config.choice_temperature, axis=-1)
            prices = jnp.concatenate([menu.prices, jnp.zeros((1,))])
            soft_revenue = jnp.mean(weights @ prices)
            hard_revenue = jnp.mean(prices[jnp.argmax(u, axis=-1)])
            return -soft_revenue, hard_revenue

        (loss, hard), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return MenuTrainState(params, opt_state), {"revenue": -loss, "revenue_hard": hard}

    result = train(
        MenuTrainState(params, opt.init(params)),
        step,
        sample,
        train_config,
        fingerprint={"setting": types.name, **dataclasses.asdict(config)},
    )
    return nnx.merge(graphdef, result.state.params), result


def save_menu(
    model: ExperimentMenu,
    directory: str | Path,
    *,
    types: BuyerTypes,
    config: MenuTrainConfig,
    step: int,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Save a trained menu's parameters with its config (orbax, via diffecon's checkpoints)."""
    _, params = nnx.split(model)
    meta = {"setting": types.name, "menu_config": dataclasses.asdict(config), **(extra_meta or {})}
    return save_checkpoint(directory, step, params, meta=meta, max_to_keep=1)


def load_menu(
    directory: str | Path, types: BuyerTypes
) -> tuple[ExperimentMenu, MenuTrainConfig, dict[str, Any]]:
    """Load a menu saved by :func:`save_menu`; ``ValueError`` if missing, foreign or corrupt."""
    step, meta = read_meta(directory, types.name, "menu")
    config = MenuTrainConfig(**meta["menu_config"])
    graphdef, like = nnx.split(_menu_model(types, config, jax.random.key(0)))
    params, meta = restore_checkpoint(directory, like, step=step)
    return nnx.merge(graphdef, params), config, meta
