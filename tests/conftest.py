"""The worker scripts run in subprocesses of test_sharded.py; pytest must not import them.

Float32 matrix products in full float32 on every platform (on NVIDIA GPUs JAX's default
lets them round their inputs to TensorFloat-32, 10 mantissa bits), so that the float32
references and tolerances of the tests mean the same thing there as on CPU.
"""

import jax
import pytest

from jxent import _fused
from jxent._platform import use_implementation

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(params=["platform", "accelerator"])
def impl(request, monkeypatch):
  """The platform's implementation (token chunks on CPU), then the GPU/TPU one (vocabulary
  blocks of 16 columns here: V = 50 is three full blocks and a remainder of 2)."""
  if request.param == "platform":
    yield request.param
    return
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(16, v))
  with use_implementation("accelerator"):
    yield request.param

collect_ignore = ["_sharded_worker.py", "_multihost_worker.py", "fixtures/make_torch_reference.py"]
