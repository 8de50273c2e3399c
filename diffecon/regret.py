"""Misreports, regret and IR violation: the one search every package uses.

Kernel: ``misreport_utility`` evaluates, for every bidder ``i`` at once, the utility bidder ``i``
gets when it alone reports ``misreports[..., i, :]`` while the others report truthfully. It builds
``[..., deviator, bidders, items]`` profiles (RegretNet's mask trick) and calls the mechanism once
on the flattened batch, so a search over many starts is a single batched call per step.

Search: ``regret_search`` is the one evaluation protocol every package reports (``regret_mean``,
``regret_max``, ``regret_share_above_1e-3``, ``ir_violation`` via ``regret_stats``). For each
profile and bidder it takes the best of an exhaustive grid of misreports (value dimension <= 2) and
of projected Adam runs from many starts (the best grid points, truthful plus noise, prior samples);
``RegretConfig`` holds its hyperparameters, with ``quick()`` for tests and ``full()`` for
RegretNet's GPU protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm.auto import tqdm

from diffecon.outcome import Outcome, check_bids, utility
from diffecon.settings import Setting

__all__ = [
    "RegretConfig",
    "RegretResult",
    "ascend_misreports",
    "deviation_profiles",
    "misreport_utility",
    "regret_search",
    "regret_stats",
]

MechanismFn = Callable[[jax.Array], Outcome]


def deviation_profiles(
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
) -> Float[Array, "*batch deviators bidders items"]:
    """Profiles in which bidder ``i`` (axis ``deviators``) reports ``misreports[..., i, :]``.

    Entry ``[..., i, j, :]`` is ``misreports[..., i, :]`` when ``j == i`` and ``values[..., j, :]``
    otherwise.
    """
    n = values.shape[-2]
    eye = jnp.eye(n, dtype=values.dtype)[:, :, None]  # [deviators, bidders, 1]
    return values[..., None, :, :] * (1 - eye) + misreports[..., :, None, :] * eye


def misreport_utility(
    mechanism: MechanismFn,
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
) -> Float[Array, "*batch bidders"]:
    """Utility of each bidder ``i`` when it alone reports ``misreports[..., i, :]``.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      values: true values ``[*batch, bidders, items]``.
      misreports: ``[*batch, bidders, items]``; row ``i`` is bidder ``i``'s report.

    Returns:
      ``[*batch, bidders]`` utilities under true values.
    """
    n, d = values.shape[-2:]
    batch = values.shape[:-2]
    profiles = deviation_profiles(values, misreports)  # [*batch, dev, n, d]
    out = mechanism(profiles.reshape(-1, n, d))
    u = utility(
        jnp.broadcast_to(values[..., None, :, :], profiles.shape).reshape(-1, n, d), out
    )  # [B*dev, n]
    u = u.reshape(*batch, n, n)
    return jnp.diagonal(u, axis1=-2, axis2=-1)  # bidder i's utility in profile i


def ascend_misreports(
    mechanism: MechanismFn,
    values: Float[Array, "*batch bidders items"],
    misreports: Float[Array, "*batch bidders items"],
    *,
    steps: int,
    learning_rate: float | optax.Schedule,
    project: Callable[[jax.Array], jax.Array],
    keep_best: bool = False,
) -> Float[Array, "*batch bidders items"]:
    """Improve misreports by ``steps`` of projected Adam on each bidder's deviation utility.

    Gradients are stopped at the mechanism's parameters (only the misreports move). Each
    (profile, bidder) is optimised independently: Adam is coordinate-wise, so summing the utilities
    into one objective couples nothing.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      values: ``[*batch, bidders, items]`` true values.
      misreports: ``[*batch, bidders, items]`` starting points.
      steps: number of Adam steps (static).
      learning_rate: Adam step size (or an optax schedule).
      project: maps reports onto the support, e.g. ``setting.project``.
      keep_best: return each bidder's best iterate (all ``steps + 1`` count) instead of the last.
        Adam at a large step often overshoots (on first price it steps past the other bid into
        the losing region and stays there), so searches keep the best; the utilities come with the
        gradients, so this costs one extra mechanism call.

    Returns:
      The improved misreports, projected onto the support.
    """
    opt = optax.adam(learning_rate)
    values = jax.lax.stop_gradient(values)

    def objective(mis):
        u = misreport_utility(mechanism, values, mis)
        return -jnp.sum(u), u

    def keep_better(best_u, best_mis, u, mis):
        better = u > best_u
        return jnp.where(better, u, best_u), jnp.where(better[..., None], mis, best_mis)

    def body(carry, _):
        mis, state, best_u, best_mis = carry
        (_, u), grads = jax.value_and_grad(objective, has_aux=True)(mis)
        if keep_best:
            best_u, best_mis = keep_better(best_u, best_mis, u, mis)
        updates, state = opt.update(grads, state, mis)
        mis = project(cast(jax.Array, optax.apply_updates(mis, updates)))
        return (mis, state, best_u, best_mis), None

    mis0 = project(jax.lax.stop_gradient(misreports))
    best_u0 = jnp.full(mis0.shape[:-1], -jnp.inf, mis0.dtype)
    carry = (mis0, opt.init(mis0), best_u0, mis0)
    (mis, _, best_u, best_mis), _ = jax.lax.scan(body, carry, None, length=steps)
    if not keep_best:
        return mis
    return keep_better(best_u, best_mis, misreport_utility(mechanism, values, mis), mis)[1]


# --------------------------------------------------------------------------------------------------
# The shared regret search.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegretConfig:
    """Hyperparameters of :func:`regret_search`; the defaults are the CPU "strong" protocol.

    Each (profile, bidder) gets the best of: the truthful report; an exhaustive grid of
    ``grid_points`` per value dimension (only when the setting's value dimension is at most
    ``grid_max_dim``); and ``n_starts`` projected-Adam runs of ``steps`` steps whose starts are the
    ``n_grid_starts`` best grid points, the truthful report (once exactly, then plus Gaussian noise;
    ``n_noise_starts`` in all) and, for the rest, samples from the prior. Every Adam iterate counts
    as a searched misreport, not only the last one, so a run that overshoots a discontinuity (first
    price) keeps what it found.

    Lengths are relative to the search box ``[low, high]`` of the setting's support (for unbounded
    supports ``high`` is replaced by the larger of the prior's ``unbounded_quantile`` and the
    largest value searched; projection still only enforces ``low``): Adam's step size is
    ``learning_rate`` times the box's mean width, decayed along a cosine to ``final_lr_fraction`` of
    itself, and the noise has standard deviation ``noise_scale`` times the width of each coordinate.

    Attributes:
      grid_points: grid points per value dimension (0 disables the grid).
      grid_max_dim: largest value dimension searched exhaustively (combinatorial 2x2, with 3
        bundles, skips the grid by default).
      grid_chunk: grid points evaluated per step of the grid scan; memory grows with
        ``profile_chunk * grid_chunk * bidders**2 * value_dim``.
      n_starts: Adam starts per (profile, bidder), all kinds together (0 disables Adam).
      n_grid_starts: how many of the starts are the best grid misreports (when the grid runs;
        otherwise these starts are prior samples too).
      n_noise_starts: how many starts are the truthful report, exactly once and then plus noise.
      noise_scale: standard deviation of that noise, as a fraction of each coordinate's width.
      steps: Adam steps per start.
      learning_rate: initial Adam step size, as a fraction of the search box's mean width (on
        ``U[0, 1]`` settings this is the absolute step size).
      final_lr_fraction: the step size ends at this fraction of ``learning_rate`` (cosine decay;
        ``1.0`` keeps it constant, as RegretNet does).
      profile_chunk: profiles searched per jitted call; memory grows with
        ``profile_chunk * n_starts * bidders**2 * value_dim``.
      unbounded_quantile: prior quantile that bounds the grid, noise and Adam step on unbounded
        supports.
      unbounded_samples: prior draws used to estimate that quantile.
    """

    grid_points: int = 101
    grid_max_dim: int = 2
    grid_chunk: int = 1024
    n_starts: int = 100
    n_grid_starts: int = 10
    n_noise_starts: int = 10
    noise_scale: float = 0.1
    steps: int = 200
    learning_rate: float = 0.05
    final_lr_fraction: float = 0.01
    profile_chunk: int = 100
    unbounded_quantile: float = 0.999
    unbounded_samples: int = 16384

    def __post_init__(self):
        for name in ("grid_points", "grid_max_dim", "n_starts", "n_grid_starts", "n_noise_starts"):
            if getattr(self, name) < 0:
                raise ValueError(f"RegretConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("grid_chunk", "profile_chunk", "unbounded_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegretConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.grid_points == 1:
            raise ValueError("RegretConfig.grid_points must be 0 (no grid) or >= 2, got 1")
        if self.n_grid_starts + self.n_noise_starts > self.n_starts:
            raise ValueError(
                f"RegretConfig: n_grid_starts + n_noise_starts = "
                f"{self.n_grid_starts} + {self.n_noise_starts} exceeds n_starts = {self.n_starts}"
            )
        if self.steps < 0:
            raise ValueError(f"RegretConfig.steps must be >= 0, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"RegretConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(
                f"RegretConfig.final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}"
            )
        if not self.noise_scale >= 0:
            raise ValueError(f"RegretConfig.noise_scale must be >= 0, got {self.noise_scale}")
        if not 0 < self.unbounded_quantile < 1:
            raise ValueError(
                f"RegretConfig.unbounded_quantile must be in (0, 1), got {self.unbounded_quantile}"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> RegretConfig:
        """A cheap search for tests and smoke runs (11-point grid, 8 starts x 30 steps)."""
        quick = cls(
            grid_points=11,
            grid_chunk=128,
            n_starts=8,
            n_grid_starts=2,
            n_noise_starts=2,
            steps=30,
            learning_rate=0.05,
            profile_chunk=64,
        )
        return dataclasses.replace(quick, **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> RegretConfig:
        """RegretNet's test protocol: no grid, 1,000 prior starts x 2,000 Adam steps at lr 0.1.

        Sized for a GPU (Dütting et al. 2019, Section 5: 1,000 random initial misreports, 2,000
        gradient steps, evaluated on 10,000 profiles). On the 2-core CPU use the defaults.
        """
        full = cls(
            grid_points=0,
            n_starts=1000,
            n_grid_starts=0,
            n_noise_starts=0,
            steps=2000,
            learning_rate=0.1,
            final_lr_fraction=1.0,
            profile_chunk=100,
        )
        return dataclasses.replace(full, **overrides)


@struct.dataclass
class RegretResult:
    """What :func:`regret_search` found for each profile and bidder.

    Attributes:
      regret: ``[batch, bidders]`` best deviation utility found minus truthful utility, clipped at
        0 (ex post regret of each bidder at each profile).
      best_misreport: ``[batch, bidders, items]`` the report achieving it (the truthful value when
        no searched misreport beats truth-telling).
      truthful_utility: ``[batch, bidders]`` utility of truthful bidding.
      ir_violation: ``[batch, bidders]`` ``max(0, -truthful_utility)``.
    """

    regret: Float[Array, "batch bidders"]
    best_misreport: Float[Array, "batch bidders items"]
    truthful_utility: Float[Array, "batch bidders"]
    ir_violation: Float[Array, "batch bidders"]


def _grid(
    low: Float[Array, "bidders items"], high: Float[Array, "bidders items"], points: int
) -> Float[Array, "grid bidders items"]:
    """All ``points ** items`` grid misreports of each bidder's box ``[low, high]``."""
    d = low.shape[-1]
    index = np.stack(np.meshgrid(*[np.arange(points)] * d, indexing="ij"), -1).reshape(-1, d)
    frac = jnp.asarray(index / (points - 1), low.dtype)[:, None, :]  # [grid, 1, items]
    return low[None] + (high - low)[None] * frac


