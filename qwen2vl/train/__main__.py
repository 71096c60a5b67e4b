"""`python -m qwen2vl.train ...` (what torchrun runs): the same options as `qwen2vl train`."""

import sys

from qwen2vl.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
