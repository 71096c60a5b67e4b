"""`python -m qwen2vl ...`: the same as the `qwen2vl` command."""

from qwen2vl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
