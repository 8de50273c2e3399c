"""diffecon: differentiable economics in JAX (shared core)."""

from diffecon.distributions import (
    CombinatorialValues,
    Discrete,
    Exponential,
    IndependentValues,
    Lomax,
    Uniform,
)
from diffecon.outcome import Mechanism, Outcome, check_bids, utility
from diffecon.regret import ascend_misreports, deviation_profiles, misreport_utility
from diffecon.settings import Reference, Setting, get_setting, list_settings, register_setting

__version__ = "0.1.0"

__all__ = [
    "CombinatorialValues",
    "Discrete",
    "Exponential",
    "IndependentValues",
    "Lomax",
    "Mechanism",
    "Outcome",
    "Reference",
    "Setting",
    "Uniform",
    "ascend_misreports",
    "check_bids",
    "deviation_profiles",
    "get_setting",
    "list_settings",
    "misreport_utility",
    "register_setting",
    "utility",
]
