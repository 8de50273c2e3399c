"""Shared fixtures: a tiny random transformer (fast to compile) and the committed agents."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from llm_auction.lm import CausalLM, LMConfig, TransformerLM

CHECKPOINTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_lm():
    """Two tiny random models: the protocol wrapper and a list of their params."""
    config = LMConfig(max_len=48, d_model=16, n_layers=1, n_heads=2, mlp_ratio=2)
    wrapper, params = None, []
    for seed in (0, 1):
        model = CausalLM(config, rngs=nnx.Rngs(seed))
        # larger logits than at initialisation, so the two agents' distributions differ clearly
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: x * 4.0, state)
        wrapper, p = TransformerLM.of(nnx.merge(graphdef, state))
        params.append(p)
    return wrapper, params


def random_distributions(key, n_agents, vocab, concentration=0.5):
    return jnp.log(jax.random.dirichlet(key, jnp.full(vocab, concentration), (n_agents,)))
