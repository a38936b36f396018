"""Run a script of an experiment (bench/experiments/<topic>/) with the maintained benchmark modules
importable by their plain names (`import decode`, `import fidelity`), as bench/'s own scripts are.

    python bench/run_experiment.py speculation-cost/speculation.py --context 32000
    python bench/run_experiment.py bench/experiments/oracle-selection/accuracy_sources.py 2048 1536 2 dense:0:0:0

SCRIPT is a path, or a path under bench/experiments/; the arguments after it are the script's own.
Python puts this file's folder (bench/) first on sys.path, and the script runs as __main__ with its
own __file__, so no experiment sets up a path itself. (minigen is installed: `make venv`.)
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("experiment scripts:")
        for f in sorted(EXPERIMENTS.glob("*/*.py")):
            print(f"  {f.relative_to(EXPERIMENTS)}")
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        script = EXPERIMENTS / argv[0]
    if not script.is_file() or script.suffix != ".py":
        print(f"error: no experiment script {argv[0]!r} (a .py path, or one under {EXPERIMENTS})", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
