"""``check_mechanism``: the conformance test every mechanism of every package passes.

Modelled on pgx's ``api_test``: one public function that exercises the contract of
:class:`diffecon.Mechanism` the way users will use it (``jit``, ``vmap``, several batch axes) and
fails with a message that says which part of the contract broke.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, TypeCheckError

from diffecon.outcome import Outcome, utility
from diffecon.settings import Setting

__all__ = ["ConformanceReport", "check_mechanism"]


@dataclasses.dataclass(frozen=True)
class ConformanceReport:
    """What ``check_mechanism`` measured (all checks passed if it returned)."""

    max_feasibility_violation: float
    min_payment: float
    max_ir_violation: float
    max_jit_vmap_difference: float
    traces: int


def _fail(msg: str):
    raise AssertionError(f"check_mechanism: {msg}")


def check_mechanism(
    mechanism: Callable[[jax.Array], Outcome],
    setting: Setting,
    *,
    key: PRNGKeyArray | None = None,
    batch_size: int = 64,
    ir_tol: float = 1e-5,
    feasibility_tol: float = 1e-5,
    require_ir: bool = True,
) -> ConformanceReport:
    """Check that ``mechanism`` honours the project's mechanism contract on ``setting``.

    Checks: output types and shapes for ``[B, n, d]`` and for extra leading batch axes; equal
    results under ``jit`` and ``jit(vmap(...))``; allocations feasible and in ``[0, 1]``; payments
    non-negative; IR on truthful bids (unless ``require_ir=False``); determinism; no retracing for
    a second batch of the same shape; ``ValueError`` on bids of the wrong shape, NaN bids and
    negative bids.

    Args:
      mechanism: ``bids [*batch, bidders, items] -> Outcome``.
      setting: the setting whose value distribution supplies test profiles.
      key: PRNG key for the profiles (default ``key(0)``).
      batch_size: profiles per test batch (even).
      ir_tol: allowed negative utility on truthful bids.
      feasibility_tol: allowed over-allocation.
      require_ir: set False for mechanisms that are not IR by design.

    Returns:
      A :class:`ConformanceReport`.

    Raises:
      AssertionError: naming the first broken part of the contract.
    """
    key = jax.random.key(0) if key is None else key
    n, d = setting.shape
    k1, k2 = jax.random.split(key)
    bids = setting.sample(k1, (batch_size,))
    bids2 = setting.sample(k2, (batch_size,))

    traces = 0

    def counted(b):
        nonlocal traces
        traces += 1
        return mechanism(b)

    jitted = jax.jit(counted)
    out = jitted(bids)
    if not isinstance(out, Outcome):
        _fail(f"must return an Outcome, returned {type(out).__name__}")
    if out.alloc.shape != (batch_size, n, d) or out.pay.shape != (batch_size, n):
        _fail(
            f"for bids {bids.shape} expected alloc {(batch_size, n, d)} and pay {(batch_size, n)}, "
            f"got {out.alloc.shape} and {out.pay.shape}"
        )
    jitted(bids2)
    if traces != 1:
        _fail(f"retraced for a second batch of the same shape ({traces} traces)")

    # through a closure: a mechanism may be a pytree of arrays, which jit cannot hash
    again = jax.jit(lambda b: mechanism(b))(bids)
    if not (np.array_equal(out.alloc, again.alloc) and np.array_equal(out.pay, again.pay)):
        _fail("two calls on the same bids gave different outcomes (must be deterministic)")

    half = batch_size // 2
    stacked = bids.reshape(2, half, n, d)
    vm = jax.jit(jax.vmap(lambda b: mechanism(b)))(stacked)
    if vm.alloc.shape != (2, half, n, d) or vm.pay.shape != (2, half, n):
        _fail(f"jit(vmap) gave alloc {vm.alloc.shape}, pay {vm.pay.shape}")
    multi = mechanism(stacked)
    if multi.alloc.shape != (2, half, n, d):
        _fail(f"two leading batch axes gave alloc {multi.alloc.shape}, expected {(2, half, n, d)}")
    diff = max(
        float(jnp.max(jnp.abs(vm.alloc.reshape(out.alloc.shape) - out.alloc))),
        float(jnp.max(jnp.abs(vm.pay.reshape(out.pay.shape) - out.pay))),
        float(jnp.max(jnp.abs(multi.pay.reshape(out.pay.shape) - out.pay))),
    )
    scale = 1.0 + float(jnp.max(jnp.abs(out.pay)))
    if diff > 1e-4 * scale:
        _fail(f"jit(vmap) / multi-axis results differ from jit by {diff:.3g}")

    feas = float(jnp.max(setting.feasibility_violation(out.alloc)))
    if feas > feasibility_tol:
        _fail(f"infeasible allocation: violation {feas:.3g} > {feasibility_tol}")
    min_pay = float(jnp.min(out.pay))
    if min_pay < -1e-6:
        _fail(f"negative payment {min_pay:.3g}")
    ir = float(jnp.max(jax.nn.relu(-utility(bids, out))))
    if require_ir and ir > ir_tol:
        _fail(f"IR violated on truthful bids by {ir:.3g} > {ir_tol}")

    bad_inputs = {
        "bids with one bidder too many": jnp.zeros((batch_size, n + 1, d)),
        "bids without a batch-free bidder axis": jnp.zeros((d,)),
        "NaN bids": bids.at[0, 0, 0].set(jnp.nan),
        "negative bids": bids.at[0, 0, 0].set(-1.0),
    }
    for what, bad in bad_inputs.items():
        try:
            mechanism(bad)
        except (ValueError, TypeCheckError):
            # TypeCheckError: jaxtyping's run-time shape check (active under pytest) fired before
            # the mechanism's own ValueError; it names the expected shape just as clearly.
            continue
        except Exception as err:
            _fail(f"{what} raised {type(err).__name__} instead of ValueError: {err}")
        _fail(f"{what} were accepted; expected a ValueError naming the problem")

    return ConformanceReport(
        max_feasibility_violation=feas,
        min_payment=min_pay,
        max_ir_violation=ir,
        max_jit_vmap_difference=diff,
        traces=traces,
    )
