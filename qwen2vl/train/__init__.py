"""Fine-tuning Qwen2-VL: the three training stages, LoRA, packed dynamic-resolution batches,
atomic resumable checkpoints, one process or torchrun (DDP / FSDP2).

    from qwen2vl.train import TrainConfig, train
    result = train(TrainConfig(model="ckpt", data="train.jsonl", output="out", stage=3))

Modules: config (options), data (JSONL, validation, labels), packing (rows, schedule, loss),
stages (freeze sets), lora, optim (AdamW, schedule), objective (the extension point for other
losses), checkpoint, distributed, metrics, loop, init, cli.
"""

from qwen2vl.train.config import TrainConfig, load_config
from qwen2vl.train.data import DataError, DataReport, Sample, SampleList, encode_conversation
from qwen2vl.train.loop import TrainResult, train, validate
from qwen2vl.train.lora import apply_lora, merge_lora
from qwen2vl.train.objective import Objective, Run
from qwen2vl.train.packing import PackedBatch, collate, loss_sum
from qwen2vl.train.stages import configure_trainable

__all__ = [
    "DataError",
    "DataReport",
    "Objective",
    "PackedBatch",
    "Run",
    "Sample",
    "SampleList",
    "TrainConfig",
    "TrainResult",
    "apply_lora",
    "collate",
    "configure_trainable",
    "encode_conversation",
    "load_config",
    "loss_sum",
    "merge_lora",
    "train",
    "validate",
]
