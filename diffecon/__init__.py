"""diffecon: differentiable economics in JAX (the shared core).

The flat public API: settings and value distributions, the Outcome contract, classic baselines,
the shared regret search, the training loop, RegretNet, evaluation, the conformance checker and the
exact DSIC linear program of small discrete settings.
Submodules (``diffecon.baselines``, ``diffecon.plotting``, ...) hold the rest.
"""

from diffecon import plotting, testing
from diffecon.baselines import (
    BASELINE_NAMES,
    AffineMaximizer,
    MenuMechanism,
    affine_maximizer,
    bundle_myerson,
    first_price,
    fit_affine_maximizer,
    itemwise_myerson,
    make_baseline,
    optimal_menu,
    second_price,
    vcg,
    vvca,
)
from diffecon.distributions import (
    CombinatorialValues,
    Discrete,
    Exponential,
    IndependentValues,
    Lomax,
    Uniform,
)
from diffecon.evaluation import Estimate, evaluate, mean_estimate
from diffecon.optimal_lp import OptimalLP, optimal_dsic_lp
from diffecon.outcome import Mechanism, Outcome, check_bids, utility
from diffecon.regret import (
    RegretConfig,
    RegretResult,
    ascend_misreports,
    deviation_profiles,
    misreport_utility,
    regret_search,
    regret_stats,
)
from diffecon.regretnet import (
    RegretNet,
    RegretNetConfig,
    load_regretnet,
    save_regretnet,
    train_regretnet,
)
from diffecon.settings import Reference, Setting, get_setting, list_settings, register_setting
from diffecon.sharding import data_mesh
from diffecon.testing import check_mechanism
from diffecon.training import (
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "BASELINE_NAMES",
    "AffineMaximizer",
    "CombinatorialValues",
    "Discrete",
    "Estimate",
    "Exponential",
    "IndependentValues",
    "Lomax",
    "Mechanism",
    "MenuMechanism",
    "OptimalLP",
    "Outcome",
    "Reference",
    "RegretConfig",
    "RegretNet",
    "RegretNetConfig",
    "RegretResult",
    "Setting",
    "TrainConfig",
    "TrainResult",
    "Uniform",
    "affine_maximizer",
    "ascend_misreports",
    "bundle_myerson",
    "check_bids",
    "check_mechanism",
    "data_mesh",
    "deviation_profiles",
    "evaluate",
    "first_price",
    "fit_affine_maximizer",
    "get_setting",
    "itemwise_myerson",
    "latest_checkpoint",
    "list_settings",
    "load_regretnet",
    "make_baseline",
    "mean_estimate",
    "misreport_utility",
    "optimal_dsic_lp",
    "optimal_menu",
    "plotting",
    "register_setting",
    "regret_search",
    "regret_stats",
    "restore_checkpoint",
    "save_checkpoint",
    "save_regretnet",
    "second_price",
    "testing",
    "train",
    "train_regretnet",
    "utility",
    "vcg",
    "vvca",
]
