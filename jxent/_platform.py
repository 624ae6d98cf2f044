"""Choosing an implementation per lowering platform.

Each quantity has a plain reference implementation (``jxent/_reference.py``) and may have
faster ones for particular compilers (``jxent/_cpu.py`` for XLA:CPU; the fused loss's
vocabulary-blocked form for GPU and TPU). :func:`dispatch` puts them behind
``jax.lax.platform_dependent``, so the choice is made when the function is
*lowered* for a platform, not by ``jax.default_backend()``: a function jitted or exported
for GPU or TPU from a CPU host gets the accelerator form (or the reference) there, and one
exported for several platforms carries each platform's own implementation.

``use_implementation(name)`` and ``use_reference()`` force one form everywhere (the tests
run every implementation against the reference on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax

_FORCE = contextvars.ContextVar("jxent_force_implementation", default=None)
IMPLEMENTATIONS = ("reference", "cpu", "accelerator")


@contextlib.contextmanager
def use_implementation(name: str):
  """Within this context (at trace time), every jxent function uses its ``name`` form
  (``"reference"``, ``"cpu"`` or ``"accelerator"``; a function without that form uses its
  reference), whatever the platform: how the tests run each implementation on CPU. It is
  read when a function is traced: a ``jax.jit`` function already compiled for the same
  argument shapes keeps its program (jit a fresh function inside the context)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}.")
  token = _FORCE.set(name)
  try:
    yield
  finally:
    _FORCE.reset(token)


def use_reference():
  """Within this context (at trace time), every jxent function uses its reference form."""
  return use_implementation("reference")


def dispatch(*args, reference: Callable, cpu: Callable | None = None,
             accelerator: Callable | None = None):
  """``cpu(*args)`` when lowered for XLA:CPU, ``accelerator(*args)`` for GPU and TPU, and
  ``reference(*args)`` wherever the one named is None."""
  forced = _FORCE.get()
  if forced is not None:
    impl = {"reference": reference, "cpu": cpu, "accelerator": accelerator}[forced]
    return (impl or reference)(*args)
  if cpu is None and accelerator is None:
    return reference(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu or reference,
                                    default=accelerator or reference)


def explicitly_sharded(x) -> bool:
  """True for arrays laid out over an explicit mesh axis, which a free reshape may not cut."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(p is not None for p in spec)