def _best_grid_points(
    mechanism: MechanismFn,
    values: Float[Array, "profiles bidders items"],
    grid: Float[Array, "grid bidders items"],
    *,
    keep: int,
    grid_chunk: int,
) -> tuple[Float[Array, "profiles keep bidders"], Float[Array, "profiles keep bidders items"]]:
    """The ``keep`` best grid misreports of each (profile, bidder), best first.

    Scans the grid in blocks of ``grid_chunk`` points, merging each block into a running top-k,
    so memory does not grow with the grid.
    """
    n_points = grid.shape[0]
    chunk = min(grid_chunk, n_points)
    n_blocks = -(-n_points // chunk)
    pad = n_blocks * chunk - n_points
    blocks = jnp.concatenate([grid, jnp.repeat(grid[:1], pad, axis=0)]).reshape(
        n_blocks, chunk, *grid.shape[1:]
    )
    valid = (np.arange(n_blocks * chunk) < n_points).reshape(n_blocks, chunk)
    n_profiles, n, d = values.shape
    block_values = jnp.broadcast_to(values[:, None], (n_profiles, chunk, n, d))

    def body(carry, block):
        best_u, best_mis = carry
        points, is_valid = block
        mis = jnp.broadcast_to(points[None], (n_profiles, chunk, n, d))
        u = misreport_utility(mechanism, block_values, mis)  # [profiles, chunk, bidders]
        # Padding points and NaN utilities (a mechanism failing off-support) never win.
        u = jnp.where(is_valid[None, :, None] & ~jnp.isnan(u), u, -jnp.inf)
        all_u = jnp.moveaxis(jnp.concatenate([best_u, u], axis=1), 1, -1)  # [P, n, keep+chunk]
        all_mis = jnp.moveaxis(jnp.concatenate([best_mis, mis], axis=1), 1, 2)  # [P, n, k+c, d]
        top_u, top = jax.lax.top_k(all_u, keep)  # [P, n, keep]
        top_mis = jnp.take_along_axis(all_mis, top[..., None], axis=2)  # [P, n, keep, d]
        return (jnp.moveaxis(top_u, -1, 1), jnp.moveaxis(top_mis, 2, 1)), None

    init = (
        jnp.full((n_profiles, keep, n), -jnp.inf, values.dtype),
        jnp.zeros((n_profiles, keep, n, d), values.dtype),
    )
    (best_u, best_mis), _ = jax.lax.scan(body, init, (blocks, jnp.asarray(valid)))
    return best_u, best_mis


def _start_counts(config: RegretConfig, value_dim: int) -> tuple[bool, int, int, int]:
    """``(use_grid, n_grid, n_noise, n_prior)``: how the ``n_starts`` Adam starts are made."""
    use_grid = config.grid_points > 0 and value_dim <= config.grid_max_dim
    n_grid = min(config.n_grid_starts, config.grid_points**value_dim) if use_grid else 0
    if config.n_starts == 0:
        return use_grid, 0, 0, 0
    return use_grid, n_grid, config.n_noise_starts, config.n_starts - n_grid - config.n_noise_starts


def _random_starts(
    values: Float[Array, "profiles bidders items"],
    key: PRNGKeyArray,
    first_profile: Int[Array, ""],
    search_high: Float[Array, "bidders items"],
    *,
    setting: Setting,
    n_noise: int,
    n_prior: int,
    noise_scale: float,
) -> Float[Array, "profiles starts bidders items"]:
    """Adam starts that need randomness: truthful (+ noise) first, then prior samples.

    Randomness comes from ``fold_in(key, first_profile + p)`` for profile ``p``, so a profile's
    starts do not depend on how the batch is cut into chunks. Kept apart from
    :func:`_search_chunk` so that its (slow to compile) random-bit generation is compiled once per
    setting and shape, whatever the mechanism.
    """
    n_profiles, n, d = values.shape
    profile_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        key, first_profile + jnp.arange(n_profiles)
    )
    noise_keys, prior_keys = jnp.moveaxis(jax.vmap(jax.random.split)(profile_keys), 1, 0)
    starts = [jnp.zeros((n_profiles, 0, n, d), values.dtype)]
    if n_noise > 0:
        noise = jax.vmap(lambda k: jax.random.normal(k, (n_noise, n, d), values.dtype))(noise_keys)
        noise = noise.at[:, 0].set(0.0)  # the first noisy start is the truthful report itself
        width = search_high - jnp.asarray(setting.low, values.dtype)
        starts.append(values[:, None] + noise_scale * width[None, None] * noise)
    if n_prior > 0:
        starts.append(jax.vmap(lambda k: setting.sample(k, (n_prior,)))(prior_keys))
    return setting.project(jnp.concatenate(starts, axis=1))


