"""RQ-VAE semantic IDs (TIGER): residual quantisation of item embeddings, plus a collision token.

An MLP encoder maps a standardised item embedding to a latent; ``levels`` codebooks quantise it
residually (level ``l`` quantises what levels ``< l`` left); an MLP decoder reconstructs the input
from the sum of the chosen code vectors. The loss is the reconstruction error summed (not averaged)
over dimensions, plus per level ``||sg(r) - e||^2 + beta ||r - sg(e)||^2``, with the
straight-through estimator; codebooks start from k-means on the initial encoder's residuals.
Summing the reconstruction and standardising the inputs keeps the codebooks from collapsing.

Items with identical codes get an extra trailing token ``0, 1, 2, ...`` (in item order) that makes
every semantic ID unique.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from diffecon.training import TrainConfig, TrainResult
from genrec.fit import fit

__all__ = [
    "RQVAE",
    "RQVAEConfig",
    "add_collision_token",
    "codebook_usage",
    "kmeans_init",
    "standardize",
    "train_rqvae",
]


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
    """RQ-VAE shape and training hyperparameters.

    Attributes:
      input_dim: embedding size (384 for MiniLM).
      hidden: encoder widths (the decoder mirrors them).
      latent: latent and code-vector size.
      levels: number of codebooks ``D``.
      codebook_size: codes per codebook ``K``.
      beta: commitment weight.
      batch_size: items per step.
      learning_rate: Adam step size.
      kmeans_iters: Lloyd iterations of the codebook initialisation.
    """

    input_dim: int = 384
    hidden: tuple[int, ...] = (256, 128)
    latent: int = 32
    levels: int = 3
    codebook_size: int = 32
    beta: float = 0.25
    batch_size: int = 256
    learning_rate: float = 1e-3
    kmeans_iters: int = 25


class RQVAE(nnx.Module):
    """MLP encoder, residual codebooks ``[levels, K, latent]``, MLP decoder."""

    def __init__(self, config: RQVAEConfig, *, rngs: nnx.Rngs):
        widths = (config.input_dim, *config.hidden, config.latent)
        self.config = config
        self.encoder = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)]
        )
        back = widths[::-1]
        self.decoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(back)])
        init = jax.random.normal(
            rngs.params(), (config.levels, config.codebook_size, config.latent)
        )
        self.codebooks = nnx.Param(init * 0.1)

    @staticmethod
    def _mlp(layers, x):
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    def encode(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch latent"]:
        return self._mlp(self.encoder, x)

    def decode(self, z: Float[Array, "*batch latent"]) -> Float[Array, "*batch dim"]:
        return self._mlp(self.decoder, z)

    def quantize(
        self, z: Float[Array, "*batch latent"]
    ) -> tuple[Int[Array, "*batch levels"], Float[Array, "*batch latent"], Float[Array, ""]]:
        """Residual quantisation: ``(codes, quantised latent, codebook + commitment loss)``."""
        residual, total = z, jnp.zeros_like(z)
        codes, loss = [], jnp.zeros(())
        for level in range(self.config.levels):
            book = self.codebooks[level]
            dist = jnp.sum((residual[..., None, :] - book) ** 2, axis=-1)
            code = jnp.argmin(dist, axis=-1)
            e = book[code]
            loss = loss + jnp.mean(
                jnp.sum((jax.lax.stop_gradient(residual) - e) ** 2, -1)
                + self.config.beta * jnp.sum((residual - jax.lax.stop_gradient(e)) ** 2, -1)
            )
            codes.append(code)
            total = total + e
            residual = residual - e
        return jnp.stack(codes, axis=-1), total, loss

    def __call__(
        self, x: Float[Array, "*batch dim"]
    ) -> tuple[Float[Array, "*batch dim"], Int[Array, "*batch levels"], Float[Array, ""]]:
        """``(reconstruction, codes, quantisation loss)`` with the straight-through estimator."""
        z = self.encode(x)
        codes, zq, q_loss = self.quantize(z)
        zq = z + jax.lax.stop_gradient(zq - z)
        return self.decode(zq), codes, q_loss

    def semantic_codes(self, x: Float[Array, "*batch dim"]) -> Int[Array, "*batch levels"]:
        """Codes of standardised embeddings (no collision token)."""
        return self.quantize(self.encode(x))[0]


def standardize(embeddings: Float[np.ndarray, "items dim"]) -> np.ndarray:
    """Per-dimension zero mean, unit variance (over the items)."""
    x = np.asarray(embeddings, np.float64)
    return ((x - x.mean(0)) / np.maximum(x.std(0), 1e-8)).astype(np.float32)


def _kmeans(x: jax.Array, k: int, key: jax.Array, iters: int) -> jax.Array:
    centers = x[jax.random.choice(key, x.shape[0], (k,), replace=x.shape[0] < k)]

    def lloyd(centers, _):
        assign = jnp.argmin(jnp.sum((x[:, None] - centers) ** 2, -1), -1)
        one_hot = jax.nn.one_hot(assign, k, dtype=x.dtype)
        counts = one_hot.sum(0)
        means = (one_hot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where(counts[:, None] > 0, means, centers), None

    return jax.lax.scan(lloyd, centers, None, length=iters)[0]


def kmeans_init(model: RQVAE, x: Float[Array, "items dim"], *, key: PRNGKeyArray) -> RQVAE:
    """Set every codebook to k-means centres of the residuals the previous levels leave."""
    c = model.config
    residual = model.encode(x)
    books = []
    for level in range(c.levels):
        centers = _kmeans(residual, c.codebook_size, jax.random.fold_in(key, level), c.kmeans_iters)
        assign = jnp.argmin(jnp.sum((residual[:, None] - centers) ** 2, -1), -1)
        residual = residual - centers[assign]
        books.append(centers)
    model.codebooks[...] = jnp.stack(books)
    return model


def _loss(model: RQVAE, batch: jax.Array, key: jax.Array):
    del key
    recon, _, q_loss = model(batch)
    rec = jnp.mean(jnp.sum((recon - batch) ** 2, axis=-1))
    return rec + q_loss, {"reconstruction": rec, "quantization": q_loss}


def train_rqvae(
    embeddings: Float[np.ndarray, "items dim"],
    config: RQVAEConfig,
    train_config: TrainConfig,
) -> tuple[RQVAE, np.ndarray, TrainResult]:
    """Train an RQ-VAE on item embeddings; returns the model, the codes and the run.

    The codes ``[items, levels]`` are those of the standardised embeddings (without the
    collision token; see :func:`add_collision_token`).
    """
    if embeddings.ndim != 2 or embeddings.shape[1] != config.input_dim:
        raise ValueError(
            f"embeddings must be [items, {config.input_dim}], got {tuple(embeddings.shape)}"
        )
    x_np = standardize(embeddings)
    x = jnp.asarray(x_np)
    key = jax.random.key(train_config.seed)
    model = RQVAE(config, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    model = kmeans_init(model, x, key=jax.random.fold_in(key, 1))
    n = x.shape[0]

    def sample(key, data):
        return data[jax.random.randint(key, (config.batch_size,), 0, n)]

    fingerprint: dict[str, Any] = {"rqvae": repr(config), "items": int(n)}
    model, result = fit(
        model,
        _loss,
        sample,
        x,  # donated to the loop
        optimizer=optax.adam(config.learning_rate),
        train_config=train_config,
        fingerprint=fingerprint,
    )
    codes = np.asarray(jax.jit(lambda m, x: m.semantic_codes(x))(model, jnp.asarray(x_np)))
    return model, codes, result


def add_collision_token(codes: Int[np.ndarray, "items levels"]) -> np.ndarray:
    """Append a token numbering the items that share the same codes (``[items, levels + 1]``)."""
    seen: dict[tuple, int] = {}
    extra = np.zeros(codes.shape[0], np.int32)
    for i, row in enumerate(map(tuple, np.asarray(codes).tolist())):
        extra[i] = seen.get(row, 0)
        seen[row] = extra[i] + 1
    return np.concatenate([np.asarray(codes, np.int32), extra[:, None]], axis=1)


def codebook_usage(codes: Int[np.ndarray, "items levels"], codebook_size: int) -> dict[str, Any]:
    """Share of each codebook's codes used, the mean share, and collision statistics."""
    codes = np.asarray(codes)
    per_level = [len(np.unique(codes[:, level])) / codebook_size for level in range(codes.shape[1])]
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {
        "usage_per_level": per_level,
        "usage": float(np.mean(per_level)),
        "unique_ids_share": float(len(counts) / len(codes)),
        "max_collisions": int(counts.max()),
    }
