"""RegretNet (Dütting et al., 2019): a learned, approximately strategy-proof auction.

An allocation network (softmax over bidders plus a dummy bidder per item; for unit-demand bidders
the minimum of that and a softmax over items plus a dummy item per bidder) and a payment network
(a sigmoid fraction of the bidder's reported value for its allocation, so IR holds by
construction). Training maximises revenue under an augmented Lagrangian on each bidder's regret,
with misreports cached per training profile and refreshed by a few Adam steps every iteration,
exactly as the reference implementation does. Training runs through :func:`diffecon.train`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float, PRNGKeyArray

from diffecon.outcome import Outcome, check_bids, utility
from diffecon.regret import ascend_misreports, misreport_utility
from diffecon.settings import Setting
from diffecon.training import (
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "RegretNet",
    "RegretNetConfig",
    "RegretNetTrainState",
    "init_regretnet_state",
    "load_regretnet",
    "regretnet_sample_fn",
    "regretnet_step_fn",
    "save_regretnet",
    "train_regretnet",
]


class MLP(nnx.Module):
    """``layers`` hidden layers of width ``hidden`` (Glorot init) with ``activation``, then a linear
    output; shared by RegretNet and the data-market networks."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        hidden: int,
        layers: int,
        rngs: nnx.Rngs,
        activation=jnp.tanh,
    ):
        self.activation = activation
        init = nnx.initializers.glorot_uniform()
        sizes = [n_in] + [hidden] * layers
        self.hidden = nnx.List(
            [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.out = nnx.Linear(sizes[-1], n_out, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.out(x)


class RegretNet(nnx.Module):
    """RegretNet for additive or unit-demand bidders.

    ``model(bids [*batch, bidders, items]) -> Outcome``; pure (no RNG, no mutation).

    Args:
      n_bidders: number of bidders.
      n_items: number of items.
      valuation: ``additive`` or ``unit_demand``.
      hidden: units per hidden layer (the paper: 100).
      layers: hidden layers of each network (the paper: 2, i.e. ``num_a_layers = 3``).
      rngs: initialisation randomness.
    """

    def __init__(
        self,
        *,
        n_bidders: int,
        n_items: int,
        valuation: str = "additive",
        hidden: int = 100,
        layers: int = 2,
        rngs: nnx.Rngs,
    ):
        if valuation not in ("additive", "unit_demand"):
            raise ValueError(
                f"RegretNet supports additive and unit_demand bidders, got valuation={valuation!r}"
            )
        self.n_bidders, self.n_items, self.valuation = n_bidders, n_items, valuation
        n, m = n_bidders, n_items
        n_alloc = (n + 1) * m + (n * (m + 1) if valuation == "unit_demand" else 0)
        self.alloc_net = MLP(n * m, n_alloc, hidden=hidden, layers=layers, rngs=rngs)
        self.pay_net = MLP(n * m, n, hidden=hidden, layers=layers, rngs=rngs)

    @classmethod
    def for_setting(cls, setting: Setting, config: RegretNetConfig, *, rngs: nnx.Rngs) -> RegretNet:
        """A RegretNet shaped for ``setting`` with ``config``'s network sizes."""
        return cls(
            n_bidders=setting.n_bidders,
            n_items=setting.n_items,
            valuation=setting.valuation,
            hidden=config.hidden,
            layers=config.layers,
            rngs=rngs,
        )

    def __call__(self, bids: Float[Array, "*batch bidders items"]) -> Outcome:
        n, m = self.n_bidders, self.n_items
        check_bids(bids, n_bidders=n, n_items=m)
        batch = bids.shape[:-2]
        x = bids.reshape(-1, n * m)
        logits = self.alloc_net(x)
        by_bidder = jax.nn.softmax(logits[:, : (n + 1) * m].reshape(-1, n + 1, m), axis=1)[:, :n]
        if self.valuation == "unit_demand":
            by_item = jax.nn.softmax(logits[:, (n + 1) * m :].reshape(-1, n, m + 1), axis=2)
            alloc = jnp.minimum(by_bidder, by_item[:, :, :m])
        else:
            alloc = by_bidder
        fraction = jax.nn.sigmoid(self.pay_net(x))
        pay = fraction * jnp.sum(alloc * bids.reshape(-1, n, m), axis=-1)
        return Outcome(alloc=alloc.reshape(*batch, n, m), pay=pay.reshape(*batch, n))


@dataclasses.dataclass(frozen=True)
class RegretNetConfig:
    """RegretNet's hyperparameters (defaults: the reference configuration for 2x2).

    Attributes:
      hidden: units per hidden layer.
      layers: hidden layers per network.
      batch_size: profiles per step.
      train_set_size: size of the fixed training set whose misreports are cached between visits
        (0: fresh profiles every step with misreports started from prior samples).
      misreport_steps: Adam steps on the batch's misreports per iteration.
      misreport_lr: their step size, relative to the support width.
      misreport_grid: if > 0, before the Adam steps each bidder's cached misreport is replaced by
        the best point of a grid with this many points per item when that point is better (a
        stronger adversary than the paper's; for settings with at most two items).
      misreport_keep_best: keep each bidder's best Adam iterate instead of the last one. At the
        paper's step size the last iterate often overshoots, so the paper's adversary reports
        less regret than the strong test search finds (compare ``regretnet_stage1`` with the
        regret it logged in training, in benchmarks/results/revenue).
      misreport_final_lr_fraction: cosine-decay the misreport step size to this fraction of itself
        over the steps (1.0: constant, as in the paper).
      learning_rate: Adam step size of the networks.
      lagrange_init: initial Lagrange multiplier of each bidder's regret.
      lagrange_every: iterations between multiplier updates ``lambda += rho * regret``.
      rho_init: initial quadratic penalty weight.
      rho_increment: added to rho every ``rho_every`` iterations.
      rho_every: see above.
    """

    hidden: int = 100
    layers: int = 2
    batch_size: int = 128
    train_set_size: int = 640_000
    misreport_steps: int = 25
    misreport_lr: float = 0.1
    misreport_grid: int = 0
    misreport_keep_best: bool = False
    misreport_final_lr_fraction: float = 1.0
    learning_rate: float = 1e-3
    lagrange_init: float = 5.0
    lagrange_every: int = 100
    rho_init: float = 1.0
    rho_increment: float = 5.0
    rho_every: int = 10_000


@struct.dataclass
class RegretNetTrainState:
    """Everything a RegretNet run carries between steps (and checkpoints).

    Attributes:
      params: the network's ``nnx.State``.
      opt_state: optax state of the networks' Adam.
      lagrange: ``[bidders]`` multipliers.
      rho: quadratic penalty weight.
      step: iterations done.
      data: ``[train_set, bidders, items]`` fixed training profiles (empty if online).
      misreports: ``[train_set, bidders, items]`` cached misreports, row ``i`` bidder ``i``'s.
    """

    # Leaves annotated ``Any`` (not arrays): JAX rebuilds pytrees with placeholder leaves.
    params: Any
    opt_state: Any
    lagrange: Any
    rho: Any
    step: Any
    data: Any
    misreports: Any


def _optimizer(config: RegretNetConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


def init_regretnet_state(
    setting: Setting, config: RegretNetConfig, key: PRNGKeyArray
) -> tuple[nnx.GraphDef, RegretNetTrainState]:
    """Build a RegretNet for ``setting`` and its initial train state."""
    k_model, k_data, k_mis = jax.random.split(key, 3)
    model = RegretNet.for_setting(setting, config, rngs=nnx.Rngs(params=k_model))
    graphdef, params = nnx.split(model)
    size = config.train_set_size
    return graphdef, RegretNetTrainState(
        params=params,
        opt_state=_optimizer(config).init(params),
        lagrange=jnp.full((setting.n_bidders,), config.lagrange_init, jnp.float32),
        rho=jnp.asarray(config.rho_init, jnp.float32),
        step=jnp.asarray(0, jnp.int32),
        data=setting.sample(k_data, (size,)),
        misreports=setting.sample(k_mis, (size,)),
    )


def regretnet_sample_fn(setting: Setting, config: RegretNetConfig):
    """``(key, state) -> batch``: indices into the fixed set, or fresh profiles when online."""

    def sample(key, state: RegretNetTrainState):
        if config.train_set_size:
            return jax.random.randint(key, (config.batch_size,), 0, config.train_set_size)
        k_val, k_mis = jax.random.split(key)
        return {
            "values": setting.sample(k_val, (config.batch_size,)),
            "misreports": setting.sample(k_mis, (config.batch_size,)),
        }

    return sample


def _misreport_grid(setting: Setting, points: int) -> jax.Array:
    """``[grid, bidders, items]``: every bidder's reports on a regular grid over its support."""
    if setting.value_dim > 2 or not setting.bounded:
        raise ValueError(
            f"misreport_grid needs a bounded setting with at most two items; {setting.name!r} has "
            f"{setting.value_dim} and bounded={setting.bounded}"
        )
    axes = np.linspace(0.0, 1.0, points, dtype=np.float32)
    unit = np.stack(np.meshgrid(*[axes] * setting.value_dim, indexing="ij"), -1).reshape(
        -1, setting.value_dim
    )
    return jnp.asarray(setting.low[None] + unit[:, None, :] * (setting.high - setting.low)[None])


def _best_of_grid(model, values, mis, grid):
    """Replace each bidder's misreport by the best grid report where that is better."""
    u_grid = jax.vmap(
        lambda g: misreport_utility(model, values, jnp.broadcast_to(g, values.shape))
    )(grid)
    best = jnp.argmax(u_grid, axis=0)  # [batch, bidders]
    best_mis = grid[best, jnp.arange(values.shape[-2])]  # [batch, bidders, items]
    better = jnp.max(u_grid, axis=0) > misreport_utility(model, values, mis)
    return jnp.where(better[..., None], best_mis, mis)


def regretnet_step_fn(graphdef: nnx.GraphDef, setting: Setting, config: RegretNetConfig):
    """One RegretNet iteration: refresh misreports, step the networks, update the multipliers."""
    opt = _optimizer(config)
    grid = _misreport_grid(setting, config.misreport_grid) if config.misreport_grid else None
    width = setting.high - setting.low
    misreport_lr = config.misreport_lr * float(np.mean(np.where(np.isfinite(width), width, 1.0)))
    lr: float | optax.Schedule = misreport_lr
    if config.misreport_final_lr_fraction < 1.0:
        lr = optax.cosine_decay_schedule(
            misreport_lr, config.misreport_steps, alpha=config.misreport_final_lr_fraction
        )
    project = setting.project

    def step(state: RegretNetTrainState, batch, key):
        del key  # the iteration is deterministic given its batch
        if config.train_set_size:
            values, mis = state.data[batch], state.misreports[batch]
        else:
            values, mis = batch["values"], batch["misreports"]
        model = nnx.merge(graphdef, state.params)
        if grid is not None:
            mis = _best_of_grid(model, values, mis, grid)
        mis = ascend_misreports(
            model,
            values,
            mis,
            steps=config.misreport_steps,
            learning_rate=lr,
            project=project,
            keep_best=config.misreport_keep_best,
        )
        mis = jax.lax.stop_gradient(mis)

        def loss_fn(params):
            net = nnx.merge(graphdef, params)
            out = net(values)
            u_true = utility(values, out)
            u_mis = misreport_utility(net, values, mis)
            regret = jnp.mean(jax.nn.relu(u_mis - u_true), axis=0)  # [bidders]
            revenue = jnp.mean(out.revenue)
            loss = (
                -revenue + jnp.sum(state.lagrange * regret) + 0.5 * state.rho * jnp.sum(regret**2)
            )
            return loss, (revenue, regret)

        (loss, (revenue, regret)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        t = state.step + 1
        lagrange = jnp.where(
            t % config.lagrange_every == 0, state.lagrange + state.rho * regret, state.lagrange
        )
        rho = jnp.where(t % config.rho_every == 0, state.rho + config.rho_increment, state.rho)
        misreports = (
            state.misreports.at[batch].set(mis) if config.train_set_size else state.misreports
        )
        new = RegretNetTrainState(
            params=params,
            opt_state=opt_state,
            lagrange=lagrange,
            rho=rho,
            step=t,
            data=state.data,
            misreports=misreports,
        )
        metrics = {
            "revenue": revenue,
            "regret": jnp.mean(regret),
            "loss": loss,
            "lagrange": jnp.mean(state.lagrange),
            "rho": state.rho,
        }
        return new, metrics

    return step


def train_regretnet(
    setting: Setting,
    config: RegretNetConfig,
    train_config: TrainConfig,
    *,
    init_state: RegretNetTrainState | None = None,
    reset_multipliers: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> tuple[RegretNet, TrainResult]:
    """Train RegretNet on ``setting`` through the shared loop; returns the model and the run.

    Args:
      setting: an additive or unit-demand setting.
      config: network and training hyperparameters.
      train_config: steps, seed, checkpoints.
      init_state: continue from this state (e.g. the final state of an earlier stage trained with
        another config) instead of a fresh initialisation; its networks must match ``config``.
      reset_multipliers: with ``init_state``, restart the Lagrange multipliers and rho at
        ``config.lagrange_init`` and ``config.rho_init`` (e.g. to trade spare regret for revenue).
      fingerprint: extra facts a resumed run must share (e.g. which stage it continues).
    """
    if setting.valuation not in ("additive", "unit_demand"):
        raise ValueError(
            f"RegretNet supports additive and unit_demand settings; {setting.name!r} is "
            f"{setting.valuation}"
        )
    graphdef, state = init_regretnet_state(setting, config, jax.random.key(train_config.seed))
    if init_state is not None:
        fresh = state
        state = init_state
        if reset_multipliers:
            state = dataclasses.replace(state, lagrange=fresh.lagrange, rho=fresh.rho)
    result = train(
        state,
        regretnet_step_fn(graphdef, setting, config),
        regretnet_sample_fn(setting, config),
        train_config,
        fingerprint={
            "setting": setting.name,
            **dataclasses.asdict(config),
            **({"reset_multipliers": True} if reset_multipliers else {}),
            **(fingerprint or {}),
        },
    )
    return nnx.merge(graphdef, result.state.params), result


def save_regretnet(
    model: RegretNet,
    directory: str | Path,
    *,
    setting: Setting,
    config: RegretNetConfig,
    step: int,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Save a trained RegretNet's parameters and config (no optimiser state, no training set)."""
    _, params = nnx.split(model)
    meta = {
        "setting": setting.name,
        "regretnet_config": dataclasses.asdict(config),
        **(extra_meta or {}),
    }
    return save_checkpoint(directory, step, params, meta=meta, max_to_keep=1)


def load_regretnet(directory: str | Path, setting: Setting) -> tuple[RegretNet, dict[str, Any]]:
    """Load a RegretNet saved by :func:`save_regretnet` for ``setting``.

    Raises:
      ValueError: no checkpoint, a checkpoint for another setting, or a corrupt/mismatched one.
    """
    step = latest_checkpoint(directory)
    if step is None:
        raise ValueError(f"no RegretNet checkpoint in {str(directory)!r}")
    meta = json.loads((Path(directory).resolve() / f"step_{step:09d}" / "meta.json").read_text())
    if meta.get("setting") != setting.name:
        raise ValueError(
            f"checkpoint {str(directory)!r} holds a RegretNet for {meta.get('setting')!r}, "
            f"not {setting.name!r}"
        )
    config = RegretNetConfig(**meta["regretnet_config"])
    model = RegretNet.for_setting(setting, config, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split(model)
    params, meta = restore_checkpoint(directory, like, step=step)
    return nnx.merge(graphdef, params), meta
