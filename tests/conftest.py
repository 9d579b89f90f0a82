"""Test setup: 8 fake CPU devices (context-parallel / FSDP tests) and the parity fixtures in tests/fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session (inherited by the subprocesses tests start): the training tests
# compile the same tiny train step in several runs; each identical program is compiled once.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cosmos_jax-test-jit-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


FIXTURES = REPO / "tests" / "fixtures"


def random_tiny_network(cfg, seed: int = 0, std: float = 0.05):
    """(trainable, frozen) parameter trees of `cfg`'s network drawn from N(0, std^2) in numpy (no init jit): tests
    that need a network of the right shapes, not a particular one."""
    import jax
    import numpy as np

    from cosmos_jax import build
    from cosmos_jax.models import dit as dit_lib

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32),
                          dit_lib.abstract_params(cfg))
    return build.split_params(params, cfg)


def fixtures_dir() -> pathlib.Path:
    """The reference parity fixtures shipped with the repository (tests/fixtures, see its README)."""
    return FIXTURES


@pytest.fixture(scope="session")
def dit_parity() -> pathlib.Path:
    return fixtures_dir() / "dit_control"


@pytest.fixture(scope="session")
def case_a(dit_parity) -> pathlib.Path:
    return dit_parity / "caseA"


@pytest.fixture(scope="session")
def vae_case_a() -> pathlib.Path:
    return fixtures_dir() / "wan_vae" / "caseA"
