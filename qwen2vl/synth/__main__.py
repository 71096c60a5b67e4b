"""`python -m qwen2vl.synth ...`: the same as `qwen2vl synth-data ...`."""

import sys

from qwen2vl.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synth-data", *sys.argv[1:]]))
