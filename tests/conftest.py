"""Shared test setup: eight fake CPU devices, so data-parallel code is exercised everywhere."""

import os

# Must happen before JAX initialises its backends (i.e. before any test module imports jax).
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)


# Strict dtype promotion (equinox's habit) is not enabled: optax's Adam itself mixes Python floats
# with int32 step counts, which strict mode rejects (checked with optax 0.2.8).
