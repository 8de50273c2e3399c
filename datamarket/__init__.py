"""datamarket: revenue-optimal data markets with obedience (Ravindranath, Jiang & Parkes, 2023).

A seller of information designs experiments (signaling schemes: row-stochastic matrices
``pi[state, signal]``) and prices. :mod:`datamarket.experiments` holds the building blocks (values
of experiments, obedience, deviation plans); :mod:`datamarket.single` one buyer with a private
prior (RochetNet-style menus of experiments), :mod:`datamarket.lp` the exact optimum on a type grid
by linear programming (OR-Tools GLOP); :mod:`datamarket.multi` several competing buyers
(RegretNet-style networks trained with an augmented Lagrangian on regret, obedience and IR, ex post
or Bayesian incentive compatible) and the closed-form optima of the theory as mechanisms.
"""

from datamarket.experiments import (
    check_experiment,
    check_prior,
    decision_value,
    deviation_plans,
    full_information,
    matching_payoff,
    no_information,
    obedience_violation,
    obedient_value,
    plan_values,
    prior_value,
    softmax_experiment,
)
from datamarket.lp import LPMenu, optimal_menu_lp
from datamarket.multi import (
    MARKET_SETTINGS,
    BICOptimal,
    ExPostOptimal,
    MarketNet,
    MarketOutcome,
    MarketSetting,
    MarketTrainConfig,
    PiecewiseUniform,
    bic_violations,
    evaluate_market,
    expost_violations,
    interim_metrics,
    load_market,
    market_gains,
    save_market,
    train_market,
)
from datamarket.single import (
    SINGLE_BUYER_SETTINGS,
    BuyerTypes,
    ExperimentMenu,
    Menu,
    MenuTrainConfig,
    evaluate_menu,
    full_information_menu,
    load_menu,
    mix_two_item_menu,
    prune_menu,
    save_menu,
    train_menu,
)

__all__ = [
    "MARKET_SETTINGS",
    "SINGLE_BUYER_SETTINGS",
    "BICOptimal",
    "BuyerTypes",
    "ExPostOptimal",
    "ExperimentMenu",
    "LPMenu",
    "MarketNet",
    "MarketOutcome",
    "MarketSetting",
    "MarketTrainConfig",
    "Menu",
    "MenuTrainConfig",
    "PiecewiseUniform",
    "bic_violations",
    "check_experiment",
    "check_prior",
    "decision_value",
    "deviation_plans",
    "evaluate_market",
    "evaluate_menu",
    "expost_violations",
    "full_information",
    "full_information_menu",
    "get_setting",
    "interim_metrics",
    "list_settings",
    "load_market",
    "load_menu",
    "market_gains",
    "matching_payoff",
    "mix_two_item_menu",
    "no_information",
    "obedience_violation",
    "obedient_value",
    "optimal_menu_lp",
    "plan_values",
    "prior_value",
    "prune_menu",
    "save_market",
    "save_menu",
    "softmax_experiment",
    "train_market",
    "train_menu",
]


def list_settings() -> list[str]:
    """Names of the data-market settings (single buyer and markets), in the spec's order."""
    return [*SINGLE_BUYER_SETTINGS, *MARKET_SETTINGS]


def get_setting(name: str) -> BuyerTypes | MarketSetting:
    """A data-market setting by name; ``ValueError`` naming close matches if unknown."""
    import difflib

    if name in SINGLE_BUYER_SETTINGS:
        return SINGLE_BUYER_SETTINGS[name]
    if name in MARKET_SETTINGS:
        return MARKET_SETTINGS[name]
    close = difflib.get_close_matches(str(name), list_settings(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown data-market setting {name!r}{hint}")
