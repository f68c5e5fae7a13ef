"""Where a rank learns who it is: srun without a launcher (SLURM_*), a launcher's RANK, and the
one-line refusals (no MASTER_ADDR, a local rank without a GPU)."""

import pytest

from mesh_megatron.config import ConfigError
from mesh_megatron.parallel.initialize import adopt_launcher_env, check_local_device

MASTER = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_srun_task_gets_its_ranks_from_slurm():
    env = dict(MASTER, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1")
    assert adopt_launcher_env(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")


def test_a_launchers_ranks_win_over_slurm():
    # torchrun inside an srun step: its RANK/LOCAL_RANK per worker, not the step's one task.
    env = dict(MASTER, RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", SLURM_PROCID="0", SLURM_NTASKS="1",
               SLURM_LOCALID="0")
    assert adopt_launcher_env(env) is None
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "3")


def test_single_process_needs_nothing():
    env = {}
    assert adopt_launcher_env(env) is None and env == {}
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}  # `srun -n 1`
    assert adopt_launcher_env(env) == "slurm" and env["WORLD_SIZE"] == "1"


def test_srun_without_master_addr_is_one_line():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is 2 \(SLURM_NTASKS\) but MASTER_ADDR and MASTER_PORT "
                                          r"are not set.*export MASTER_ADDR=\$\(scontrol show hostnames"):
        adopt_launcher_env(env)
    with pytest.raises(ConfigError, match="MASTER_PORT is not set"):
        adopt_launcher_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_local_rank_outside_visible_gpus_is_one_line():
    check_local_device(3, 4, None)
    with pytest.raises(ConfigError, match=r"local rank 4 has no GPU: this node shows 4 \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"
                                          r": start at most 4 ranks per node"):
        check_local_device(4, 4, "0,1,2,3")

