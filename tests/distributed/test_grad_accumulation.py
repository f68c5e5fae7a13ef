"""bf16 gradients are accumulated (and reduced) in fp32: ZeRO-1, ZeRO-2, TP=2, PP=2 (and interleaved).

One optimizer step of 32 micro-batches per rank through the trainer's own construction and
step (tests/distributed/grad_accum_worker.py). For every element of every parameter, the
gradient the torch optimizer is handed must equal the exact (fp64) sum of the bf16
micro-batch gradients autograd produced, within the fp32 summation bound

    |seen - exact| <= n * 2^-24 * sum_i |g_i|     (n terms summed in fp32, any order)

and summing the same gradients in bf16 (DeepSpeed's default for bf16, which the ds_config
now overrides) must break that bound by far (2^-9 instead of 2^-24 per add), so the check
can fail.
"""

import os

import pytest
import torch

from launch import run_workers

pytestmark = pytest.mark.distributed
WORKER = os.path.join(os.path.dirname(__file__), "grad_accum_worker.py")
# Short micro-batches: bf16 matmuls are slow on CPU (the 4,096-token output layer dominates).
BASE = ["--bf16", "--seq-length", "8", "--micro-batch-size", "1", "--clip-grad", "0", "--sample-tokens", "0",
        "--eval-interval", "0", "--variant", "mesh"]
RUNS = {
    # 2 data-parallel ranks x 32 micro-batches each: accumulation and the fp32 reduction.
    "zero1": ["--ds_config", "examples/zero1.json", "--global-batch-size", "64"],
    "zero2": ["--ds_config", "examples/zero2.json", "--global-batch-size", "64"],
    # Tensor parallel: each rank accumulates its shards (and the replicated weights).
    "tp2_zero1": ["--ds_config", "examples/zero1.json", "--global-batch-size", "32",
                  "--tensor-model-parallel-size", "2"],
    # 32 micro-batches through megatron's schedule (1F1B; interleaved: 2 stages x 2 chunks,
    # the looped core on one chunk): DeepSpeed's hooks must see the schedule's backward.
    "pp2": ["--ds_config", "examples/zero1.json", "--global-batch-size", "32",
            "--pipeline-model-parallel-size", "2", "--pipeline-split", "1,5"],
    "pp2_interleaved": ["--ds_config", "examples/zero1.json", "--global-batch-size", "32", "--layout", "2+2R2+2",
                        "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
}
OPTIMIZER = {"zero1": "BF16_Optimizer", "zero2": "DeepSpeedZeroOptimizer", "tp2_zero1": "BF16_Optimizer",
             "pp2": "BF16_Optimizer", "pp2_interleaved": "BF16_Optimizer"}


def bound_ratio(got: torch.Tensor, exact: torch.Tensor, abs_sum: torch.Tensor, n: int) -> float:
    """max |got - exact| / (n * 2^-24 * sum |g_i|): <= 1 within fp32 summation error."""
    bound = n * 2.0**-24 * abs_sum
    err = (got - exact).abs()
    assert not (err[bound == 0] > 0).any()  # no gradient at all: exactly zero
    return (err[bound > 0] / bound[bound > 0]).max().item() if (bound > 0).any() else 0.0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_accum")
    args = [str(out)]
    for name, flags in RUNS.items():
        args += ["::", name] + BASE + flags
    run_workers(WORKER, 2, args[:1] + args[2:])
    return {name: [torch.load(out / f"grads_{name}_rank{r}.pt") for r in range(2)] for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_bf16_gradients_accumulate_in_fp32(results, name):
    for rank, r in enumerate(results[name]):
        n = r["micro_batches"]
        assert n in (32, 64)
        assert r["grads"], "no parameters on this rank"
        fp32 = max(bound_ratio(seen, exact, a, n) for seen, exact, a, _ in r["grads"].values())
        bf16 = max(bound_ratio(b16, exact, a, n) for _, exact, a, b16 in r["grads"].values())
        assert fp32 <= 1.0, (name, rank, fp32)  # measured ~0.05
        assert bf16 > 100.0, (name, rank, bf16)  # a bf16 accumulation: ~1e4 here
        # DeepSpeed's own mechanisms did it.
        assert r["optimizer"] == OPTIMIZER[name]
        assert r["data_types"] == ["torch.bfloat16", "torch.float32"]
