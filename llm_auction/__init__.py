"""llm_auction: token auctions for LLM agents (Dütting, Mirrokni, Paes Leme, Xu & Zuo, 2024).

Agents encode their preferences over text as language models and bid one scalar each; at every
position the mechanism aggregates their next-token distributions (:func:`aggregate`, linear or
log-linear, in log space), samples a token and charges payments: realised second-price payments
through a stable race (:func:`race`), or expected payments by the envelope formula
(:func:`envelope_expected_payments`, :func:`linear_expected_payments`) or Myerson's for KL
valuations (:func:`myerson_payments`). :func:`monotonicity_report` says which rule satisfies which
reading of the paper's monotonicity condition. :func:`generate` runs the whole auction over
language models (:class:`LanguageModel`; the project's own byte-level transformer is
:class:`CausalLM`, its trained agents load with :func:`load_lm`) as one jitted ``lax.scan`` with
per-agent key/value caches, and returns a :class:`Trace` that :func:`replay` and :func:`audit`
check without the models.
"""

from llm_auction.aggregation import (
    RULES,
    AggregationRule,
    agent_log_probs,
    aggregate,
    bid_weights,
    check_auction_inputs,
    kl_divergence,
    linear_rule,
    log_linear_rule,
    stack_distributions,
    total_variation,
)
from llm_auction.generate import (
    Agents,
    AuctionConfig,
    Trace,
    audit,
    generate,
    log_likelihoods,
    make_agents,
    replay,
)
from llm_auction.incentives import PositionAuction, bid_setting
from llm_auction.lm import (
    END_TOKEN,
    VOCAB_SIZE,
    CausalLM,
    LanguageModel,
    LMConfig,
    TransformerLM,
    decode,
    encode,
    load_lm,
    save_lm,
)
from llm_auction.monotonicity import (
    PROPERTIES,
    MonotonicityCheck,
    check_monotonicity,
    format_report,
    monotonicity_report,
)
from llm_auction.payments import (
    RaceDraws,
    RaceOutcome,
    draw_race,
    envelope_expected_payments,
    linear_expected_payments,
    myerson_payments,
    race,
    race_expected_payments,
    token_disagreement,
)

__all__ = [
    "END_TOKEN",
    "PROPERTIES",
    "RULES",
    "VOCAB_SIZE",
    "Agents",
    "AggregationRule",
    "AuctionConfig",
    "CausalLM",
    "LMConfig",
    "LanguageModel",
    "MonotonicityCheck",
    "PositionAuction",
    "RaceDraws",
    "RaceOutcome",
    "Trace",
    "TransformerLM",
    "agent_log_probs",
    "aggregate",
    "audit",
    "bid_setting",
    "bid_weights",
    "check_auction_inputs",
    "check_monotonicity",
    "decode",
    "draw_race",
    "encode",
    "envelope_expected_payments",
    "format_report",
    "generate",
    "kl_divergence",
    "linear_expected_payments",
    "linear_rule",
    "load_lm",
    "log_likelihoods",
    "log_linear_rule",
    "make_agents",
    "monotonicity_report",
    "myerson_payments",
    "race",
    "race_expected_payments",
    "replay",
    "save_lm",
    "stack_distributions",
    "token_disagreement",
    "total_variation",
]
