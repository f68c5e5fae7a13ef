import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def megatron_single():
    """megatron-core parallel state for this one process (TP = PP = DP = 1)."""
    from mesh_megatron.config import ParallelConfig
    from mesh_megatron.parallel.initialize import initialize_distributed

    initialize_distributed(ParallelConfig())
    yield
