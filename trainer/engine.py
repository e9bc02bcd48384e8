"""The training job's public names, kept where callers import them from.

The engine itself is in parts: `trainer.config` (options and their checks), `trainer.runtime` (ranks,
stop flag, device, AMP, seeds), `trainer.records` (run folder, args.yaml, results.csv, checkpoints),
`trainer.optim` (ultralytics' optimisation recipe), `trainer.stall` (the data-stall meter),
`trainer.prepare` (set-up) and `trainer.loop` (the epochs).
"""

from __future__ import annotations

from trainer.config import OPTIMIZERS, TrainConfig, TrainError, pick_split, redacted_options, resume_config
from trainer.loop import LOSS_NAMES, train
from trainer.optim import accumulate_steps
from trainer.records import TrainResult
from trainer.runtime import choose_amp
from trainer.stall import STALL_WARN_PCT, stall_advice

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "choose_amp", "accumulate_steps", "OPTIMIZERS",
           "STALL_WARN_PCT", "LOSS_NAMES", "pick_split", "redacted_options", "resume_config", "stall_advice"]
