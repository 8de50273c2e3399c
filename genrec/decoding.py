"""Trie-constrained decoding over semantic IDs, plain (TIGER) and bid-aware (GEM-Rec).

The valid IDs form a trie stored as a dense transition table ``T[state, code] -> next state``
(``-1``: no such child) with two roots: one for the organic catalogue (every item) and one for the
live ad inventory (sponsored items only). ``B[state]``, the largest bid among the ads under a
prefix, is a segment max of the bids over the ads' trie paths. Both are arrays, so the whole decode
is static-shaped and runs inside one ``jax.jit``, batched over users. These functions do not jit;
callers do.

* Under ``<ORG>``: a beam search over the catalogue trie (``levels`` unrolled steps,
  deterministic top-k, ties to the lower flat index, beam-major then code). No bid enters.
* Under ``<AD>``: the ad inventory is small, so it is decoded *exactly*: every live ad's ID is
  scored in one teacher-forced decoder pass (a beam search of unlimited width) and the top-k
  taken, ties to the lower ad index. Exactness is what makes the allocation monotone: with a beam
  of limited width, raising ``b_i`` lifts every prefix ``i`` shares into the beam and can let a
  sibling of ``i`` that the narrower search had pruned overtake it (the monotonicity property test
  found such cases).

Bid-aware decoding (GEM-Rec), with ``g(b) = log(1 + b)``:

* slot: ``z_AD += lam * g(b_max)`` (``b_max`` the highest live bid); the flag is then drawn from
  the two-way softmax with the caller's uniform ``u`` (``<AD>`` iff ``u < P(AD)``), a hard
  commitment;
* item, only under ``<AD>``: an ad's score (its ID's log-probability) gets
  ``+ lam * g(B(prefix))`` for each prefix along its ID, the level-wise bonus of the paper.

Raising ``b_i`` raises ``B`` only on ``i``'s own prefixes, so ``i``'s score gains at least what
any rival's gains, and the exact top-1 stays ``i`` (GEM-Rec's Proposition 1). With ``lam = 0``
every bonus is an exact ``+ 0.0`` and the decode equals :func:`constrained_beam_search`.
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
    "live_states",
    "prefix_max_bid",
]


@struct.dataclass
class ItemTrie:
    """Dense tries of the valid semantic IDs (organic catalogue and ad inventory).

    Attributes:
      transitions: ``[states, K]`` next state after a code (``-1``: invalid).
      leaf_item: ``[states]`` the item a complete ID names (``-1`` for inner states).
      org_paths: ``[items, levels]`` the organic-trie state after each level of an item's ID.
      ad_items: ``[ads]`` the sponsored items, in index order.
      ad_codes: ``[ads, levels]`` their IDs.
      ad_paths: ``[items, levels]`` the ad-trie state after each level of a sponsored item's ID
        (``states``, out of range, for items that do not advertise).
      root_org: the organic root state.
      root_ad: the ad root state.
      levels: code levels per ID.
    """

    transitions: Int[Array, "states codes"]
    leaf_item: Int[Array, " states"]
    org_paths: Int[Array, "items levels"]
    ad_items: Int[Array, " ads"]
    ad_codes: Int[Array, "ads levels"]
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
    org_paths = np.zeros((n_items, levels), np.int64)

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
        org_paths[item] = insert(0, item)
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
        org_paths=jnp.asarray(org_paths.astype(np.int32)),
        ad_items=jnp.asarray(np.flatnonzero(sponsored).astype(np.int32)),
        ad_codes=jnp.asarray(codes[sponsored].astype(np.int32)),
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


def live_states(
    trie: ItemTrie, exclude: Bool[Array, "*batch items"]
) -> Bool[Array, "*batch states"]:
    """Which trie states still lead to an item outside ``exclude`` (e.g. items already seen)."""
    segments = jnp.concatenate([trie.org_paths.reshape(-1), trie.ad_paths.reshape(-1)])

    def one(ex):
        keep = jnp.repeat(~ex, trie.levels).astype(jnp.int32)
        count = jax.ops.segment_sum(
            jnp.concatenate([keep, keep]), segments, num_segments=trie.n_states + 1
        )
        return count[:-1] > 0

    flat = exclude.reshape(-1, exclude.shape[-1])
    return jax.vmap(one)(flat).reshape(*exclude.shape[:-1], trie.n_states)


def _exclusion(trie: ItemTrie, bids, exclude):
    """``(bids, live)`` for a user's live inventory: excluded ads bid nothing, and ``live``
    (``None`` without an exclusion) marks the trie states that still lead to an allowed item."""
    if exclude is None:
        return bids, None
    return jnp.where(exclude, 0.0, bids), live_states(trie, exclude)


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


def _beam(model: GemRec, cross_kv, valid, trie: ItemTrie, beam: int, live=None):
    """Beam search over the catalogue trie under ``<ORG>``; ``live [batch, states]``
    (optional) prunes states with no allowed item below them."""
    batch = valid.shape[0]
    k = trie.transitions.shape[1]
    levels = trie.levels
    # the users' cross-attention keys/values broadcast over the beams, never copied
    kv = jax.tree.map(lambda a: a[:, None], cross_kv)
    val = valid[:, None]
    tokens = jnp.full((batch, beam, levels + 1), PAD, jnp.int32)
    tokens = tokens.at[..., 0].set(BOS).at[..., 1].set(ORG)
    state = jnp.full((batch, beam), trie.root_org, jnp.int32)
    score = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
    flat_index = jnp.broadcast_to(jnp.arange(beam * k), (batch, beam * k))
    for level in range(levels):
        # causal: the logits at position level + 1 need only the tokens up to it
        logits = model.decode(kv, val, tokens[..., : level + 2])[..., level + 1, :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = logp[..., FIRST_CODE + level * k : FIRST_CODE + (level + 1) * k]
        nxt = trie.transitions[state]  # [batch, beam, K]
        ok = nxt >= 0
        if live is not None:
            ok = ok & jnp.take_along_axis(
                live, jnp.maximum(nxt, 0).reshape(batch, beam * k), axis=-1
            ).reshape(batch, beam, k)
        cand = jnp.where(ok, score[..., None] + logp, -jnp.inf).reshape(batch, beam * k)
        neg, order = jax.lax.sort((-cand, flat_index), dimension=-1, num_keys=2)
        top, score = order[:, :beam], -neg[:, :beam]
        parent, code = top // k, top % k
        state = jnp.take_along_axis(nxt.reshape(batch, beam * k), top, axis=-1)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        if level + 2 <= levels:
            tokens = tokens.at[..., level + 2].set(FIRST_CODE + level * k + code)
    items = jnp.where(jnp.isfinite(score), trie.leaf_item[state], -1)
    return items, score


def _ad_log_probs(model: GemRec, cross_kv, valid, trie: ItemTrie, chunk: int = 32):
    """``[batch, ads]`` log P(ad's ID | history, <AD>), teacher-forced, ``chunk`` users at once."""
    k, levels = trie.transitions.shape[1], trie.levels
    targets = FIRST_CODE + jnp.arange(levels) * k + trie.ad_codes  # [ads, levels]
    n_ads = targets.shape[0]
    inputs = jnp.concatenate(
        [jnp.full((n_ads, 1), BOS), jnp.full((n_ads, 1), AD), targets[:, :-1]], axis=1
    ).astype(jnp.int32)

    def one(args):
        kv, val = args
        kv = jax.tree.map(lambda a: a[None], kv)  # broadcast over the ads
        logits = model.decode(kv, val[None], inputs)[:, 1:, :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], axis=-1)

    return jax.lax.map(one, (cross_kv, valid), batch_size=chunk)