def _search_chunk(
    mechanism: MechanismFn,
    values: Float[Array, "profiles bidders items"],
    random_starts: Float[Array, "profiles random_starts bidders items"],
    search_high: Float[Array, "bidders items"],
    *,
    setting: Setting,
    config: RegretConfig,
) -> RegretResult:
    """Search misreports for one chunk of profiles (pure; :func:`regret_search` jits it).

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      values: ``[profiles, bidders, items]`` true values.
      random_starts: ``[profiles, random_starts, bidders, items]`` Adam starts from
        :func:`_random_starts`; the best grid points are added to them here.
      search_high: ``[bidders, items]`` upper end of the search box (the support's, or a finite
        stand-in for unbounded supports).
      setting: support and projection.
      config: search hyperparameters.
    """
    d = values.shape[-1]
    low = jnp.asarray(setting.low, values.dtype)
    width = search_high - low
    truthful = mechanism(values)
    if not isinstance(truthful, Outcome):
        raise ValueError(f"mechanism must return an Outcome, got {type(truthful).__name__}")
    if truthful.alloc.shape != values.shape or truthful.pay.shape != values.shape[:-1]:
        raise ValueError(
            f"mechanism on bids of shape {values.shape} must return alloc {values.shape} and pay "
            f"{values.shape[:-1]}, got alloc {truthful.alloc.shape} and pay {truthful.pay.shape}"
        )
    truthful_u = utility(values, truthful)  # [P, n]
    candidates_u, candidates_mis = [truthful_u[:, None]], [values[:, None]]

    use_grid, n_grid, _, _ = _start_counts(config, d)
    starts = random_starts
    if use_grid:
        grid = _grid(low, search_high, config.grid_points)
        grid_u, grid_mis = _best_grid_points(
            mechanism, values, grid, keep=max(n_grid, 1), grid_chunk=config.grid_chunk
        )
        candidates_u.append(grid_u[:, :1])
        candidates_mis.append(grid_mis[:, :1])
        starts = jnp.concatenate([grid_mis[:, :n_grid], starts], axis=1)

    if starts.shape[1] > 0:
        schedule = optax.cosine_decay_schedule(
            config.learning_rate * jnp.mean(width),
            decay_steps=max(config.steps, 1),
            alpha=config.final_lr_fraction,
        )
        start_values = jnp.broadcast_to(values[:, None], starts.shape)
        adam_mis = ascend_misreports(
            mechanism,
            start_values,
            starts,
            steps=config.steps,
            learning_rate=schedule,
            project=setting.project,
            keep_best=True,
        )
        adam_u = misreport_utility(mechanism, start_values, adam_mis)
        candidates_u.append(adam_u)
        candidates_mis.append(adam_mis)

    all_u = jnp.concatenate(candidates_u, axis=1)  # [P, candidates, n]; truthful first
    all_mis = jnp.concatenate(candidates_mis, axis=1)
    # argmax returns the first maximiser, so truth-telling wins ties.
    best = jnp.argmax(all_u, axis=1)  # [P, n]
    best_u = jnp.take_along_axis(all_u, best[:, None], axis=1)[:, 0]
    best_mis = jnp.take_along_axis(all_mis, best[:, None, :, None], axis=1)[:, 0]
    return RegretResult(
        regret=jnp.maximum(best_u - truthful_u, 0.0),
        best_misreport=best_mis,
        truthful_utility=truthful_u,
        ir_violation=jnp.maximum(-truthful_u, 0.0),
    )


