"""Trie-constrained beam search over semantic IDs, plain (TIGER) and bid-aware (GEM-Rec).

The valid IDs form a trie stored as a dense transition table ``T[state, code] -> next state``
(``-1``: no such child) with two roots: one for the organic catalogue (every item) and one for the
live ad inventory (sponsored items only). ``B[state]``, the largest bid among the ads under a
prefix, is a segment max of the bids over the ads' trie paths. Both are arrays, so the whole decode
(flag, ``levels`` unrolled beam steps, deterministic top-k) is static-shaped and runs inside one
``jax.jit``, batched over users. These functions do not jit; callers do.

Bid-aware decoding (GEM-Rec), with ``g(b) = log(1 + b)``:

* slot: ``z_AD += lam * g(b_max)`` (``b_max`` the highest live bid); the flag is then drawn from
  the two-way softmax with the caller's uniform ``u`` (``<AD>`` iff ``u < P(AD)``), a hard
  commitment;
* item, only under ``<AD>``: a candidate code's score (the beam's summed log-probability) gets
  ``+ lam * g(B(prefix))`` for the prefix it completes.

Ties in the top-k are broken by the lower flat index (beam-major, then code), so the decode is
deterministic. With ``lam = 0`` every bonus is an exact ``+ 0.0`` and the decode equals
:func:`constrained_beam_search`; under ``<ORG>`` no bid enters at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from genrec.model import AD, BOS, FIRST_CODE, ORG, PAD, GemRec

__all__ = [
    "Decoded",
    "ItemTrie",
    "bid_aware_beam_search",
    "bid_bonus",
    "build_trie",
    "constrained_beam_search",
    "prefix_max_bid",
]


@struct.dataclass
class ItemTrie:
    """Dense tries of the valid semantic IDs (organic catalogue and ad inventory).

    Attributes:
      transitions: ``[states, K]`` next state after a code (``-1``: invalid).
      leaf_item: ``[states]`` the item a complete ID names (``-1`` for inner states).
      ad_paths: ``[items, levels]`` the ad-trie state after each level of a sponsored item's ID
        (``states``, out of range, for items that do not advertise).
      root_org: the organic root state.
      root_ad: the ad root state.
      levels: code levels per ID.
    """

    transitions: Int[Array, "states codes"]
    leaf_item: Int[Array, " states"]
    ad_paths: Int[Array, "items levels"]
    root_org: int = struct.field(pytree_node=False)
    root_ad: int = struct.field(pytree_node=False)
    levels: int = struct.field(pytree_node=False)

    @property
    def n_states(self) -> int:
        return self.transitions.shape[0]


@struct.dataclass
class Decoded:
    """A batch of decodes.

    Attributes:
      is_ad: ``[batch]`` the committed flag.
      p_ad: ``[batch]`` P(``<AD>``) after the slot bonus.
      items: ``[batch, beam]`` decoded items, best first (``-1``: fewer valid IDs than beams).
      scores: ``[batch, beam]`` their beam scores (log-probability plus bid bonus).
    """

    is_ad: Bool[Array, " batch"]
    p_ad: Float[Array, " batch"]
    items: Int[Array, "batch beam"]
    scores: Float[Array, "batch beam"]


def build_trie(
    codes: Int[np.ndarray, "items levels"],
    sponsored: Bool[np.ndarray, " items"],
    *,
    codebook_size: int,
) -> ItemTrie:
    """The tries of ``codes`` (collision token included, so every ID is unique).

    Raises:
      ValueError: duplicate IDs, codes outside ``[0, codebook_size)`` or no sponsored item.
    """
    codes = np.asarray(codes)
    sponsored = np.asarray(sponsored, bool)
    if codes.ndim != 2 or sponsored.shape != codes.shape[:1]:
        raise ValueError(
            f"need codes [items, levels] and sponsored [items], got {codes.shape} and "
            f"{sponsored.shape}"
        )
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size})")
    if len({tuple(r) for r in codes.tolist()}) != len(codes):
        raise ValueError("semantic IDs are not unique; append the collision token first")
    if not sponsored.any():
        raise ValueError("the ad trie needs at least one sponsored item")
    n_items, levels = codes.shape
    children: list[dict[int, int]] = [{}, {}]  # state 0: organic root, state 1: ad root
    leaf = [-1, -1]
    paths = np.full((n_items, levels), -1, np.int64)

    def insert(root: int, item: int) -> list[int]:
        state, visited = root, []
        for code in codes[item].tolist():
            nxt = children[state].get(code)
            if nxt is None:
                nxt = len(children)
                children[state][code] = nxt
                children.append({})
                leaf.append(-1)
            state = nxt
            visited.append(state)
        leaf[state] = item
        return visited

    for item in range(n_items):
        insert(0, item)
    for item in np.flatnonzero(sponsored):
        paths[item] = insert(1, int(item))
    n_states = len(children)
    table = np.full((n_states, codebook_size), -1, np.int32)
    for s, kids in enumerate(children):
        for code, nxt in kids.items():
            table[s, code] = nxt
    paths[paths < 0] = n_states
    return ItemTrie(
        transitions=jnp.asarray(table),
        leaf_item=jnp.asarray(np.asarray(leaf, np.int32)),
        ad_paths=jnp.asarray(paths.astype(np.int32)),
        root_org=0,
        root_ad=1,
        levels=levels,
    )


def prefix_max_bid(
    trie: ItemTrie, bids: Float[Array, "*batch items"]
) -> Float[Array, "*batch states"]:
    """``B[state]``: the largest bid among the ads under each ad-trie prefix (0 elsewhere)."""
    segments = trie.ad_paths.reshape(-1)

    def one(b):
        values = jnp.repeat(b, trie.levels)
        top = jax.ops.segment_max(values, segments, num_segments=trie.n_states + 1)
        return jnp.where(jnp.isfinite(top[:-1]), top[:-1], 0.0)

    flat = bids.reshape(-1, bids.shape[-1])
    return jax.vmap(one)(flat).reshape(*bids.shape[:-1], trie.n_states)


def bid_bonus(
    bids: Float[Array, "*batch"], lam: Float[Array, ""] | float
) -> Float[Array, "*batch"]:
    """``lam * g(b)`` with GEM-Rec's ``g(b) = log(1 + b)``."""
    return lam * jnp.log1p(bids)


