"""genrec: GEM-Rec, bid-aware generative recommendation on semantic IDs (Jiang et al., 2026).

TIGER-style generative retrieval (item text -> MiniLM embedding -> RQ-VAE semantic ID -> a T5-style
encoder-decoder that generates the next item's ID) with GEM-Rec's control tokens ``<ORG>`` /
``<AD>`` and its bid-aware decoding: a slot bonus on ``<AD>`` and a level-wise bonus from the
prefix max-bid table, inside one jitted, trie-constrained, deterministic beam search. Payments
(first price and Myerson), relevance and market metrics, MovieLens-100k with a simulated ad
market, and SASRec / popularity baselines.
"""

from genrec.data import (
    AdMarket,
    AdMarketConfig,
    EventLog,
    Interactions,
    Split,
    load_movielens_100k,
    simulate_ad_market,
    split_leave_one_out,
    synthetic_embeddings,
    synthetic_interactions,
)
from genrec.decoding import (
    Decoded,
    ItemTrie,
    bid_aware_beam_search,
    bid_bonus,
    build_trie,
    constrained_beam_search,
    live_states,
    prefix_max_bid,
)
from genrec.metrics import market_metrics, ranking_metrics, summarize
from genrec.model import GemRec, GemRecConfig, event_tokens, sequence_loss
from genrec.payments import AdPayments, ad_auction
from genrec.rqvae import (
    RQVAE,
    RQVAEConfig,
    add_collision_token,
    codebook_usage,
    standardize,
    train_rqvae,
)
from genrec.text import MiniLM, embed_texts, load_minilm, tokenize
from genrec.train import (
    SASRec,
    SASRecConfig,
    SeqTrainConfig,
    gemrec_inputs,
    load_model,
    popularity_ranking,
    sasrec_ranking,
    save_model,
    train_gemrec,
    train_sasrec,
)

__all__ = [
    "RQVAE",
    "AdMarket",
    "AdMarketConfig",
    "AdPayments",
    "Decoded",
    "EventLog",
    "GemRec",
    "GemRecConfig",
    "Interactions",
    "ItemTrie",
    "MiniLM",
    "RQVAEConfig",
    "SASRec",
    "SASRecConfig",
    "SeqTrainConfig",
    "Split",
    "ad_auction",
    "add_collision_token",
    "bid_aware_beam_search",
    "bid_bonus",
    "build_trie",
    "codebook_usage",
    "constrained_beam_search",
    "embed_texts",
    "event_tokens",
    "gemrec_inputs",
    "live_states",
    "load_minilm",
    "load_model",
    "load_movielens_100k",
    "market_metrics",
    "popularity_ranking",
    "prefix_max_bid",
    "ranking_metrics",
    "sasrec_ranking",
    "save_model",
    "sequence_loss",
    "simulate_ad_market",
    "split_leave_one_out",
    "standardize",
    "summarize",
    "synthetic_embeddings",
    "synthetic_interactions",
    "tokenize",
    "train_gemrec",
    "train_rqvae",
    "train_sasrec",
]
