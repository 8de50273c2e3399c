"""The registry of named auction settings (the field's vocabulary).

A :class:`Setting` knows its value model (sampler and support), its valuation kind and the
reference numbers published or derived for it. ``get_setting(name)`` is the only way the rest of the
project turns a name into a setting; unknown names raise a ``ValueError`` that lists close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from diffecon.distributions import (
    CombinatorialValues,
    Discrete,
    Exponential,
    IndependentValues,
    Lomax,
    Uniform,
    ValueModel,
)

__all__ = [
    "Reference",
    "Setting",
    "Valuation",
    "get_setting",
    "list_settings",
    "register_setting",
]

Valuation = Literal["additive", "unit_demand", "combinatorial"]


@dataclasses.dataclass(frozen=True)
class Reference:
    """A known number for a setting: exact optimum, a baseline's exact revenue, or a paper's result.

    Attributes:
      mechanism: lower-case mechanism name (``optimal``, ``itemwise_myerson``, ``regretnet``...).
      value: the number.
      exact: True for closed forms (tests hold estimates to it within standard errors).
      source: where the number comes from.
      kind: ``revenue`` or ``upper_bound``.
    """

    mechanism: str
    value: float
    exact: bool
    source: str
    kind: Literal["revenue", "upper_bound"] = "revenue"


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named auction environment.

    Attributes:
      name: registry name, e.g. ``additive_2x2_uniform``.
      n_bidders: number of bidders.
      n_items: number of items.
      valuation: ``additive``, ``unit_demand`` or ``combinatorial``.
      values: the value model; samples ``[*batch, bidders, value_dim]``.
      references: known numbers for this setting.
      description: one line for tables and plots.
    """

    name: str
    n_bidders: int
    n_items: int
    valuation: Valuation
    values: ValueModel
    references: tuple[Reference, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.values.shape != (self.n_bidders, self.value_dim):
            raise ValueError(
                f"setting {self.name!r}: value model has shape {self.values.shape}, "
                f"expected (bidders, value_dim) = {(self.n_bidders, self.value_dim)}"
            )

    @property
    def bundles(self) -> np.ndarray:
        """``[value_dim, items]`` 0/1 matrix: which items each entry of the last axis contains."""
        if self.valuation == "combinatorial":
            m = self.n_items
            masks = [[(b >> j) & 1 for j in range(m)] for b in range(1, 2**m)]
            # Singletons first, grand bundle last: ({1}, {2}, {1,2}) for two items.
            masks.sort(key=lambda row: (sum(row), [-x for x in row]))
            return np.asarray(masks, np.float32)
        return np.eye(self.n_items, dtype=np.float32)

    @property
    def value_dim(self) -> int:
        """Size of the last axis of values and allocations (items, or bundles)."""
        return 2**self.n_items - 1 if self.valuation == "combinatorial" else self.n_items

    @property
    def shape(self) -> tuple[int, int]:
        """``(bidders, value_dim)``: the trailing shape of values, bids and allocations."""
        return self.n_bidders, self.value_dim

    @property
    def low(self) -> np.ndarray:
        """``[bidders, value_dim]`` lower end of the value support."""
        return self.values.low

    @property
    def high(self) -> np.ndarray:
        """``[bidders, value_dim]`` upper end of the value support (``inf`` if unbounded)."""
        return self.values.high

    @property
    def bounded(self) -> bool:
        return bool(np.all(np.isfinite(self.high)))

    def sample(
        self, key: PRNGKeyArray, batch_shape: Sequence[int] | int = ()
    ) -> Float[Array, "*batch bidders items"]:
        """Draw value profiles ``[*batch_shape, bidders, value_dim]``."""
        if isinstance(batch_shape, int):
            batch_shape = (batch_shape,)
        return self.values.sample(key, tuple(batch_shape))

    def project(
        self, bids: Float[Array, "*batch bidders items"]
    ) -> Float[Array, "*batch bidders items"]:
        """Clip reports onto the support (used by misreport searches)."""
        return jnp.clip(bids, jnp.asarray(self.low), jnp.asarray(self.high))

    def feasibility_violation(
        self, alloc: Float[Array, "*batch bidders items"]
    ) -> Float[Array, "*batch"]:
        """Largest amount by which ``alloc`` breaks feasibility (0 when feasible).

        Feasible means entries in ``[0, 1]``, each item allocated at most once in total and, for
        unit-demand and combinatorial bidders, each bidder receiving at most one unit or bundle.
        """
        usage = alloc @ jnp.asarray(self.bundles)  # [*batch, bidders, items]
        over_item = jnp.max(jnp.sum(usage, axis=-2) - 1.0, axis=-1)
        worst = jnp.maximum(over_item, jnp.max(alloc - 1.0, axis=(-2, -1)))
        worst = jnp.maximum(worst, jnp.max(-alloc, axis=(-2, -1)))
        if self.valuation != "additive":
            worst = jnp.maximum(worst, jnp.max(jnp.sum(alloc, axis=-1) - 1.0, axis=-1))
        return jnp.maximum(worst, 0.0)

    def reference(self, mechanism: str, kind: str = "revenue") -> Reference | None:
        """The reference number of ``mechanism`` (``None`` if the setting has none)."""
        for ref in self.references:
            if ref.mechanism == mechanism and ref.kind == kind:
                return ref
        return None


_REGISTRY: dict[str, Setting] = {}


def register_setting(setting: Setting, *, overwrite: bool = False) -> Setting:
    """Add ``setting`` to the registry under ``setting.name``."""
    if setting.name in _REGISTRY and not overwrite:
        raise ValueError(f"a setting named {setting.name!r} is already registered")
    _REGISTRY[setting.name] = setting
    return setting


def get_setting(name: str) -> Setting:
    """Look a setting up by name; raise ``ValueError`` naming close matches if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"setting name must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown setting {name!r}{hint} (known: {len(_REGISTRY)} settings, "
            "see diffecon.list_settings())"
        ) from None


def list_settings() -> list[str]:
    """Names of all registered settings, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# The named settings of the spec.

_MYERSON_SRC = "Myerson (1981): second price with reserve 1/2 on U[0,1]"


def _single_item_myerson(n: int) -> float:
    """Exact Myerson revenue for n i.i.d. U[0,1] bidders: E[max(second, 1/2) if first >= 1/2]."""
    r = Fraction(1, 2)
    # E[revenue] = n * int_r^1 phi(v) v^(n-1) dv with phi(v) = 2v - 1.
    upper = Fraction(2 * n, n + 1) - 1
    lower = Fraction(2 * n, n + 1) * r ** (n + 1) - r**n
    return float(upper - lower)


def _uniform_setting(n: int, m: int, refs: Sequence[Reference] = (), name: str | None = None):
    return Setting(
        name=name or f"additive_{n}x{m}_uniform",
        n_bidders=n,
        n_items=m,
        valuation="additive",
        values=IndependentValues.iid(Uniform(0.0, 1.0), n_bidders=n, n_items=m),
        references=tuple(refs),
        description=f"{n} additive bidders, {m} items, values U[0,1]",
    )


def _itemwise_ref(n: int, m: int) -> Reference:
    return Reference(
        "itemwise_myerson", m * _single_item_myerson(n), True, f"{m} x single-item Myerson"
    )


def _register_defaults() -> None:
    for n in (2, 3, 5):
        register_setting(
            Setting(
                name=f"single_item_{n}_uniform",
                n_bidders=n,
                n_items=1,
                valuation="additive",
                values=IndependentValues.iid(Uniform(0.0, 1.0), n_bidders=n, n_items=1),
                references=(
                    Reference("myerson", _single_item_myerson(n), True, _MYERSON_SRC),
                    Reference("itemwise_myerson", _single_item_myerson(n), True, _MYERSON_SRC),
                    Reference("optimal", _single_item_myerson(n), True, _MYERSON_SRC),
                    Reference("vcg", (n - 1) / (n + 1), True, "E[second highest of n U[0,1]]"),
                ),
                description=f"{n} bidders, one item, values U[0,1]",
            )
        )

    mv = "Manelli & Vincent (2006): items at 2/3, bundle at (4 - sqrt 2)/3"
    register_setting(
        _uniform_setting(
            1,
            2,
            [
                Reference("optimal", 0.549201, True, mv),
                Reference("itemwise_myerson", 0.5, True, "two posted prices 1/2"),
                Reference("regretnet", 0.554, False, "Dütting et al. (2019), Table 1"),
            ],
        )
    )
    register_setting(
        Setting(
            name="unit_1x2_uniform",
            n_bidders=1,
            n_items=2,
            valuation="unit_demand",
            values=IndependentValues.iid(Uniform(0.0, 1.0), n_bidders=1, n_items=2),
            references=(
                Reference("optimal", 2 / (3 * 3**0.5), True, "Pavlov (2011): items at 1/sqrt 3"),
            ),
            description="1 unit-demand bidder, 2 items, values U[0,1]",
        )
    )
    register_setting(
        Setting(
            name="unit_1x2_uniform_23",
            n_bidders=1,
            n_items=2,
            valuation="unit_demand",
            values=IndependentValues.iid(Uniform(2.0, 3.0), n_bidders=1, n_items=2),
            references=(Reference("optimal", 2.13313, True, "Pavlov (2011), values U[2,3]"),),
            description="1 unit-demand bidder, 2 items, values U[2,3]",
        )
    )
    register_setting(
        Setting(
            name="additive_1x2_uniform_416_47",
            n_bidders=1,
            n_items=2,
            valuation="additive",
            values=IndependentValues.per_item([Uniform(4.0, 16.0), Uniform(4.0, 7.0)], n_bidders=1),
            references=(
                Reference("optimal", 88 / 9, True, "Daskalakis, Deckelbaum & Tzamos (2017)"),
            ),
            description="1 additive bidder, values U[4,16] x U[4,7]",
        )
    )
    register_setting(
        _uniform_setting(
            1,
            10,
            [
                Reference("itemwise_myerson", 2.5, True, "ten posted prices 1/2"),
                Reference("bundle_myerson", 3.4465, False, "grand bundle at price 3.9292"),
            ],
        )
    )
    register_setting(
        _uniform_setting(
            2,
            2,
            [
                Reference("optimal", 0.8919, False, "upper bound on SP revenue", "upper_bound"),
                _itemwise_ref(2, 2),
                Reference("vcg", 2 / 3, True, "2 x E[min of two U[0,1]]"),
                Reference("regretnet", 0.878, False, "Dütting et al. (2019), regret < 0.001"),
            ],
        )
    )
    register_setting(_uniform_setting(2, 3, [_itemwise_ref(2, 3)]))
    register_setting(_uniform_setting(3, 3, [_itemwise_ref(3, 3)]))
    register_setting(_uniform_setting(2, 5, [_itemwise_ref(2, 5)]))
    register_setting(
        _uniform_setting(
            3,
            10,
            [
                _itemwise_ref(3, 10),
                Reference("regretnet", 5.541, False, "Dütting et al. (2019), regret < 0.002"),
                Reference("amenunet", 5.5896, False, "Duan et al. (2023)"),
            ],
        )
    )
    register_setting(
        _uniform_setting(
            5,
            10,
            [
                _itemwise_ref(5, 10),
                Reference("regretnet", 6.778, False, "Dütting et al. (2019), regret < 0.005"),
            ],
        )
    )
    register_setting(
        Setting(
            name="unit_2x2_uniform",
            n_bidders=2,
            n_items=2,
            valuation="unit_demand",
            values=IndependentValues.iid(Uniform(0.0, 1.0), n_bidders=2, n_items=2),
            description="2 unit-demand bidders, 2 items, values U[0,1]",
        )
    )
    register_setting(
        Setting(
            name="yao_2x2_discrete_37",
            n_bidders=2,
            n_items=2,
            valuation="additive",
            values=IndependentValues.iid(Discrete((3.0, 7.0), (0.5, 0.5)), n_bidders=2, n_items=2),
            references=(
                Reference(
                    "optimal",
                    43 / 4,
                    True,
                    "DSIC LP optimum 43/4 (diffecon.optimal_dsic_lp; integral primal and dual "
                    "certificate)",
                ),
            ),
            description="2 additive bidders, 2 items, each value 3 or 7 w.p. 1/2 (Yao 2017)",
        )
    )
    register_setting(
        Setting(
            name="exponential_3x1",
            n_bidders=3,
            n_items=1,
            valuation="additive",
            values=IndependentValues.iid(Exponential(3.0), n_bidders=3, n_items=1),
            references=(
                Reference("myerson", 2.7517, False, "Myerson with reserve 3 (numerical integral)"),
                Reference("optimal", 2.7517, False, "Myerson with reserve 3 (numerical integral)"),
            ),
            description="3 bidders, one item, values Exp(mean 3)",
        )
    )
    register_setting(
        Setting(
            name="lomax_1x2",
            n_bidders=1,
            n_items=2,
            valuation="additive",
            values=IndependentValues.per_item([Lomax(5.0), Lomax(6.0)], n_bidders=1),
            description="1 additive bidder, Lomax values (shapes 5 and 6)",
        )
    )
    for name, hi2, refs in (
        ("CA_sym_uniform_12", 2.0, (2.871, 2.741, 2.765)),
        ("CA_asym_uniform_12_15", 5.0, (4.270, 4.209, 4.212)),
    ):
        src = "Dütting et al. (2019), Table 3"
        register_setting(
            Setting(
                name=name,
                n_bidders=2,
                n_items=2,
                valuation="combinatorial",
                values=CombinatorialValues((1.0, 1.0), (2.0, hi2), (-1.0, -1.0), (1.0, 1.0)),
                references=(
                    Reference("regretnet", refs[0], False, src),
                    Reference("vvca", refs[1], False, src),
                    Reference("ama", refs[2], False, src),
                ),
                description=f"2 combinatorial bidders, items U[1,2] / U[1,{hi2:g}], bundle v1+v2+C",
            )
        )


_register_defaults()
