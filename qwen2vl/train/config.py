"""Every training option in one dataclass, readable from a YAML or TOML file.

A config file holds the same names as the command-line flags, with `_` or `-` (``max_tokens`` or
``max-tokens``); flags given on the command line override the file. Unknown keys are an error,
since a misspelt option silently ignored costs a whole run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2vl.errors import ConfigError

STAGES = (1, 2, 3)
LORA_TARGETS = ("llm", "vit")


@dataclass
class TrainConfig:
    """Options of one run; see `qwen2vl train --help` for each one's meaning."""

    model: str = ""  # source checkpoint directory (Hugging Face layout)
    data: str = ""  # JSONL, one conversation per line
    output: str = ""  # final model here; checkpoints in output/checkpoint-STEP
    stage: int = 3  # 1: ViT + merger; 2: everything; 3: LLM + merger (see stages.py)
    freeze: list[str] | None = None  # module prefixes frozen instead of the stage's set
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["llm"])
    epochs: int = 1
    max_steps: int | None = None  # wins over epochs when given
    lr: float = 1e-5
    min_lr: float = 0.0  # the cosine ends here
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1  # packed sequences per process per optimizer step
    max_tokens: int = 4096  # tokens per packed sequence
    too_long: str = "shrink"  # a sample over max_tokens: "shrink" its images, or "drop" it
    max_pixels: int | None = None  # cap on every image/video frame (overrides the checkpoint's)
    seed: int = 0
    resume: str | None = None  # a checkpoint directory, or "auto" for the latest in output
    gradient_checkpointing: bool = False
    bf16: bool = False  # bf16 autocast; weights and optimizer stay float32
    save_every: int = 0  # steps between checkpoints; 0: only the final model
    keep_checkpoints: int | None = None  # keep only the newest N checkpoint-STEP directories
    save_dtype: str = "float32"  # dtype of the saved Hugging Face weights
    validate_only: bool = False
    on_bad_line: str = "stop"  # "stop": report every bad line and fail; "skip": train without
    strategy: str = "ddp"  # with several processes: "ddp" or "fsdp" (FSDP2 fully_shard)
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    log_every: int = 1

    def __post_init__(self) -> None:
        self.freeze = None if self.freeze is None else _as_list(self.freeze, "freeze")
        self.lora_targets = _as_list(self.lora_targets, "lora_targets")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        checks = [
            (self.stage in STAGES, "stage", f"one of {STAGES}"),
            (set(self.lora_targets) <= set(LORA_TARGETS), "lora_targets", f"from {LORA_TARGETS}"),
            (self.too_long in ("shrink", "drop"), "too_long", "'shrink' or 'drop'"),
            (self.on_bad_line in ("stop", "skip"), "on_bad_line", "'stop' or 'skip'"),
            (self.strategy in ("ddp", "fsdp"), "strategy", "'ddp' or 'fsdp'"),
            (self.save_dtype in ("float32", "bfloat16", "float16"), "save_dtype", "a float dtype"),
            (self.max_tokens >= 16, "max_tokens", ">= 16"),
            (self.grad_accum >= 1, "grad_accum", ">= 1"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "min_lr", "0 <= min_lr <= lr"),
            (self.lora_rank >= 1, "lora_rank", ">= 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)"),
            (self.grad_clip >= 0 and self.warmup_steps >= 0, "grad_clip/warmup_steps", ">= 0"),
            (self.save_every >= 0 and self.log_every >= 1, "save_every/log_every", ">= 0 / >= 1"),
            (len(self.adam_betas) == 2, "adam_betas", "two numbers"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ConfigError(
                    f"train config: {name} must be {want}, got {getattr(self, name)!r}"
                )

    def require_paths(self) -> None:
        """model, data and output are needed to run (not to build a config in pieces)."""
        missing = [n for n in ("model", "data", "output") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"train config: missing {', '.join(missing)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From a dict of option names (`-` or `_`); ConfigError names unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"train config: unknown options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a .yaml/.yml, .toml or .json file (a flat table of option names)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    elif path.suffix == ".toml":
        try:
            import tomllib  # Python 3.11+
        except ImportError:  # pragma: no cover - Python 3.10
            import tomli as tomllib

        parse, errors = tomllib.loads, (tomllib.TOMLDecodeError,)
    elif path.suffix == ".json":
        parse, errors = json.loads, (ValueError,)
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml, .toml or .json")
    try:
        values = parse(text) or {}
    except errors as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of options, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A file's options (if any) with `overrides` on top; relative paths in the file are taken
    from the file's directory."""
    values: dict[str, Any] = {}
    if path is not None:
        values = {k.replace("-", "_"): v for k, v in read_config_file(path).items()}
        base = Path(path).resolve().parent
        for key in ("model", "data", "output"):
            if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                values[key] = str(base / values[key])
        if isinstance(values.get("resume"), str) and values["resume"] != "auto":
            values["resume"] = str(base / values["resume"])
    values.update({k.replace("-", "_"): v for k, v in overrides.items()})
    return TrainConfig.from_dict(values)


def _as_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"train config: {name} must be a list of strings or a comma list")