def _search_box_high(
    setting: Setting, values: np.ndarray, key: PRNGKeyArray, config: RegretConfig
) -> np.ndarray:
    """``[bidders, items]`` upper end of the search box: the support's, or a finite stand-in."""
    high = np.asarray(setting.high, np.float32)
    if np.all(np.isfinite(high)):
        return high
    prior = np.asarray(setting.sample(key, (config.unbounded_samples,)))
    stand_in = np.maximum(
        np.quantile(prior, config.unbounded_quantile, axis=0), np.max(values, axis=0)
    )
    return np.where(np.isfinite(high), high, stand_in).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Structure:
    """Everything of a mechanism but its array leaves: the jit-static half of a mechanism."""

    treedef: Any
    static_leaves: tuple[Any, ...]  # None where an array leaf goes

    def rebuild(self, arrays: list[Any]) -> Any:
        it = iter(arrays)
        leaves = [next(it) if leaf is None else leaf for leaf in self.static_leaves]
        return jax.tree.unflatten(self.treedef, leaves)


def _partition_arrays(tree: Any) -> tuple[list[Any], _Structure]:
    """Split a pytree into its array leaves and the static rest.

    Lets ``regret_search`` pass a module's parameters to ``jax.jit`` as arguments (no constants
    baked into the executable, and one compilation for every module of the same structure) while
    plain functions and static fields are closed over.
    """
    leaves, treedef = jax.tree.flatten(tree)
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array, strict=True))
    return arrays, _Structure(treedef, static)


