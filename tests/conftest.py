"""Test setup: 8 fake CPU devices (context-parallel / FSDP tests) and the shared parity fixtures."""

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


def shared_dir() -> pathlib.Path:
    """`shared/` lies beside the checkout (CI and developer machines); COSMOS_JAX_SHARED overrides."""
    path = pathlib.Path(os.environ.get("COSMOS_JAX_SHARED", REPO.parent / "shared"))
    if not (path / "parity").is_dir():
        raise RuntimeError(f"parity fixtures not found under {path}; set COSMOS_JAX_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def dit_parity() -> pathlib.Path:
    return shared_dir() / "parity" / "dit_control"


@pytest.fixture(scope="session")
def case_a(dit_parity) -> pathlib.Path:
    return dit_parity / "caseA"


@pytest.fixture(scope="session")
def vae_case_a() -> pathlib.Path:
    return shared_dir() / "parity" / "wan_vae" / "caseA"
