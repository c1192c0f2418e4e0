"""Build one random-weight checkpoint in a process of its own (the test session's memory then never
holds a large build's peak): ``python tests/harness/build_checkpoint.py KIND PATH [SEED]``."""
from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
for path in (TESTS_DIR, TESTS_DIR.parent / "scripts"):
    sys.path.insert(0, str(path))


def main(argv=None) -> int:
    import tempfile

    from harness.checkpoints import build_checkpoint
    from harness.comfy_env import import_comfyui

    kind, path, *rest = argv if argv is not None else sys.argv[1:]
    import_comfyui(tempfile.mkdtemp(prefix="consistent_story_build_"))
    build_checkpoint(kind, path, int(rest[0]) if rest else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
