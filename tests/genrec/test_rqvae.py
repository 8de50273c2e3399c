"""RQ-VAE semantic IDs, the collision token and codebook usage."""

import numpy as np

import genrec
from diffecon import TrainConfig


def test_collision_token_makes_ids_unique_in_item_order():
    codes = np.array([[0, 1, 2], [0, 1, 2], [3, 1, 2], [0, 1, 2]])
    out = genrec.add_collision_token(codes)
    np.testing.assert_array_equal(out[:, -1], [0, 1, 0, 2])
    assert len({tuple(r) for r in out.tolist()}) == 4


def test_codebook_usage_counts_codes_and_collisions():
    codes = np.array([[0, 1], [0, 2], [1, 2], [1, 2]])
    usage = genrec.codebook_usage(codes, 4)
    assert usage["usage_per_level"] == [0.5, 0.5]
    assert usage["unique_ids_share"] == 0.75 and usage["max_collisions"] == 2


def test_rqvae_learns_the_clusters_and_uses_its_codebooks():
    data = genrec.synthetic_interactions(seed=0, n_items=64, n_clusters=4)
    emb = genrec.synthetic_embeddings(data, dim=16, noise=0.2, seed=1)
    config = genrec.RQVAEConfig(
        input_dim=16, hidden=(32,), latent=8, codebook_size=8, batch_size=64
    )
    model, codes, run = genrec.train_rqvae(
        emb, config, TrainConfig(steps=200, steps_per_call=50, log_every=50, progress=False)
    )
    assert codes.shape == (64, 3) and codes.min() >= 0 and codes.max() < 8
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    usage = genrec.codebook_usage(codes, 8)
    assert usage["usage"] >= 0.5
    assert usage["unique_ids_share"] >= 0.5
    # the first code separates the clusters: items of a cluster share it far more than chance
    cluster = np.arange(64) % 4
    same = (codes[:, None, 0] == codes[None, :, 0])[cluster[:, None] == cluster[None, :]].mean()
    other = (codes[:, None, 0] == codes[None, :, 0])[cluster[:, None] != cluster[None, :]].mean()
    assert same > other + 0.3
    # k-means initialisation alone already spreads the first level
    assert len(np.unique(codes[:, 0])) >= 4
    assert isinstance(model, genrec.RQVAE)


def test_standardize():
    x = np.random.default_rng(0).normal(3.0, 2.0, (100, 5))
    z = genrec.standardize(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)
