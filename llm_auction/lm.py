"""Language models as auction agents: the LM protocol and a small causal byte-level transformer.

An agent is any pure function from token ids to next-token logits over the shared vocabulary,
with a cache. :class:`LanguageModel` is that protocol, written for one sequence (callers ``vmap``
over agents and batches): ``init_cache()`` makes an empty cache and ``forward(params, tokens,
cache, slot, valid_from)`` writes ``tokens`` into cache slots ``slot, slot + 1, ...`` and returns
the next-token logits after each of them. Slots before ``valid_from`` are padding (an agent whose
prompt is shorter than another's is left-padded), so every agent's text starts at position 0.

:class:`CausalLM` is the project's own model: a decoder-only transformer over ASCII bytes
(``VOCAB_SIZE`` = 128; byte 0 is the end token) with learned positions and a key/value cache.
:class:`TransformerLM` wraps it in the protocol with ``nnx.split`` state as ``params``, so agents
that differ only in weights are stacked and evaluated as one ``vmap``-ed forward pass.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from diffecon.training import latest_checkpoint, restore_checkpoint, save_checkpoint

__all__ = [
    "END_TOKEN",
    "VOCAB_SIZE",
    "CausalLM",
    "LMConfig",
    "LanguageModel",
    "TransformerLM",
    "decode",
    "empty_cache",
    "encode",
    "load_lm",
    "save_lm",
]

VOCAB_SIZE = 128
END_TOKEN = 0  # the NUL byte ends a text (documents are separated by it in training)

Cache = Any


def encode(text: str) -> np.ndarray:
    """``text`` as ASCII token ids ``[len]`` (int32); other characters become ``?``."""
    data = text.encode("ascii", errors="replace")
    ids = np.frombuffer(data, np.uint8).astype(np.int32)
    return np.where(ids < VOCAB_SIZE, ids, ord("?")).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray | jax.Array) -> str:
    """Token ids back to text; stops at the first end token."""
    out = []
    for t in np.asarray(ids).reshape(-1).tolist():
        if t == END_TOKEN:
            break
        out.append(chr(int(t)))
    return "".join(out)


@runtime_checkable
class LanguageModel(Protocol):
    """What the auction needs from an agent's LM (one sequence; callers ``vmap``)."""

    @property
    def vocab_size(self) -> int:
        """Size of the shared vocabulary (every agent of an auction must agree)."""
        ...

    @property
    def max_len(self) -> int:
        """Cache slots: prompt plus generated tokens must fit."""
        ...

    def init_cache(self) -> Cache:
        """An empty cache for one sequence (a pytree of arrays)."""
        ...

    def forward(
        self,
        params: Any,
        tokens: Int[Array, " time"],
        cache: Cache,
        slot: Int[Array, ""],
        valid_from: Int[Array, ""],
    ) -> tuple[Float[Array, "time vocab"], Cache]:
        """Write ``tokens`` at cache slots ``slot...``; logits of the token after each."""
        ...


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape of :class:`CausalLM`.

    Attributes:
      vocab_size: token ids ``0..vocab_size - 1``.
      max_len: longest context (learned positions and cache slots).
      d_model: width of the residual stream.
      n_layers: transformer blocks.
      n_heads: attention heads (``d_model`` must be divisible by it).
      mlp_ratio: hidden width of the MLP over ``d_model``.
    """

    vocab_size: int = VOCAB_SIZE
    max_len: int = 128
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if min(self.vocab_size, self.max_len, self.d_model, self.n_layers, self.mlp_ratio) < 1:
            raise ValueError(f"every size of LMConfig must be positive, got {self}")


class _Block(nnx.Module):
    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.n_heads = config.n_heads
        self.ln_attn = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, config.mlp_ratio * d, rngs=rngs)
        self.down = nnx.Linear(config.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x, k_cache, v_cache, slot, mask):
        t, d = x.shape
        h = self.n_heads
        q, k, v = jnp.split(self.qkv(self.ln_attn(x)), 3, axis=-1)
        q, k, v = (a.reshape(t, h, d // h) for a in (q, k, v))
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, 0)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, 0)
        scores = jnp.einsum("thd,shd->hts", q, k_cache) / jnp.sqrt(d // h).astype(x.dtype)
        scores = jnp.where(mask[None], scores, -1e30)
        attn = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v_cache)
        x = x + self.out(attn.reshape(t, d))
        x = x + self.down(jax.nn.gelu(self.up(self.ln_mlp(x))))
        return x, k_cache, v_cache


def empty_cache(config: LMConfig) -> dict[str, jax.Array]:
    """Zero keys and values ``[layers, max_len, heads, head_dim]`` for one sequence."""
    c = config
    shape = (c.n_layers, c.max_len, c.n_heads, c.d_model // c.n_heads)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}


class CausalLM(nnx.Module):
    """Decoder-only transformer over bytes with a key/value cache (one sequence per call).

    Its ``__call__`` is the :class:`LanguageModel` forward: ``tokens [time]`` are written at cache
    slots ``slot, ..., slot + time - 1``; token at slot ``s`` has position ``s - valid_from`` and
    attends to slots ``valid_from..s``.
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.positions = nnx.Param(
            jax.random.normal(rngs.params(), (config.max_len, d), jnp.float32) * 0.02
        )
        self.blocks = nnx.List([_Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.ln_final = nnx.LayerNorm(d, rngs=rngs)

    def __call__(
        self,
        tokens: Int[Array, " time"],
        cache: dict[str, jax.Array],
        slot: Int[Array, ""] | int = 0,
        valid_from: Int[Array, ""] | int = 0,
    ) -> tuple[Float[Array, "time vocab"], dict[str, jax.Array]]:
        c = self.config
        t = tokens.shape[0]
        slots = slot + jnp.arange(t)
        pos = jnp.clip(slots - valid_from, 0, c.max_len - 1)
        x = self.embed(tokens) + self.positions[...][pos]
        keys = jnp.arange(c.max_len)
        mask = (keys[None, :] <= slots[:, None]) & (keys[None, :] >= valid_from)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cache["k"][i], cache["v"][i], slot, mask)
            ks.append(k)
            vs.append(v)
        logits = self.embed.attend(self.ln_final(x))
        return logits, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


@dataclasses.dataclass(frozen=True)
class TransformerLM:
    """:class:`CausalLM` as a :class:`LanguageModel`: ``params`` is its ``nnx.split`` state.

    Attributes:
      graphdef: the model's graph definition (``nnx.split(model)[0]``).
      config: its shape.
    """

    graphdef: Any
    config: LMConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_len(self) -> int:
        return self.config.max_len

    @classmethod
    def of(cls, model: CausalLM) -> tuple[TransformerLM, Any]:
        """The protocol wrapper and the params of ``model``."""
        graphdef, params = nnx.split(model)
        return cls(graphdef, model.config), params

    def init_cache(self) -> Cache:
        return empty_cache(self.config)

    def forward(self, params, tokens, cache, slot, valid_from):
        return nnx.merge(self.graphdef, params)(tokens, cache, slot, valid_from)


def _config_from_meta(meta: dict[str, Any], path: str) -> LMConfig:
    try:
        return LMConfig(**meta["lm_config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {path!r} has no valid lm_config in its meta: {err}") from err


def save_lm(model: CausalLM, directory: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s weights as float16 (orbax, atomic) with its config in ``meta.json``.

    Float16 halves the committed size; :func:`load_lm` returns float32 weights, and every number
    the project reports is computed from the stored (rounded) weights.
    """
    _, params = nnx.split(model)
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), params)
    record = {"lm_config": dataclasses.asdict(model.config), **(meta or {})}
    json.dumps(record)  # fail before writing anything if meta is not JSON-able
    return save_checkpoint(directory, 0, half, meta=record, max_to_keep=1)


def load_lm(directory: str | Path) -> tuple[CausalLM, dict[str, Any]]:
    """Load a model written by :func:`save_lm`; returns it (float32) and the checkpoint's meta.

    Raises:
      ValueError: no checkpoint in ``directory``, or a corrupt or mismatched one.
    """
    step = latest_checkpoint(directory)
    if step is None:
        raise ValueError(f"no language-model checkpoint in {str(directory)!r}")
    meta_path = Path(directory).resolve() / f"step_{step:09d}" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt checkpoint meta {str(meta_path)!r}: {err}") from err
    config = _config_from_meta(meta, str(directory))
    model = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split(model)
    like = jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), like)
    params, meta = restore_checkpoint(directory, like, step=step)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return nnx.merge(graphdef, params), meta
