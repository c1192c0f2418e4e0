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


def host_features_missing() -> list[str]:
    """Test modules of a host feature that the ComfyUI found lacks: not collected (never skipped).
    With no ComfyUI at all they are collected, and fail naming where to put one."""
    import comfy_host

    comfy_dir = comfy_host.find_comfyui()
    if comfy_dir is None:
        return []
    features = {"integration/test_multigpu.py": comfy_dir / "comfy" / "multigpu.py"}  # ComfyUI >= v0.33
    return [module for module, source in features.items() if not source.is_file()]


collect_ignore = host_features_missing()


@pytest.fixture(scope="module", autouse=True)
def memory_back_after_each_module():
    """A module's models and tensors are garbage once it ends: give their memory back."""
    yield
    from harness.checkpoints import release_memory

    release_memory()
