"""`python -m qwen2vl.train ...` (what torchrun runs): the same options as `qwen2vl train`."""

from qwen2vl.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m qwen2vl.train"))
