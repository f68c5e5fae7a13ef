"""Logging sinks: tensorboard and wandb (offline) receive the scalars; other ranks log nothing."""

import json
import os

from mesh_megatron.config import LoggingConfig
from mesh_megatron.training.sinks import LogSinks


def test_tensorboard_wandb_offline_and_jsonl(tmp_path, capsys):
    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), wandb_project="mesh-test", wandb_mode="offline",
                        wandb_dir=str(tmp_path), jsonl_path=str(tmp_path / "log.jsonl"))
    sinks = LogSinks(cfg, {"model": {"variant": "mesh"}}, is_rank0=True)
    sinks.scalars(1, {"train/loss": 2.5, "perf/mfu": None})
    sinks.print("iter 1")
    sinks.close()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert os.path.isdir(tmp_path / "wandb") and any("offline-run" in d for d in os.listdir(tmp_path / "wandb"))
    assert [json.loads(line) for line in open(tmp_path / "log.jsonl")] == [{"step": 1, "train/loss": 2.5}]
    assert "iter 1" in capsys.readouterr().out


def test_only_rank0_logs(tmp_path, capsys):
    sinks = LogSinks(LoggingConfig(jsonl_path=str(tmp_path / "log.jsonl")), {}, is_rank0=False)
    sinks.scalars(1, {"train/loss": 1.0})
    sinks.print("hidden")
    sinks.close()
    assert not (tmp_path / "log.jsonl").exists() and capsys.readouterr().out == ""
