"""Test configuration: puts tests/ and scripts/ on sys.path and registers the harness fixtures.

Unit tests (tests/unit) need only torch. Integration tests (tests/integration) use the
``comfy`` fixture, which imports the real ComfyUI found by scripts/comfy_host.py and fails
the test, never skips it, when there is none. Packaging tests (tests/packaging) run the real
comfy-cli and git, and fail without them.
"""
import os
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for path in (TESTS_DIR, REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Two cores in CI: one intra-op pool of that size, no oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    "harness.comfy_env",
    "harness.checkpoints",
    "harness.runner",
    "harness.server",
]


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def memory_back_after_each_module():
    """A module's models and tensors are garbage once it ends: give their memory back."""
    yield
    from harness.checkpoints import release_memory

    release_memory()