def _flag_logits(model: GemRec, cross_kv, valid):
    start = jnp.full((valid.shape[0], 1), BOS, jnp.int32)
    logits = model.decode(cross_kv, valid, start)[..., 0, :]
    return logits[..., ORG], logits[..., AD]


def _encode(model: GemRec, users, history):
    memory, valid = model.encode(users, history)
    return model.cross_kv(memory), valid


def _beam(model: GemRec, cross_kv, valid, is_ad, trie: ItemTrie, beam: int, bonus):
    """Constrained beam search under given flags; ``bonus [batch, states]`` added under AD."""
    batch = valid.shape[0]
    k = trie.transitions.shape[1]
    levels = trie.levels
    # the users' cross-attention keys/values broadcast over the beams, never copied
    kv = jax.tree.map(lambda a: a[:, None], cross_kv)
    val = valid[:, None]
    tokens = jnp.full((batch, beam, levels + 1), PAD, jnp.int32)
    tokens = tokens.at[..., 0].set(BOS).at[..., 1].set(jnp.where(is_ad, AD, ORG)[:, None])
    state = jnp.broadcast_to(
        jnp.where(is_ad, trie.root_ad, trie.root_org)[:, None], (batch, beam)
    ).astype(jnp.int32)
    score = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
    flat_index = jnp.broadcast_to(jnp.arange(beam * k), (batch, beam * k))
    for level in range(levels):
        # causal: the logits at position level + 1 need only the tokens up to it
        logits = model.decode(kv, val, tokens[..., : level + 2])[..., level + 1, :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = logp[..., FIRST_CODE + level * k : FIRST_CODE + (level + 1) * k]
        nxt = trie.transitions[state]  # [batch, beam, K]
        cand = score[..., None] + logp
        if bonus is not None:
            add = jnp.take_along_axis(
                bonus, jnp.maximum(nxt, 0).reshape(batch, beam * k), axis=-1
            ).reshape(batch, beam, k)
            cand = jnp.where(is_ad[:, None, None], cand + add, cand)
        cand = jnp.where(nxt >= 0, cand, -jnp.inf).reshape(batch, beam * k)
        neg, order = jax.lax.sort((-cand, flat_index), dimension=-1, num_keys=2)
        top, score = order[:, :beam], -neg[:, :beam]
        parent, code = top // k, top % k
        state = jnp.take_along_axis(nxt.reshape(batch, beam * k), top, axis=-1)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        if level + 2 <= levels:
            tokens = tokens.at[..., level + 2].set(FIRST_CODE + level * k + code)
    items = jnp.where(jnp.isfinite(score), trie.leaf_item[state], -1)
    return items, score


def constrained_beam_search(
    model: GemRec,
    users: Int[Array, " batch"],
    history: Int[Array, "batch history tokens"],
    uniform: Float[Array, " batch"],
    *,
    trie: ItemTrie,
    beam: int,
    flag: Bool[Array, " batch"] | None = None,
) -> Decoded:
    """Plain constrained decoding (TIGER with GEM-Rec's flag): no bids anywhere.

    The flag is ``<AD>`` iff ``uniform < P(AD | history)`` unless ``flag`` forces it; the items
    come from a beam search restricted to the organic or the ad trie accordingly.
    """
    cross_kv, valid = _encode(model, users, history)
    z_org, z_ad = _flag_logits(model, cross_kv, valid)
    p_ad = jax.nn.sigmoid(z_ad - z_org)
    is_ad = uniform < p_ad if flag is None else flag
    items, scores = _beam(model, cross_kv, valid, is_ad, trie, beam, None)
    return Decoded(is_ad=is_ad, p_ad=p_ad, items=items, scores=scores)


def bid_aware_beam_search(
    model: GemRec,
    users: Int[Array, " batch"],
    history: Int[Array, "batch history tokens"],
    bids: Float[Array, "batch items"],
    uniform: Float[Array, " batch"],
    *,
    trie: ItemTrie,
    lam: Float[Array, ""] | float,
    beam: int,
    flag: Bool[Array, " batch"] | None = None,
) -> Decoded:
    """GEM-Rec's bid-aware decoding (see the module docstring).

    Args:
      model: the trained encoder-decoder.
      users: ``[batch]`` user ids (hashed by the model).
      history: ``[batch, history, 1 + levels]`` impression tokens.
      bids: ``[batch, items]`` live bids per user's auction (0 for items that do not advertise).
      uniform: ``[batch]`` U(0, 1) draws that commit the flag.
      trie: the valid IDs.
      lam: bid weight ``lambda >= 0``.
      beam: beam width (the length of the returned lists).
      flag: force the flag instead of drawing it (``p_ad`` is still reported).
    """
    cross_kv, valid = _encode(model, users, history)
    z_org, z_ad = _flag_logits(model, cross_kv, valid)
    b_max = jnp.max(bids, axis=-1)
    p_ad = jax.nn.sigmoid(z_ad + bid_bonus(b_max, lam) - z_org)
    is_ad = uniform < p_ad if flag is None else flag
    bonus = bid_bonus(prefix_max_bid(trie, bids), lam)
    items, scores = _beam(model, cross_kv, valid, is_ad, trie, beam, bonus)
    return Decoded(is_ad=is_ad, p_ad=p_ad, items=items, scores=scores)
