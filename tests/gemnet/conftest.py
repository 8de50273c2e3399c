"""Small trained GemNets shared by the gemnet tests (trained once per session, in seconds)."""

import pytest

from diffecon import TrainConfig, get_setting
from gemnet import GemNetConfig, GemNetTrainConfig, RepairConfig, repair, train_gemnet

TINY = GemNetTrainConfig(
    network=GemNetConfig(menu_size=8, hidden=16), batch_size=512, kappa_final=500.0
)


@pytest.fixture(scope="session")
def tiny_2x2():
    """A 2x2 additive GemNet after 300 steps: it over-allocates on part of the space."""
    setting = get_setting("additive_2x2_uniform")
    model, _ = train_gemnet(setting, TINY, TrainConfig(steps=300, seed=1, progress=False))
    return setting, model


def _repaired(tiny, **options):
    setting, model = tiny
    config = RepairConfig(max_level=3, workers=1, progress=False, **options)
    repaired, cert = repair(model, setting, config)
    return setting, model, repaired, cert


@pytest.fixture(scope="session")
def repaired_2x2(tiny_2x2):
    return _repaired(tiny_2x2)


@pytest.fixture(scope="session")
def repaired_2x2_continuous(tiny_2x2):
    """The same network repaired without quantized menus (interval and relational tests)."""
    return _repaired(tiny_2x2, quantize=False)


@pytest.fixture(scope="session")
def repaired_2x2_interpolated(tiny_2x2):
    """The same network repaired with menus interpolated between the cells' corners."""
    return _repaired(tiny_2x2, interpolate=True)
