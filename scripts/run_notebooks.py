"""Execute every notebook in notebooks/ top to bottom; with --save, write the outputs back.

    python scripts/run_notebooks.py [--save] [NOTEBOOK ...]

Each notebook runs in a fresh `python3` kernel whose working directory is the
notebook's own folder, notebooks/, as when Jupyter opens it; so the paths at
the top of each notebook (`CHECKPOINT = "../checkpoints/..."`) and its
`sys.path.insert(0, "..")` mean the same for a reader and for this script.
Without --save the notebooks are only executed, and the first error (a failed
assertion that a manual re-derivation equals the module's output, say) makes the
script exit non-zero: tests/test_notebooks.py runs the same code per notebook.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TIMEOUT_S = 300  # per cell; the demo checkpoints take seconds, official weights minutes


def notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def execute(path):
    """The notebook at `path`, executed in a fresh kernel; raises on the first error."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(Path(path).resolve().parent)}},  # the kernel's working directory
        record_timing=False,  # no timestamps in the saved cells: re-running changes only real outputs
    )
    client.execute()
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", action="store_true", help="write the executed notebooks back, with their outputs")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to run (default: all in notebooks/)")
    args = parser.parse_args(argv)
    total = 0.0
    for path in args.paths or notebooks():
        start = time.perf_counter()
        nb = execute(path)
        elapsed = time.perf_counter() - start
        total += elapsed
        if args.save:
            nbformat.write(nb, path)
        print(f"{path.name}: {elapsed:.1f} s" + (", saved" if args.save else ""), flush=True)
    print(f"total: {total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
