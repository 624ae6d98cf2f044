"""Root conftest: names the docstring examples (doctests) may use without importing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace["jax"] = jax
  doctest_namespace["jnp"] = jnp
  doctest_namespace["np"] = np
