"""Every test runs with 8 virtual CPU devices, so sharding is exercised on every run."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The shipped configs are modules of the checkout (`from configs import arith_ei`), not
# of the installed package: the tests import them from here, however pytest was started.
sys.path.insert(0, str(REPO_ROOT))

# glibc's huge-page malloc, as the launchers run, for pytest-xdist's workers and every
# process a test starts (they inherit the environment; this process keeps its own malloc).
from rl_reason import process_setup  # noqa: E402

process_setup.use_huge_page_malloc_in_new_processes()
# Launchers started by tests keep every core even under a CPU quota: tests compare them
# bit for bit with runs in this process, and a core count of their own changes last bits.
os.environ.setdefault("RL_REASON_FIT_CPUS_TO_QUOTA", "0")

# One persistent JAX compilation cache for the whole session, this process and every
# process a test starts (they inherit the environment): a program compiles once,
# however many tests, modules (whose in-memory caches are dropped below) or killed
# and restarted runs use it. It starts empty each session and is removed after, so a
# run of the suite never depends on an earlier one. The key is the whole program with
# its options and devices: a program that differs in anything compiles anew.
# Under pytest-xdist the controller makes it and its workers (which inherit the
# environment) share it; a size bound turns on JAX's file lock around every read and
# write, so one worker never reads an entry the other is still writing.
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if _XDIST_WORKER and "JAX_COMPILATION_CACHE_DIR" in os.environ:
    _COMPILATION_CACHE = None  # the controller's, removed by the controller
else:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="rl_reason_tests_jax_cache_")
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(64 << 30),
    )


def pytest_unconfigure(config):
    if _COMPILATION_CACHE is not None:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after every test module.

    Each XLA:CPU executable holds about three memory mappings of JIT code for as
    long as JAX's caches keep it; a whole suite in one process reached Linux's
    limit of 65,530 mappings (`vm.max_map_count`) and LLVM crashed mid-compile
    with a segmentation fault. A module's programs are rarely reused by the next.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


def tiny_sft_config():
    """A 2-layer, 32-wide model SFT-trained for a few steps on the synthetic task."""
    from rl_reason.experiments import config as config_lib

    config = config_lib.base_config()
    config.model.update(hidden_dim=32, num_layers=2, head_dim=8, mlp_dim=64, vocab_size=0)
    config.data.update(num_train=64, num_eval=16, tokenizer_vocab_size=300)
    config.train.update(batch_size=16, max_length=128, num_steps=3, log_every=1, eval_every=3)
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory) -> pathlib.Path:
    """The workdir of a tiny SFT run: the start model of the RL tests."""
    from rl_reason.experiments import sft

    workdir = tmp_path_factory.mktemp("tiny_sft")
    sft.train(tiny_sft_config(), str(workdir))
    return workdir
