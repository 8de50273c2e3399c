"""Training GemNet: soft choice with an annealed temperature and an incompatibility penalty.

Each bidder picks from its menu with weights ``softmax(kappa * u / scale)`` (``scale`` the largest
bundle value, so ``kappa`` is unit-free); ``kappa`` grows geometrically from ``kappa_init`` to
``kappa_final``. The loss is ``-revenue + lambda * I + rho / 2 * I^2`` where ``I`` is the expected
soft over-allocation ``E[sum_j relu(sum_i alloc_ij - 1 + margin)]`` and ``lambda`` is an augmented
Lagrange multiplier updated by ``lambda += rho * I``. Fresh profiles every step. The hard-choice
revenue and over-allocation rate are tracked alongside (they are what the repair and evaluation
see). Training runs through :func:`diffecon.train` (jit, sharding, checkpoints, resume, progress).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float, PRNGKeyArray

from diffecon.baselines import fit_affine_maximizer
from diffecon.distributions import Discrete, IndependentValues
from diffecon.outcome import Mechanism
from diffecon.settings import Setting
from diffecon.training import (
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    train,
)
from gemnet.model import (
    GemNet,
    GemNetConfig,
    Menus,
    choose,
    grid_cells,
    menu_utilities,
    quantize_bids,
    soft_choice,
)

__all__ = [
    "GemNetTrainConfig",
    "GemNetTrainState",
    "box_incompatibility",
    "gemnet_step_fn",
    "incompatibility",
    "load_gemnet",
    "over_allocation",
    "save_gemnet",
    "train_gemnet",
]


IMITATE = ("", "ama", "vvca")


@dataclasses.dataclass(frozen=True)
class GemNetTrainConfig:
    """GemNet's training hyperparameters.

    Attributes:
      network: the menu networks' shape.
      batch_size: fresh profiles per step.
      learning_rate: Adam step size (cosine-decayed to ``final_lr_fraction`` of itself).
      final_lr_fraction: see above.
      kappa_init: initial inverse temperature of the soft choice (utilities over the price scale).
      kappa_final: final inverse temperature, reached after ``anneal_fraction`` of the steps.
      anneal_fraction: share of the run over which ``kappa`` grows.
      lagrange_init: initial multiplier of the incompatibility.
      rho: quadratic penalty weight (also the multiplier's step size).
      lagrange_every: steps between multiplier updates.
      margin: over-allocation is penalised from ``1 - margin`` on.
      quantize_level: 0, or train the mechanism the quantized repair at ``max_level =
        quantize_level`` certifies: each bidder's menu is computed at the centre of the cell of
        ``b_-i`` on a grid of ``2^quantize_level`` cells per continuous coordinate (discrete ones
        are kept), so the penalty sees the conflicts of the quantized menus (those the repair
        must remove) during training.
      imitate: ``""`` (train for revenue), or ``"ama"``/``"vvca"``: an imitation stage that fits
        the soft choice's outcome (allocations and payments, squared error) to a teacher's, the
        affine maximiser of that kind fitted by :func:`diffecon.fit_affine_maximizer` (or the
        ``teacher`` given to :func:`train_gemnet`). An affine maximiser is a strategy-proof menu
        mechanism whose menus never over-allocate, so a later revenue stage starts near a
        compatible mechanism at the teacher's revenue instead of from random menus (the imitation
        itself still over-allocates along the teacher's coincident choice boundaries).
      penalty: what the incompatibility measures. ``"point"``: the soft choices at the sampled
        profile (:func:`incompatibility`). ``"box"`` (needs ``quantize_level``): the repair's own
        test on the finest box around the profile, softened (:func:`box_incompatibility`): each
        bidder's largest allocation among the elements that may be chosen somewhere in its cell
        of own values, so the network learns to leave the gaps between the bidders' choice
        boundaries that the repair would otherwise open with price rises over whole cells.
    """

    network: GemNetConfig = dataclasses.field(default_factory=GemNetConfig)
    batch_size: int = 4096
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05
    kappa_init: float = 20.0
    kappa_final: float = 2000.0
    anneal_fraction: float = 0.8
    lagrange_init: float = 1.0
    rho: float = 10.0
    lagrange_every: int = 50
    margin: float = 0.0
    quantize_level: int = 0
    penalty: str = "point"
    imitate: str = ""

    def __post_init__(self):
        if self.imitate not in IMITATE:
            raise ValueError(f"imitate must be one of {IMITATE}, got {self.imitate!r}")
        if self.penalty not in ("point", "box"):
            raise ValueError(f"penalty must be 'point' or 'box', got {self.penalty!r}")
        if self.penalty == "box" and self.quantize_level <= 0:
            raise ValueError(
                "penalty='box' tests the repair's finest boxes: set quantize_level "
                "(the repair's max_level)"
            )


@struct.dataclass
class GemNetTrainState:
    """A GemNet run's carried state: ``params``, ``opt_state``, ``lagrange``, ``step``."""

    params: Any
    opt_state: Any
    lagrange: Any
    step: Any


def incompatibility(
    alloc: Float[Array, "*batch bidders items"], *, margin: float = 0.0
) -> Float[Array, "*batch"]:
    """``sum_j relu(sum_i alloc_ij - 1 + margin)`` per profile (the penalised over-allocation)."""
    return jnp.sum(jax.nn.relu(jnp.sum(alloc, axis=-2) - 1.0 + margin), axis=-1)


def box_incompatibility(
    menus: Menus,
    lo: Float[Array, "*batch bidders items"],
    hi: Float[Array, "*batch bidders items"],
    *,
    kappa,
    margin: float = 0.0,
) -> Float[Array, "*batch"]:
    """The repair's finest-box test, softened: penalised over-allocation of a box of profiles.

    On the box ``[lo, hi]`` (each bidder's own values in a cell; ``menus`` fixed on it, as the
    quantized repair's are on its finest boxes) element ``k`` of bidder ``i`` is a candidate when
    its largest utility over the cell reaches the best smallest one; softly, with weight
    ``sigmoid(kappa * (u_hi_k - max_d u_lo_d))``. Per bidder and item the largest candidate
    allocation is taken, and the box is penalised like a profile (:func:`incompatibility`).
    Allocations are non-negative, so ``u_hi``/``u_lo`` are the utilities at ``hi``/``lo``.
    """
    u_hi, u_lo = menu_utilities(menus, hi), menu_utilities(menus, lo)  # [*batch, n, K + 1]
    best_lo = jnp.max(u_lo, axis=-1, keepdims=True)  # the null element's 0 included
    weight = jax.nn.sigmoid(kappa * (u_hi - best_lo))
    top = jnp.max(weight[..., None] * menus.alloc, axis=-2)  # [*batch, n, m]
    return incompatibility(top, margin=margin)


def over_allocation(alloc: Float[Array, "*batch bidders items"]) -> Float[Array, "*batch"]:
    """``max_j (sum_i alloc_ij - 1)^+`` per profile: how far a profile breaks feasibility."""
    return jnp.maximum(jnp.max(jnp.sum(alloc, axis=-2) - 1.0, axis=-1), 0.0)


def _schedules(config: GemNetTrainConfig, steps: int):
    lr = optax.cosine_decay_schedule(
        config.learning_rate, max(steps, 1), alpha=config.final_lr_fraction
    )
    anneal = max(int(config.anneal_fraction * steps), 1)
    ratio = np.log(config.kappa_final / config.kappa_init)

    def kappa(step):
        frac = jnp.minimum(step / anneal, 1.0)
        return config.kappa_init * jnp.exp(ratio * frac)

    return lr, kappa


def _optimizer(config: GemNetTrainConfig, steps: int) -> optax.GradientTransformation:
    return optax.adam(_schedules(config, steps)[0])


def _discrete_mask(setting: Setting) -> np.ndarray:
    """``[bidders, items]``: which value coordinates have a discrete marginal."""
    values = setting.values
    mask = np.zeros((setting.n_bidders, setting.n_items), bool)
    if isinstance(values, IndependentValues):
        for i, j in np.ndindex(*mask.shape):
            mask[i, j] = isinstance(values.marginal(i, j), Discrete)
    return mask


def init_gemnet_state(
    setting: Setting, config: GemNetTrainConfig, key: PRNGKeyArray, *, steps: int
) -> tuple[nnx.GraphDef, GemNetTrainState]:
    """Build a GemNet for ``setting`` and its initial train state."""
    model = GemNet.for_setting(setting, config.network, rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(model)
    return graphdef, GemNetTrainState(
        params=params,
        opt_state=_optimizer(config, steps).init(params),
        lagrange=jnp.asarray(config.lagrange_init, jnp.float32),
        step=jnp.asarray(0, jnp.int32),
    )


def gemnet_step_fn(
    graphdef: nnx.GraphDef,
    setting: Setting,
    config: GemNetTrainConfig,
    *,
    steps: int,
    teacher: Mechanism | None = None,
):
    """``(state, values, key) -> (state, metrics)``: one step of GemNet training.

    With ``config.imitate`` the step fits the soft outcome to ``teacher(values)`` (required then)
    instead of maximising the penalised revenue; the multiplier is left as it is.
    """
    if config.imitate and teacher is None:
        raise ValueError(f"imitate={config.imitate!r} needs the teacher mechanism")
    opt = _optimizer(config, steps)
    _, kappa_at = _schedules(config, steps)
    scale = float(np.max(np.sum(setting.high, axis=1)))

    # discrete coordinates stay as they are (as in the quantized repair)
    discrete = _discrete_mask(setting)

    grid = {"low": setting.low, "high": setting.high, "level": config.quantize_level}

    def menu_bids(values):
        if not config.quantize_level:
            return values
        return jnp.where(discrete, values, quantize_bids(values, **grid))

    def penalised(menus, soft, values, kappa):
        if config.penalty == "point":
            return incompatibility(soft.alloc, margin=config.margin)
        lo, hi = grid_cells(values, **grid)
        lo, hi = jnp.where(discrete, values, lo), jnp.where(discrete, values, hi)
        return box_incompatibility(menus, lo, hi, kappa=kappa, margin=config.margin)

    def step(state: GemNetTrainState, values, key):
        del key
        kappa = kappa_at(state.step)
        at = menu_bids(values)

        target = teacher(values) if teacher is not None and config.imitate else None

        def loss_fn(params):
            menus = nnx.merge(graphdef, params).menus(at)
            soft = soft_choice(menus, values, kappa=kappa / scale)
            revenue = jnp.mean(soft.revenue)
            penalty = jnp.mean(penalised(menus, soft, values, kappa / scale))
            if target is not None:
                # squared error of the outcome, payments in units of the value scale
                loss = jnp.mean(jnp.sum((soft.alloc - target.alloc) ** 2, axis=(-2, -1)))
                loss += jnp.mean(jnp.sum(((soft.pay - target.pay) / scale) ** 2, axis=-1))
            else:
                loss = -revenue + state.lagrange * penalty + 0.5 * config.rho * penalty**2
            return loss, (revenue, penalty, menus)

        (loss, (revenue, penalty, menus)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # the hard choice from the same forward pass's menus (no second pass through the network)
        hard_out = choose(menus, values).outcome
        over = over_allocation(hard_out.alloc)
        t = state.step + 1
        lagrange = jnp.where(
            (t % config.lagrange_every == 0) & (not config.imitate),
            state.lagrange + config.rho * penalty,
            state.lagrange,
        )
        metrics = {
            "revenue": revenue,
            "revenue_hard": jnp.mean(hard_out.revenue),
            "incompatibility": penalty,
            "over_allocation_rate": jnp.mean(over > 1e-6),
            "loss": loss,
            "kappa": kappa,
            "lagrange": state.lagrange,
        }
        return GemNetTrainState(params=params, opt_state=opt_state, lagrange=lagrange, step=t), (
            metrics
        )

    return step


def train_gemnet(
    setting: Setting,
    config: GemNetTrainConfig,
    train_config: TrainConfig,
    *,
    init_state: GemNetTrainState | None = None,
    reset_multipliers: bool = False,
    fingerprint: dict[str, Any] | None = None,
    teacher: Mechanism | None = None,
) -> tuple[GemNet, TrainResult]:
    """Train GemNet on ``setting`` through the shared loop; returns the model and the run.

    Args:
      setting, config, train_config: what to train, how, and for how many steps.
      init_state: continue from this state's parameters and multiplier (e.g. the final state of
        an earlier stage trained with another config) instead of a fresh initialisation; its
        networks must match ``config.network``. The optimizer and the schedules (learning rate,
        ``kappa``) start afresh for this run's config and steps.
      reset_multipliers: with ``init_state``, restart the multiplier at ``config.lagrange_init``
        (e.g. a final stage that pushes the remaining incompatibility down at a fixed ``kappa``).
      fingerprint: extra facts a resumed run must share (e.g. which stage it continues).
      teacher: with ``config.imitate``, the mechanism to imitate; by default the affine
        maximiser of kind ``config.imitate`` fitted on ``setting`` with ``train_config.seed``
        (:func:`diffecon.fit_affine_maximizer`, about a minute on a CPU).

    Raises:
      ValueError: a setting GemNet does not support (combinatorial valuations, unbounded support),
        or an ``init_state`` whose parameters do not fit ``config.network``.
    """
    steps = train_config.steps
    if config.imitate and teacher is None:
        teacher = fit_affine_maximizer(
            setting, kind=config.imitate, key=jax.random.key(train_config.seed)
        )
    elif teacher is not None and not config.imitate:
        raise ValueError("a teacher is only used by an imitation stage: set config.imitate")
    graphdef, state = init_gemnet_state(
        setting, config, jax.random.key(train_config.seed), steps=steps
    )
    if init_state is not None:

        def shapes(params):
            return jax.tree.structure(params), [jnp.shape(x) for x in jax.tree.leaves(params)]

        if shapes(init_state.params) != shapes(state.params):
            raise ValueError(
                "init_state's parameters do not match config.network "
                f"({config.network}): continue a stage with the same network shape"
            )
        # copies: the loop donates its state's buffers, and the caller keeps ``init_state``
        params = jax.tree.map(jnp.copy, init_state.params)
        state = dataclasses.replace(
            state,
            params=params,
            opt_state=_optimizer(config, steps).init(params),
            lagrange=state.lagrange if reset_multipliers else jnp.copy(init_state.lagrange),
        )

    def sample(key, state):
        del state
        return setting.sample(key, (config.batch_size,))

    result = train(
        state,
        gemnet_step_fn(graphdef, setting, config, steps=steps, teacher=teacher),
        sample,
        train_config,
        fingerprint={
            "setting": setting.name,
            "steps": steps,
            **_config_dict(config),
            **({"init_state": True} if init_state is not None else {}),
            **({"reset_multipliers": True} if reset_multipliers else {}),
            **(fingerprint or {}),
        },
    )
    return nnx.merge(graphdef, result.state.params), result


def _config_dict(config: GemNetTrainConfig) -> dict[str, Any]:
    flat = dataclasses.asdict(config)
    flat["network"] = dataclasses.asdict(config.network)
    return flat


def _config_from_dict(flat: dict[str, Any]) -> GemNetTrainConfig:
    flat = dict(flat)
    flat["network"] = GemNetConfig(**flat["network"])
    return GemNetTrainConfig(**flat)


def save_gemnet(
    model: GemNet,
    directory: str | Path,
    *,
    setting: Setting,
    config: GemNetTrainConfig,
    step: int,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Save a trained GemNet's parameters with its setting and config (orbax, atomic)."""
    _, params = nnx.split(model)
    meta = {"setting": setting.name, "gemnet_config": _config_dict(config), **(extra_meta or {})}
    return save_checkpoint(directory, step, params, meta=meta, max_to_keep=1)


def load_gemnet(
    directory: str | Path, setting: Setting
) -> tuple[GemNet, GemNetTrainConfig, dict[str, Any]]:
    """Load a GemNet saved by :func:`save_gemnet`; returns the model, its config and the meta.

    Raises:
      ValueError: no checkpoint, one for another setting, or a corrupt or mismatched one.
    """
    step = latest_checkpoint(directory)
    if step is None:
        raise ValueError(f"no GemNet checkpoint in {str(directory)!r}")
    meta_path = Path(directory).resolve() / f"step_{step:09d}" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        config = _config_from_dict(meta["gemnet_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt GemNet checkpoint meta {str(meta_path)!r}: {err}") from err
    if meta.get("setting") != setting.name:
        raise ValueError(
            f"checkpoint {str(directory)!r} holds a GemNet for {meta.get('setting')!r}, "
            f"not {setting.name!r}"
        )
    model = GemNet.for_setting(setting, config.network, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split(model)
    params, meta = restore_checkpoint(directory, like, step=step)
    return nnx.merge(graphdef, params), config, meta