def _search_chunk_of_arrays(
    arrays: list[Any],
    values: Float[Array, "profiles bidders items"],
    random_starts: Float[Array, "profiles random_starts bidders items"],
    search_high: Float[Array, "bidders items"],
    *,
    structure: _Structure,
    setting: Setting,
    config: RegretConfig,
) -> RegretResult:
    mechanism = structure.rebuild(arrays)
    return _search_chunk(
        mechanism, values, random_starts, search_high, setting=setting, config=config
    )


# Compiled once per (mechanism structure, setting, config, chunk shape) and process, so that
# periodic evaluations during training do not recompile.
_search_chunk_jit = jax.jit(
    _search_chunk_of_arrays, static_argnames=("structure", "setting", "config")
)
_random_starts_jit = jax.jit(
    _random_starts, static_argnames=("setting", "n_noise", "n_prior", "noise_scale")
)


def regret_search(
    mechanism: MechanismFn,
    values: Float[Array, "batch bidders items"] | np.ndarray,
    *,
    key: PRNGKeyArray,
    setting: Setting,
    config: RegretConfig | None = None,
    progress: bool = True,
) -> RegretResult:
    """Ex post regret and IR violation of ``mechanism`` at each profile, by misreport search.

    For each profile and bidder, takes the best of the truthful report, an exhaustive grid (value
    dimension <= 2) and projected-Adam runs from many starts; see :class:`RegretConfig`. This is a
    public boundary called with concrete arrays, so unlike the rest of the library it jits: the
    profiles are searched ``config.profile_chunk`` at a time (the last chunk padded) by one pure
    function, compiled once per mechanism structure, setting, config and chunk shape and cached
    for the process (a mechanism's array leaves are arguments, so re-evaluating a module after
    training steps does not recompile; its static parts, such as a plain function, are held by
    the cache). Inputs are validated here, and a tqdm bar shows progress over profiles.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``; a pure function or a pytree (a frozen
        dataclass baseline or an NNX module, whose array leaves are passed to ``jax.jit`` as
        arguments). It must not read RNG or mutate state.
      values: ``[batch, bidders, items]`` true value profiles (``items`` is the setting's
        ``value_dim``: bundles for combinatorial settings).
      key: typed key (``jax.random.key``); same key, same result.
      setting: supplies the support (grid, projection), the prior (starts) and the shapes.
      config: search hyperparameters; ``RegretConfig()`` (the CPU strong protocol) if omitted.
      progress: show the progress bar.

    Returns:
      A :class:`RegretResult` with ``[batch, bidders]`` regrets, misreports, truthful utilities and
      IR violations.

    Raises:
      ValueError: if ``values`` is not ``[batch, bidders, value_dim]`` of the setting, has no
        profiles, contains NaN/inf or negative entries, if ``key`` is not a typed key, or if the
        mechanism's outcome has the wrong shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from diffecon.outcome import Outcome
      >>> from diffecon.settings import get_setting
      >>> def second_price(bids):  # bids [B, bidders, 1]
      ...     b = bids[..., 0]
      ...     win = jax.nn.one_hot(jnp.argmax(b, -1), b.shape[-1])
      ...     second = jnp.sort(b, -1)[..., -2]
      ...     return Outcome(alloc=win[..., None], pay=win * second[..., None])
      >>> setting = get_setting("single_item_2_uniform")
      >>> values = setting.sample(jax.random.key(0), 16)
      >>> result = regret_search(second_price, values, key=jax.random.key(1), setting=setting,
      ...                        config=RegretConfig.quick(), progress=False)
      >>> result.regret.shape
      (16, 2)
      >>> float(result.regret.max()) < 1e-6
      True
    """
    config = RegretConfig() if config is None else config
    n, d = setting.shape
    if np.ndim(values) != 3:
        raise ValueError(
            f"values must have shape [batch, bidders={n}, items={d}], got shape {np.shape(values)}"
        )
    check_bids(values, n_bidders=n, n_items=d, name="values")
    n_profiles = np.shape(values)[0]
    if n_profiles == 0:
        raise ValueError("values holds no profiles (batch size 0)")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise ValueError(
            "key must be a typed key from jax.random.key(seed), got "
            f"{type(key).__name__} with dtype {getattr(key, 'dtype', None)}"
        )
    if key.shape != ():
        raise ValueError(f"key must be a single key (shape ()), got shape {key.shape}")
    values = jnp.asarray(values, jnp.float32)

    range_key, search_key = jax.random.split(key)
    search_high = jnp.asarray(_search_box_high(setting, np.asarray(values), range_key, config))
    chunk = min(config.profile_chunk, n_profiles)
    n_chunks = -(-n_profiles // chunk)
    padded = jnp.concatenate(
        [values, jnp.repeat(values[-1:], n_chunks * chunk - n_profiles, axis=0)]
    )

    arrays, structure = _partition_arrays(mechanism)
    try:
        hash((structure, setting, config))
        search = functools.partial(
            _search_chunk_jit, structure=structure, setting=setting, config=config
        )
    except TypeError:  # an unhashable static field: compile for this call only
        search = jax.jit(
            functools.partial(
                _search_chunk_of_arrays, structure=structure, setting=setting, config=config
            )
        )
    _, _, n_noise, n_prior = _start_counts(config, d)
    draw_starts = functools.partial(
        _random_starts_jit,
        setting=setting,
        n_noise=n_noise,
        n_prior=n_prior,
        noise_scale=config.noise_scale,
    )
    results = []
    with tqdm(total=n_profiles, desc="regret search", unit="profile", disable=not progress) as bar:
        for c in range(n_chunks):
            start = c * chunk
            chunk_values = padded[start : start + chunk]
            first = jnp.asarray(start, jnp.int32)
            starts = draw_starts(chunk_values, search_key, first, search_high)
            out = search(arrays, chunk_values, starts, search_high)
            results.append(jax.block_until_ready(out))
            bar.update(min(chunk, n_profiles - start))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n_profiles], *results)


