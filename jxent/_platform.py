"""Choosing an implementation per lowering platform.

Each quantity has a plain reference implementation (``jxent/_reference.py``) and may have
faster ones for particular compilers (``jxent/_cpu.py`` for XLA:CPU). :func:`dispatch` puts
them behind ``jax.lax.platform_dependent``, so the choice is made when the function is
*lowered* for a platform, not by ``jax.default_backend()``: a function jitted or exported
for GPU or TPU from a CPU host gets the reference there, and one exported for several
platforms carries each platform's own implementation.

``use_reference()`` forces the reference everywhere (the tests run every implementation
against it on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax

_FORCE_REFERENCE = contextvars.ContextVar("jxent_force_reference", default=False)


@contextlib.contextmanager
def use_reference():
  """Within this context (at trace time), every jxent function uses its reference form."""
  token = _FORCE_REFERENCE.set(True)
  try:
    yield
  finally:
    _FORCE_REFERENCE.reset(token)


def dispatch(*args, reference: Callable, cpu: Callable | None = None):
  """``reference(*args)`` on every platform but XLA:CPU, where ``cpu(*args)`` runs."""
  if cpu is None or _FORCE_REFERENCE.get():
    return reference(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=reference)


def explicitly_sharded(x) -> bool:
  """True for arrays laid out over an explicit mesh axis, which a free reshape may not cut."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(p is not None for p in spec)
