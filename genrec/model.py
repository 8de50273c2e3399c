"""GEM-Rec's sequence model: a T5-style encoder-decoder over semantic-ID tokens with ad flags.

Vocabulary: ``PAD``, ``BOS``, the control tokens ``<ORG>`` and ``<AD>``, then ``levels`` blocks of
``K`` code tokens (level ``l``'s code ``c`` is token ``FIRST_CODE + l * K + c``; the last level is
the collision token). Each logged impression is ``[flag, c_1, ..., c_levels]``.

The encoder reads a hashed user token followed by the last ``history`` impressions, each embedded
as the sum of its flag's and its codes' token embeddings (one position per impression keeps the
encoder short on a CPU; the tokens themselves are TIGER's). The decoder reads
``[BOS, flag, c_1, ..., c_{levels-1}]`` and predicts ``[flag, c_1, ..., c_levels]``; training is
next-token cross-entropy, which factorises as P(flag | history) P(codes | history, flag).

T5-style blocks: pre-RMSNorm, bias-free projections, ReLU MLP, dropout on residual branches, input
and output embeddings tied (logits scaled by ``d_model ** -0.5``); positions are learned absolute
embeddings (a design choice; T5 uses relative buckets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "AD",
    "BOS",
    "FIRST_CODE",
    "ORG",
    "PAD",
    "GemRec",
    "GemRecConfig",
    "event_tokens",
    "sequence_loss",
]

PAD, BOS, ORG, AD = 0, 1, 2, 3
FIRST_CODE = 4
USER_HASH = 2654435761


@dataclasses.dataclass(frozen=True)
class GemRecConfig:
    """Shape of the encoder-decoder.

    Attributes:
      codebook_size: ``K``, codes per level (the collision level uses the same ``K``).
      levels: code levels per item, collision token included (``D + 1``).
      d_model: model width.
      heads: attention heads.
      head_dim: width per head.
      mlp: hidden width of the feed-forward blocks.
      encoder_layers: encoder blocks.
      decoder_layers: decoder blocks.
      history: impressions the encoder reads.
      user_buckets: size of the hashed user-token table.
      dropout: dropout rate during training.
    """

    codebook_size: int = 32
    levels: int = 4
    d_model: int = 64
    heads: int = 4
    head_dim: int = 16
    mlp: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    history: int = 20
    user_buckets: int = 1024
    dropout: float = 0.1

    @property
    def vocab_size(self) -> int:
        return FIRST_CODE + self.levels * self.codebook_size


def event_tokens(
    codes: Int[np.ndarray, "items levels"],
    items: Int[np.ndarray, "*shape"],
    is_ad: Bool[np.ndarray, "*shape"],
    *,
    codebook_size: int,
) -> np.ndarray:
    """``[*shape, 1 + levels]`` tokens ``[flag, code tokens]`` of impressions.

    ``codes`` are per-level code indices (collision token included); an impression with
    ``item < 0`` is padding and becomes all ``PAD``.
    """
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(
            f"codes must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]"
        )
    items = np.asarray(items)
    valid = items >= 0
    code_tokens = (
        FIRST_CODE + np.arange(codes.shape[1]) * codebook_size + codes[np.where(valid, items, 0)]
    )
    flags = np.where(np.asarray(is_ad), AD, ORG)
    tokens = np.concatenate([flags[..., None], code_tokens], axis=-1)
    return np.where(valid[..., None], tokens, PAD).astype(np.int32)


class _Attention(nnx.Module):
    def __init__(self, c: GemRecConfig, rngs: nnx.Rngs):
        inner = c.heads * c.head_dim
        self.q = nnx.Linear(c.d_model, inner, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(c.d_model, inner, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(c.d_model, inner, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(inner, c.d_model, use_bias=False, rngs=rngs)
        self.heads, self.head_dim = c.heads, c.head_dim

    def kv(self, context):
        """Keys and values of a context, ``[..., length, heads, head_dim]`` each."""
        shape = (*context.shape[:-1], self.heads, self.head_dim)
        return self.k(context).reshape(shape), self.v(context).reshape(shape)

    def __call__(self, x, context, mask, kv=None):
        """``mask [..., q, k]`` True where attention is allowed; ``kv`` precomputed for context."""
        q = self.q(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
        k, v = self.kv(context) if kv is None else kv
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(self.head_dim)
        logits = jnp.where(mask[..., None, :, :], logits, -1e9)
        out = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, -1), v)
        return self.o(out.reshape(*out.shape[:-2], -1))


class _Block(nnx.Module):
    def __init__(self, c: GemRecConfig, rngs: nnx.Rngs, *, cross: bool):
        self.norm_self = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.self_attention = _Attention(c, rngs)
        self.norm_cross = nnx.RMSNorm(c.d_model, rngs=rngs) if cross else None
        self.cross_attention = _Attention(c, rngs) if cross else None
        self.norm_mlp = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.wi = nnx.Linear(c.d_model, c.mlp, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(c.mlp, c.d_model, use_bias=False, rngs=rngs)
        self.rate = c.dropout

    def _drop(self, x, key, i):
        if key is None or self.rate == 0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - self.rate, x.shape)
        return jnp.where(keep, x / (1 - self.rate), 0.0)

    def __call__(self, x, self_mask, cross_kv=None, cross_mask=None, key=None):
        h = self.norm_self(x)
        x = x + self._drop(self.self_attention(h, h, self_mask), key, 0)
        if self.cross_attention is not None and self.norm_cross is not None:
            h = self.norm_cross(x)
            x = x + self._drop(self.cross_attention(h, None, cross_mask, kv=cross_kv), key, 1)
        h = self.wo(self._drop(jax.nn.relu(self.wi(self.norm_mlp(x))), key, 2))
        return x + self._drop(h, key, 3)


class GemRec(nnx.Module):
    """The encoder-decoder; see the module docstring for inputs and outputs."""

    def __init__(self, config: GemRecConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Embed(
            c.vocab_size, c.d_model, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
        )
        self.user = nnx.Embed(c.user_buckets, c.d_model, rngs=rngs)
        self.encoder_positions = nnx.Embed(c.history + 1, c.d_model, rngs=rngs)
        self.decoder_positions = nnx.Embed(c.levels + 1, c.d_model, rngs=rngs)
        self.encoder = nnx.List([_Block(c, rngs, cross=False) for _ in range(c.encoder_layers)])
        self.decoder = nnx.List([_Block(c, rngs, cross=True) for _ in range(c.decoder_layers)])
        self.encoder_norm = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.decoder_norm = nnx.RMSNorm(c.d_model, rngs=rngs)

    def encode(
        self,
        users: Int[Array, " *batch"],
        history: Int[Array, "*batch history tokens"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*batch memory d_model"], Bool[Array, "*batch memory"]]:
        """Encoder states of ``[user, impressions]`` and their validity mask.

        ``history`` holds ``[flag, code tokens]`` per impression (all ``PAD`` for padding).
        """
        c = self.config
        bucket = (users.astype(jnp.uint32) * jnp.uint32(USER_HASH)) % jnp.uint32(c.user_buckets)
        events = jnp.sum(self.embed(history), axis=-2)
        x = jnp.concatenate([self.user(bucket.astype(jnp.int32))[..., None, :], events], axis=-2)
        x = x + self.encoder_positions(jnp.arange(x.shape[-2]))
        valid = jnp.concatenate(
            [jnp.ones((*users.shape, 1), bool), history[..., 0] != PAD], axis=-1
        )
        mask = valid[..., None, :] & valid[..., :, None]
        for i, block in enumerate(self.encoder):
            x = block(x, mask, key=None if key is None else jax.random.fold_in(key, i))
        return self.encoder_norm(x), valid

    def cross_kv(self, memory: Float[Array, "*batch memory d_model"]) -> tuple:
        """Every decoder layer's cross-attention keys and values of the encoder states.

        Computed once per user and shared by all beams and decoding steps.
        """
        return tuple(
            block.cross_attention.kv(memory)  # type: ignore[union-attr]
            for block in self.decoder
        )

    def decode(
        self,
        cross_kv: tuple,
        memory_valid: Bool[Array, "... memory"],
        tokens: Int[Array, "*batch steps"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch steps vocab"]:
        """Next-token logits at every decoder position (causal).

        ``cross_kv`` comes from :meth:`cross_kv`; its batch axes (and ``memory_valid``'s) may be
        broadcast against ``tokens``' (e.g. ``[users, 1]`` against ``[users, beam]``).
        """
        steps = tokens.shape[-1]
        x = self.embed(tokens) + self.decoder_positions(jnp.arange(steps))
        causal = jnp.tril(jnp.ones((steps, steps), bool))
        cross = memory_valid[..., None, :]
        for i, (block, kv) in enumerate(zip(self.decoder, cross_kv, strict=True)):
            k = None if key is None else jax.random.fold_in(key, 100 + i)
            x = block(x, causal, kv, cross, key=k)
        x = self.decoder_norm(x)
        return x @ self.embed.embedding[...].T * self.config.d_model**-0.5

    def __call__(
        self,
        users: Int[Array, " *batch"],
        history: Int[Array, "*batch history tokens"],
        targets: Int[Array, "*batch tokens"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch tokens vocab"]:
        """Teacher-forced logits of ``targets`` (``[flag, code tokens]``) given the history."""
        k_enc = None if key is None else jax.random.fold_in(key, 0)
        k_dec = None if key is None else jax.random.fold_in(key, 1)
        memory, valid = self.encode(users, history, key=k_enc)
        inputs = jnp.concatenate(
            [jnp.full((*targets.shape[:-1], 1), BOS, targets.dtype), targets[..., :-1]], axis=-1
        )
        return self.decode(self.cross_kv(memory), valid, inputs, key=k_dec)


def sequence_loss(
    logits: Float[Array, "*batch tokens vocab"], targets: Int[Array, "*batch tokens"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean next-token cross-entropy over all positions, and the flag position's alone."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll), jnp.mean(nll[..., 0])
