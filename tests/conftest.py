"""The worker scripts run in subprocesses of test_sharded.py; pytest must not import them.
Under pytest-xdist the 8-device one starts in the background as soon as the first worker
has collected, so that it runs beside the other tests rather than holding a worker.

Float32 matrix products in full float32 on every platform (on NVIDIA GPUs JAX's default
lets them round their inputs to TensorFloat-32, 10 mantissa bits), so that the float32
references and tolerances of the tests mean the same thing there as on CPU.

On the CPU the tests compile for less time (unless XLA_FLAGS already sets
``xla_backend_optimization_level`` or JXENT_TEST_XLA_OPT=1 asks for XLA's defaults), in this
process and the subprocesses it starts: the suite's time is mostly compiling thousands of
small programs. Two XLA:CPU flags, each kept only if this jaxlib accepts it (one probe in a
subprocess, before any backend exists):

- ``--xla_backend_optimization_level=0``: LLVM optimises the machine code less; every
  program's operations, buffers and results are the same, bit for bit.
- ``--xla_cpu_use_fusion_emitters=false``: fused loops are emitted by XLA's elemental
  emitter instead of its MLIR fusion emitters. The programs' operations and float semantics
  (no fast-math) are the same, but exp, log and their kin are approximated by other code:
  results move in their last bits (measured: up to 3.6e-7 relative in float32, about 3 ulp,
  on cross-entropy, entropy, sigmoid and tanh values and gradients), far inside every
  tolerance here.

Measured on two cores: 566 s for the whole suite at level 0 alone, 353 s with both flags
(693 s against 576 s for level 0 when it came in). ``JXENT_TEST_XLA_OPT=1`` runs the suite as
users' programs compile. The benchmarks always run at XLA's defaults.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_PLATFORMS = os.environ.get("JAX_PLATFORMS", "")
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _accepted(flags: str) -> bool:
  """Whether this jaxlib starts its CPU backend with ``flags`` (XLA aborts on a flag it
  does not know)."""
  code = "import jax; jax.numpy.zeros(1).block_until_ready()"
  probe = subprocess.run([sys.executable, "-c", code],
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                         capture_output=True, timeout=120)
  return probe.returncode == 0


if (not os.environ.get("JXENT_TEST_XLA_OPT") and "xla_backend_optimization_level"
    not in os.environ.get("XLA_FLAGS", "") and not {"cuda", "gpu", "tpu", "rocm"}
    & set(_PLATFORMS.split(","))):
  # Before JAX creates its backends (XLA reads the flags then). xdist's workers and the
  # tests' subprocesses inherit the result, so the probe runs once per run.
  _base = os.environ.get("XLA_FLAGS", "")
  _flags = [f for f in _FAST_COMPILE if _accepted(f"{_base} {f}".strip())]
  os.environ["XLA_FLAGS"] = " ".join([_base, *_flags]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jxent import _fused  # noqa: E402
from jxent._platform import use_implementation  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests trace the same programs afresh (a new function per implementation, option or
# tolerance): one compilation cache on disk for the whole run, shared by the xdist workers
# and the subprocesses they start, compiles each program once (about a quarter of the
# suite's time). The directory is made per run, so every run starts with an empty cache,
# unless JAX_COMPILATION_CACHE_DIR names one already (the mutation harness shares one
# between its runs: a program the mutant does not change is not compiled again).
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def _use_cache(path: str) -> None:
  os.environ.update({_CACHE_ENV: path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
  if os.environ.get(_CACHE_ENV):  # an xdist worker (the controller's), or the caller's
    _use_cache(os.environ[_CACHE_ENV])
    return
  config._jxent_cache = tempfile.mkdtemp(prefix="jxent-jax-cache-")
  _use_cache(config._jxent_cache)


def pytest_unconfigure(config):
  path = getattr(config, "_jxent_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


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


HERE = Path(__file__).resolve().parent
# The workers run as scripts: the repository goes on their path, whether or not jxent is
# installed in this interpreter.
WORKER_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p))


def run_sharded_worker() -> dict:
  out = subprocess.run([sys.executable, str(HERE / "_sharded_worker.py")], capture_output=True,
                       text=True, timeout=900, env=WORKER_ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def sharded_result_path(config) -> Path | None:
  """Where the background 8-device worker leaves its result in this xdist run (None without
  xdist): a file named by the run's id, which every xdist worker shares."""
  run = getattr(config, "workerinput", {}).get("testrunuid")
  return None if run is None else Path(tempfile.gettempdir()) / f"jxent-sharded-{run}.json"


def pytest_collection_finish(session):
  path = sharded_result_path(session.config)
  if path is None or session.config.workerinput.get("workerid") != "gw0":
    return
  if not any(item.path.name == "test_sharded.py" for item in session.items):
    return

  def run():
    try:
      text = json.dumps({"ok": run_sharded_worker()})
    except BaseException as e:  # noqa: BLE001 - handed to the tests that need it
      text = json.dumps({"error": f"{type(e).__name__}: {e}"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

  threading.Thread(target=run, daemon=True).start()