def _threshold_name(threshold: float) -> str:
    return np.format_float_scientific(threshold, trim="-", exp_digits=1)


def regret_stats(
    result: RegretResult, *, threshold: float = 1e-3
) -> dict[str, tuple[float, float]]:
    """The project's shared regret metrics as ``name -> (value, standard error)``.

    Standard errors are over profiles (profiles are i.i.d.; bidders within a profile are not):
    ``regret_mean`` and ``ir_violation`` average the per-profile bidder means, and
    ``regret_share_above_<threshold>`` (``regret_share_above_1e-3`` by default) averages each
    profile's share of bidders whose regret exceeds ``threshold``. ``regret_max`` has stderr 0.

    Args:
      result: output of :func:`regret_search`.
      threshold: regret above which a (profile, bidder) pair counts as violating.

    Returns:
      ``{"regret_mean", "regret_max", "regret_share_above_1e-3", "ir_violation"}`` mapped to
      ``(value, stderr)`` Python floats.
    """
    regret = np.asarray(result.regret, np.float64)
    ir = np.asarray(result.ir_violation, np.float64)

    def mean_se(per_profile):
        b = per_profile.shape[0]
        se = float(np.std(per_profile, ddof=1) / math.sqrt(b)) if b > 1 else 0.0
        return float(np.mean(per_profile)), se

    return {
        "regret_mean": mean_se(regret.mean(axis=1)),
        "regret_max": (float(regret.max()), 0.0),
        f"regret_share_above_{_threshold_name(threshold)}": mean_se(
            (regret > threshold).mean(axis=1)
        ),
        "ir_violation": mean_se(ir.mean(axis=1)),
    }
