"""One rank of the fp32 gradient accumulation test (tests/distributed/test_grad_accumulation.py).

Builds the trainer the way pretrain_mesh.py does (flags -> RunConfig -> Trainer: DeepSpeed
engine, the step strategy of training/steps.py) in bf16 and runs one optimizer step of many
micro-batches. Meanwhile it records:

  pieces    every bf16 gradient autograd delivers to a parameter (a tensor hook on each leaf:
            one per micro-batch's backward, the summed uses of the shared core included),
            summed in fp64 (the exact sum), in |.| (for the error bound), and deliberately
            in bf16 (what accumulating in the parameter dtype would give);
  seen      the fp32 gradient the wrapped torch optimizer is handed at its step(): the flat
            fp32 partition's .grad, mapped back to each parameter through DeepSpeed's
            _hp_mapping and summed over the data-parallel ranks (each owns a fragment).

Each rank writes OUT_DIR/grads_{NAME}_rank{r}.pt: {name: (seen, exact, abs_sum, bf16_sum)}
of its parameters (its pipeline stage's), with the exact, |.| and bf16 sums averaged over
data-parallel ranks as the optimizer's gradient is. Several runs share one launch (one set of
process start-ups): megatron's parallel state is rebuilt between them.

usage: grad_accum_worker.py OUT_DIR NAME FLAGS... [:: NAME FLAGS...]...
"""

import os
import sys

import torch
import torch.distributed as dist


def main(out_dir: str, runs: list[list[str]]) -> None:
    import deepspeed
    from megatron.core import parallel_state as ps

    from mesh_megatron.parallel.initialize import backend, destroy, initialize_distributed, set_seed
    from mesh_megatron.training import arguments

    for name, *flags in runs:
        run = arguments.parse(flags + ["--save", os.path.join(out_dir, f"unused_{name}")])
        initialize_distributed(run.parallel)
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
        set_seed(run.train.seed)
        one_step(run, os.path.join(out_dir, f"grads_{name}_rank{dist.get_rank()}.pt"))
        ps.destroy_model_parallel()
    destroy()


def one_step(run, out_path: str) -> None:
    from megatron.core import parallel_state as ps

    from mesh_megatron.training.trainer import Trainer

    trainer = Trainer(run, (None, None), None)
    engine = trainer.engine
    params = dict(engine.module.named_parameters())

    exact, abs_sum, bf16_sum = {}, {}, {}

    def record(name):
        def hook(grad):
            g = grad.detach()
            exact[name] = exact.get(name, 0) + g.double()
            abs_sum[name] = abs_sum.get(name, 0) + g.double().abs()
            bf16_sum[name] = g.clone() if name not in bf16_sum else bf16_sum[name] + g  # bf16 + bf16
        return hook

    for name, p in params.items():
        p.register_hook(record(name))

    # The wrapped torch optimizer steps over flat fp32 partitions (ZeRO-1/2 call it once per
    # group): keep each partition's .grad as handed to it, by storage.
    handed = {}
    basic = engine.basic_optimizer
    basic_step = basic.step

    def step(*args, **kwargs):
        for group in basic.param_groups:
            for flat in group["params"]:
                handed[flat.untyped_storage().data_ptr()] = flat.grad.detach().double().clone()
        return basic_step(*args, **kwargs)

    basic.step = step

    accum = run.train.global_batch_size // (run.train.micro_batch_size * trainer.dp_size)
    g = torch.Generator().manual_seed(1000 + trainer.dp_rank)  # other data on each DP rank
    m, s = run.train.micro_batch_size, run.model.seq_length
    batches = []
    for _ in range(accum):
        t = torch.randint(0, run.model.vocab_size, (m, s + 1), generator=g)
        batches.append((t[:, :-1], t[:, 1:], torch.ones(m, s)))
    trainer.train_step(batches)

    dp = trainer.dp_size
    out = {}
    for name, p in params.items():
        seen = torch.zeros(p.numel(), dtype=torch.float64)
        mapping = p._hp_mapping  # this rank's fragment of p in its flat fp32 partition
        if mapping is not None:
            grad = handed[mapping.get_hp_fragment().untyped_storage().data_ptr()]
            hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
            seen[lp.start:lp.start + lp.numel] = grad.narrow(0, hp.start, hp.numel)
        dist.all_reduce(seen, group=ps.get_data_parallel_group())
        sums = [exact[name], abs_sum[name], bf16_sum[name].double()]
        for x in sums:
            dist.all_reduce(x, group=ps.get_data_parallel_group())
        out[name] = (seen.view(p.shape), *(x / dp for x in sums))
    result = {"optimizer": type(engine.optimizer).__name__, "micro_batches": accum * dp,
              "data_types": [str(t) for t in engine.get_data_types()], "grads": out}
    torch.save(result, out_path)
    trainer.close()


if __name__ == "__main__":
    runs, current = [], []
    for arg in sys.argv[2:] + ["::"]:
        if arg == "::":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    main(sys.argv[1], runs)
