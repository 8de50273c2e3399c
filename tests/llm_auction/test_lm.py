"""The LM protocol, the cache, checkpoints, the corpus and the committed agents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_auction import (
    CausalLM,
    LanguageModel,
    LMConfig,
    TransformerLM,
    decode,
    encode,
    load_lm,
    save_lm,
)
from llm_auction.corpus import strip_gutenberg
from llm_auction.lm import empty_cache
from tests.llm_auction.conftest import CHECKPOINTS


def test_incremental_decoding_with_the_cache_matches_one_full_pass(tiny_lm):
    model, params = tiny_lm
    assert isinstance(model, LanguageModel)
    tokens = jnp.asarray(encode("To be, or not to be"))
    forward = jax.jit(model.forward)
    full, _ = forward(params[0], tokens, model.init_cache(), 0, 0)
    logits, cache = forward(params[0], tokens[:5], model.init_cache(), 0, 0)
    steps = [logits[-1]]
    for t in range(5, len(tokens)):
        out, cache = forward(params[0], tokens[t : t + 1], cache, t, 0)
        steps.append(out[-1])
    np.testing.assert_allclose(jnp.stack(steps), full[4:], atol=1e-4)


def test_left_padding_is_invisible(tiny_lm):
    model, params = tiny_lm
    tokens = jnp.asarray(encode("Hark"))
    forward = jax.jit(model.forward)
    plain, _ = forward(params[0], tokens, model.init_cache(), 0, 0)
    padded = jnp.concatenate([jnp.full(3, 7, jnp.int32), tokens])
    shifted, _ = forward(params[0], padded, model.init_cache(), 0, 3)
    np.testing.assert_allclose(shifted[3:], plain, atol=1e-5)


def test_encode_decode_round_trip():
    assert decode(encode("Hamlet, Prince\n")) == "Hamlet, Prince\n"
    assert decode(encode("caf\u00e9")) == "caf?"
    assert decode([72, 105, 0, 72]) == "Hi"


def test_save_and_load_round_trip(tmp_path):
    config = LMConfig(max_len=16, d_model=8, n_layers=1, n_heads=2, mlp_ratio=1)
    model = CausalLM(config, rngs=nnx.Rngs(3))
    save_lm(model, tmp_path / "lm", meta={"note": "test"})
    loaded, meta = load_lm(tmp_path / "lm")
    assert meta["note"] == "test" and loaded.config == config
    tokens = jnp.asarray(encode("abc"))
    a, _ = model(tokens, empty_cache(config))
    b, _ = loaded(tokens, empty_cache(config))
    np.testing.assert_allclose(a, b, atol=2e-2)  # float16 storage
    with pytest.raises(ValueError, match="no language-model checkpoint"):
        load_lm(tmp_path / "missing")


def test_bad_model_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=10, n_heads=3)


def test_strip_gutenberg_keeps_only_the_body():
    text = (
        "Title\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nBody line.\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nLicence"
    )
    assert strip_gutenberg(text) == "Body line.\n"
    assert strip_gutenberg("No markers\n") == "No markers\n"


@pytest.fixture(scope="module")
def committed():
    return {name: load_lm(CHECKPOINTS / f"llm_auction_{name}") for name in ("modern", "folio")}


def test_committed_agents_load_and_differ_measurably(committed):
    """Each fine-tuned agent finds text in its own spelling likelier than the other agent does."""
    modern_text = "I have no love for you, my lord; give me your hand, and save us all.\n"
    folio_text = "I haue no loue for you, my Lord; giue me your hand, and saue vs all.\n"
    scores = {}
    for name, (model, meta) in committed.items():
        assert meta["held_out_bits_per_char"][name] < 3.0
        wrapper, params = TransformerLM.of(model)
        for label, text in (("modern", modern_text), ("folio", folio_text)):
            tokens = jnp.asarray(encode(text))
            logits, _ = wrapper.forward(params, tokens[:-1], wrapper.init_cache(), 0, 0)
            lp = jax.nn.log_softmax(logits)
            scores[name, label] = float(jnp.take_along_axis(lp, tokens[1:, None], 1).sum())
    assert scores["modern", "modern"] - scores["modern", "folio"] > 5.0
    assert scores["folio", "folio"] - scores["folio", "modern"] > 5.0
    # the committed meta records each agent's held-out score in both spellings
    for name, (_, meta) in committed.items():
        other = "folio" if name == "modern" else "modern"
        bpc = meta["held_out_bits_per_char"]
        assert bpc[name] < bpc[other]
