"""Regret of misreported bids: one position of the token auction as a diffecon mechanism.

Agent ``i`` has a private value ``w_i`` per unit of an allocation measure ``a_i(b)`` and utility
``w_i a_i(b) - z_i(b)``, where ``a_i`` is one of

* ``tv``: ``TV(q(b), q(b_i = 0))``, how far its bid moved the distribution (the envelope
  payments are Myerson's for this measure);
* ``kl``: the fall of its KL loss, ``L_i(q(0)) - L_i(q(b))`` (``KL(p_i || q)`` for the linear
  rule, ``KL(q || p_i)`` for the others; Myerson payments are built for it);
* ``token_change``: the probability that its bid changes the race's token (the race's payments
  are the critical bids of this measure).

:class:`PositionAuction` is a pure ``bids [B, agents, 1] -> Outcome(alloc, pay)`` over fixed
next-token distributions, so the core's :func:`diffecon.regret_search` measures its regret.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from diffecon.distributions import IndependentValues, Uniform
from diffecon.outcome import Outcome, check_bids
from diffecon.settings import Setting
from llm_auction.aggregation import aggregate
from llm_auction.payments import (
    _envelope,
    kl_allocation,
    race_expected_payments,
    token_disagreement,
    tv_allocation,
)

__all__ = ["PAYMENTS", "VALUATIONS", "PositionAuction", "bid_setting"]

Valuation = Literal["tv", "kl", "token_change"]
PaymentRule = Literal["race", "envelope", "myerson", "first_price"]
VALUATIONS: tuple[Valuation, ...] = ("tv", "kl", "token_change")
PAYMENTS: tuple[PaymentRule, ...] = ("race", "envelope", "myerson", "first_price")


def bid_setting(n_agents: int) -> Setting:
    """Values per unit ``w_i ~ U[0, 1]`` for ``n_agents`` agents (one 'item': the position)."""
    return Setting(
        name=f"llm_auction_{n_agents}_uniform",
        n_bidders=n_agents,
        n_items=1,
        valuation="additive",
        values=IndependentValues.iid(Uniform(0.0, 1.0), n_bidders=n_agents, n_items=1),
        description=f"{n_agents} LLM agents, value per unit of allocation U[0,1]",
    )


@struct.dataclass
class PositionAuction:
    """One position's auction over fixed distributions, as a mechanism of the core.

    Attributes:
      log_probs: ``[agents, vocab]`` the agents' next-token log-distributions.
      rule: aggregation rule name.
      payment: ``race`` (expected race payment; linear rule), ``envelope``, ``myerson`` or
        ``first_price`` (bid times allocation: a non-truthful baseline).
      valuation: the allocation measure ``a_i`` that values multiply.
      nodes: quadrature nodes of the numerical payments.
    """

    log_probs: Float[Array, "agents vocab"]
    rule: str = struct.field(pytree_node=False, default="linear")
    payment: str = struct.field(pytree_node=False, default="envelope")
    valuation: str = struct.field(pytree_node=False, default="tv")
    nodes: int = struct.field(pytree_node=False, default=32)

    def _kl_loss(self):
        return "forward" if self.rule == "linear" else "reverse"

    def _alloc_fn(self):
        return tv_allocation if self.valuation == "tv" else kl_allocation(self._kl_loss())

    def allocation(self, bids: Float[Array, " agents"]) -> Float[Array, " agents"]:
        """``a_i(b)`` for every agent."""
        if self.valuation == "token_change":
            others = jnp.sum(bids) - bids
            share = bids[None, :] / jnp.where(others > 0, others, 1.0)[:, None]
            d = jnp.sum(share * token_disagreement(jnp.exp(self.log_probs)), axis=1)
            return jnp.where(others > 0, d * bids / (bids + others), 0.0)
        alloc = self._alloc_fn()

        def one(i):
            b0 = bids.at[i].set(0.0)
            q = aggregate(jnp.stack([self.log_probs] * 2), jnp.stack([bids, b0]), rule=self.rule)
            return alloc(q[0], q[1], self.log_probs[i])

        return jax.vmap(one)(jnp.arange(bids.shape[-1]))

    def payments(self, bids: Float[Array, " agents"]) -> Float[Array, " agents"]:
        """``z_i(b)`` for every agent."""
        if self.payment == "race":
            return race_expected_payments(jnp.exp(self.log_probs), bids)
        if self.payment == "first_price":
            return bids * self.allocation(bids)
        alloc = tv_allocation if self.payment == "envelope" else kl_allocation(self._kl_loss())
        return _envelope(
            alloc,
            self.log_probs,
            bids,
            rule=self.rule,
            nodes=self.nodes,
            reference_log_probs=None,
            reference_weight=0.0,
            has_ref=False,
        )

    def __call__(self, bids: Float[Array, "*batch agents 1"]) -> Outcome:
        check_bids(bids, n_bidders=self.log_probs.shape[0], n_items=1)
        flat = bids[..., 0].reshape(-1, bids.shape[-2])
        alloc = jax.vmap(self.allocation)(flat)
        pay = jax.vmap(self.payments)(flat)
        batch = bids.shape[:-1]
        return Outcome(alloc=alloc.reshape(*batch, 1), pay=pay.reshape(batch))
