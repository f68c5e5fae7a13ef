"""Where log records go: the console always (rank 0 only), tensorboard and wandb when asked."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from mesh_megatron.config import LoggingConfig


class LogSinks:
    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any], is_rank0: bool):
        self.enabled = is_rank0
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not is_rank0:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.jsonl_path:
            self.jsonl = open(cfg.jsonl_path, "a")
        if cfg.wandb_project:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=cfg.wandb_dir,
                                    config=run_config)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
