"""Stage layout: the looped core stays whole on one stage; splits balance compute."""

import pytest

from mesh_megatron.config import ConfigError, preset
from mesh_megatron.parallel.pipeline_layout import build_layout
from mesh_megatron.training import arguments


def test_core_never_split_and_every_stage_has_work():
    for name in ("pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b"):
        for pp in (2, 4):
            layout = build_layout(preset(name, "mesh"), pp)
            assert sum(s.core for s in layout.stages) == 1
            assert all(s.prelude or s.core or s.coda for s in layout.stages)
            assert layout.stages[0].pre_process and layout.stages[-1].post_process


def test_1p4b_mesh_split_by_compute():
    layout = build_layout(preset("pythia-1.4b", "mesh"), 4)
    core_stage = next(s for s in layout.stages if s.core)
    # The 8-layer core run twice (16 compute layers) gets a stage of its own.
    assert not core_stage.prelude and not core_stage.coda
    # Embeddings ride along only up to the core's stage, and only as [h, h_emb].
    assert [s.sends_embeddings for s in layout.stages] == [s.rank < core_stage.rank for s in layout.stages]
    h, s = 2048, 4096
    assert layout.boundary_bytes(micro_batch=1, bytes_per_value=2)[0] == 2 * s * h * 2
    assert abs(sum(layout.shares()) - 1) < 1e-9


def test_base_core_does_not_ship_embeddings():
    layout = build_layout(preset("pythia-1.4b", "base"), 4)
    assert not any(s.sends_embeddings for s in layout.stages)


def test_override_that_splits_the_core_is_refused():
    with pytest.raises(ConfigError, match=r"would split the looped core \(compute layers 4..19\) across stages 0 and 1"):
        build_layout(preset("pythia-1.4b", "mesh"), 2, [12, 12])
    with pytest.raises(ConfigError, match="leaves a stage empty"):
        build_layout(preset("pythia-1.4b", "mesh"), 2, [0, 24])
    layout = build_layout(preset("pythia-1.4b", "mesh"), 3, [4, 16, 4])
    assert [s.core for s in layout.stages] == [False, True, False]


def test_cli_refuses_core_split_and_zero2_with_pipeline():
    with pytest.raises(ConfigError, match="would split the looped core"):
        arguments.parse(["--pipeline-model-parallel-size", "2", "--pipeline-split", "2,4"], world_size=2)
    with pytest.raises(ConfigError, match="ZeRO stage 2 is not supported with pipeline parallelism.*supported stages: 0, 1"):
        arguments.parse(["--pipeline-model-parallel-size", "2", "--ds_config", "examples/zero2.json"], world_size=2)