def _ad_scores(ad_logp, trie: ItemTrie, bonus, live):
    """Exact scores of every ad: log-probability plus the bonus of each prefix on its path
    (summed level by level), ``-inf`` for excluded ads."""
    score = ad_logp
    if bonus is not None:
        paths = trie.ad_paths[trie.ad_items]  # [ads, levels]
        for level in range(trie.levels):
            score = score + jnp.take(bonus, paths[:, level], axis=-1)
    if live is not None:
        leaves = trie.ad_paths[trie.ad_items, -1]
        score = jnp.where(jnp.take(live, leaves, axis=-1), score, -jnp.inf)
    return score


def _top_ads(score, trie: ItemTrie, beam: int):
    """The ``beam`` best ads (ties to the lower ad index) and their scores."""
    n_ads = score.shape[-1]
    width = min(beam, n_ads)
    index = jnp.broadcast_to(jnp.arange(n_ads), score.shape)
    neg, order = jax.lax.sort((-score, index), dimension=-1, num_keys=2)
    top, best = order[:, :width], -neg[:, :width]
    items = jnp.where(jnp.isfinite(best), trie.ad_items[top], -1)
    if width < beam:
        pad = beam - width
        items = jnp.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        best = jnp.pad(best, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return items, best


def _search_width(beam: int, width: int | None) -> int:
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if width is None:
        return beam
    if width < beam:
        raise ValueError(f"the search width ({width}) must be at least the beam ({beam})")
    return width


def _decode_items(model, cross_kv, valid, is_ad, trie, beam, width, bonus, live):
    org_items, org_scores = _beam(model, cross_kv, valid, trie, width, live)
    org_items, org_scores = org_items[:, :beam], org_scores[:, :beam]
    ad_items, ad_scores = _top_ads(
        _ad_scores(_ad_log_probs(model, cross_kv, valid, trie), trie, bonus, live), trie, beam
    )
    flag = is_ad[:, None]
    return jnp.where(flag, ad_items, org_items), jnp.where(flag, ad_scores, org_scores)


def constrained_beam_search(
    model: GemRec,
    users: Int[Array, " batch"],
    history: Int[Array, "batch history tokens"],
    uniform: Float[Array, " batch"],
    *,
    trie: ItemTrie,
    beam: int,
    flag: Bool[Array, " batch"] | None = None,
    exclude: Bool[Array, "batch items"] | None = None,
    width: int | None = None,
) -> Decoded:
    """Plain constrained decoding (TIGER with GEM-Rec's flag): no bids anywhere.

    The flag is ``<AD>`` iff ``uniform < P(AD | history)`` unless ``flag`` forces it; the items
    come from the beam search over the catalogue, or the exact top-``beam`` of the ad inventory,
    accordingly, restricted to items outside ``exclude`` when it is given (e.g. the user's
    history, as in full-ranking evaluation). ``width`` (default ``beam``) is the organic search's
    beam width; the best ``beam`` of its results are returned.
    """
    width = _search_width(beam, width)
    cross_kv, valid = _encode(model, users, history)
    z_org, z_ad = _flag_logits(model, cross_kv, valid)
    p_ad = jax.nn.sigmoid(z_ad - z_org)
    is_ad = uniform < p_ad if flag is None else flag
    live = None if exclude is None else live_states(trie, exclude)
    items, scores = _decode_items(model, cross_kv, valid, is_ad, trie, beam, width, None, live)
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
    exclude: Bool[Array, "batch items"] | None = None,
    width: int | None = None,
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
      beam: the length of the returned lists (and the default search width).
      flag: force the flag instead of drawing it (``p_ad`` is still reported).
      exclude: ``[batch, items]`` items never decoded for that user (e.g. already seen); an
        excluded ad is not in the user's live inventory, so its bid counts nowhere.
      width: the organic beam search's width (default ``beam``; the best ``beam`` are returned).
        Excluding items makes a wider search pay: a prefix's probability still counts its
        excluded items, so a narrow beam can fill up with prefixes of items already seen.
    """
    width = _search_width(beam, width)
    cross_kv, valid = _encode(model, users, history)
    z_org, z_ad = _flag_logits(model, cross_kv, valid)
    bids, live = _exclusion(trie, bids, exclude)
    b_max = jnp.max(bids, axis=-1)
    p_ad = jax.nn.sigmoid(z_ad + bid_bonus(b_max, lam) - z_org)
    is_ad = uniform < p_ad if flag is None else flag
    bonus = bid_bonus(prefix_max_bid(trie, bids), lam)
    items, scores = _decode_items(model, cross_kv, valid, is_ad, trie, beam, width, bonus, live)
    return Decoded(is_ad=is_ad, p_ad=p_ad, items=items, scores=scores)
