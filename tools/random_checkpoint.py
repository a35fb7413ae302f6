"""`python -m tools.random_checkpoint OUT_DIR [options]`: the random SantaCoder-shaped checkpoints
of `santacpu/loading/random_checkpoint.py` (where the generator lives, so that an installed santacpu has
it too: `santacpu random-checkpoint`), kept here for the tests and tools that import it by this name.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from santacpu.loading.random_checkpoint import (  # noqa: E402,F401  (re-exported)
    SIZES,
    canonical_specs,
    canonical_tensors,
    config_json,
    layout_tensors,
    write_checkpoint,
)


def main(argv: list[str] | None = None) -> None:
    """The `santacpu random-checkpoint` command, with the same options."""
    from santacpu.cli import main as santacpu_main

    santacpu_main(["random-checkpoint", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
