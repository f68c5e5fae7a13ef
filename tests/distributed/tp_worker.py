"""One rank of the TP equivalence test: TP = world size, weights split from one full model.

world 1 writes the full model's state dict; world 2 loads and splits it. Every rank
runs forward/backward on the same tokens; rank 0 saves logits, loss and full gradients.
"""

import os
import sys

import torch

from mesh_megatron.checkpoint.tensor_parallel import gather_state, gather_tensor, shard_state_dict
from mesh_megatron.config import ExecutionConfig, ParallelConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.parallel.initialize import destroy, initialize_distributed, set_seed


# base and mesh also run relaxed (model/relaxation.py) in the same launch: adapters on every
# target, per-iteration biases and norms, random B and deltas so every adapter path carries signal.
RELAXED = dict(lora_rank=4, lora_alpha=8.0, relax_biases=True, relax_norms=True)
# mesh's launch also runs Mixture-of-Recursions (model/mor.py): half the tokens at iteration 1,
# auxiliary BCE and z-loss weighted so their gradients are visible next to the LM loss's.
MOR = dict(mor_capacities="1,0.5", mor_aux_weight=0.1, mor_z_loss=0.01)
# base's launch also runs Huginn's loop (model/injection.py): the core reads A [h_t; e] from a
# truncated-normal start drawn in training (zeros in eval), with the random recurrence below.
NOISE = dict(input_injection="concat-adapter", state_init="noise")
# mesh's launch also runs token-choice MoR (model/mor_token.py): a depth per token, balancing loss and z-loss weighted
# so their gradients show; the router's weights scaled so both depths occur.
MOR_TC = dict(mor_routing="token-choice", mor_balance_weight=0.1, mor_z_loss=0.01)


def main(variant: str, out_dir: str, backend: str = "auto") -> None:
    """`backend`: the attention backend; results of a non-default backend are saved as
    result_{variant}_{backend}_tp{world}.pt (the full weights stay those of world 1).
    base and mesh (default backend) also save result_{variant}+lora_tp{world}.pt."""
    world = int(os.environ["WORLD_SIZE"])
    parallel = ParallelConfig(tensor_model_parallel_size=world)
    initialize_distributed(parallel)
    runs = [(variant, preset("tiny", variant, seq_length=32))]
    if variant in ("base", "mesh") and backend == "auto":
        runs.append((f"{variant}+lora", preset("tiny", variant, seq_length=32, **RELAXED)))
    if variant == "base" and backend == "auto":
        runs.append(("base+noise", preset("tiny", "base", seq_length=32, **NOISE)))
    if variant == "mesh" and backend == "auto":
        runs.append(("mor", preset("tiny", "mor", seq_length=32, **MOR)))
        runs.append(("mor-tc", preset("tiny", "mor", seq_length=32, **MOR_TC)))
    for name, cfg in runs:
        _run(name, cfg, parallel, world, out_dir, backend)
    destroy()


def _run(name, cfg, parallel, world, out_dir, backend) -> None:
    validate(cfg, parallel, world)
    set_seed(1234)
    from megatron.core import parallel_state

    model = MeshGPTModel(cfg, to_transformer_config(cfg, parallel),
                         execution=ExecutionConfig(attention_backend=backend))
    full_path = os.path.join(out_dir, f"full_{name}.pt")
    if world == 1:
        if cfg.is_token_choice:
            with torch.no_grad():
                model.block.state_passing.router.weight.mul_(20.0)
        if cfg.is_relaxed or cfg.state_init == "noise":
            with torch.no_grad():
                gen = torch.Generator().manual_seed(3)
                for n, p in model.named_parameters():
                    if n.endswith((".lora_B", "_delta")):
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                    elif n.endswith("injection.adapter.weight"):  # off its [I, I] init
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        torch.save(model.state_dict(), full_path)
    else:
        full = torch.load(full_path)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        model.load_state_dict(shard_state_dict(full, model, tp_rank, world), strict=True)

    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    extra = {}
    if cfg.state_init == "noise":
        # evaluation starts from zeros: the same logits twice, and (test) at TP = 1 and 2
        model.eval()
        with torch.no_grad():
            first, second = model(inputs), model(inputs)
        assert torch.equal(first, second)
        extra["eval_logits"] = gather_tensor(first, dim=-1, group=tp_group)
        model.train()
        # training draws the start from torch's generator, seeded alike on every TP rank (as
        # dropout outside TP regions); the same state at TP = 1 and 2 from here on
        torch.manual_seed(5)
    with torch.no_grad():
        logits = gather_tensor(model(inputs), dim=-1, group=tp_group)  # [b, s, v]
    from mesh_megatron.model.mor import AuxLossScale, mor_modules

    AuxLossScale.set(1.0)  # MoR: the auxiliary loss's gradient enters backward at weight x 1
    loss = model(inputs, labels=labels).mean()
    loss.backward()
    for sp in mor_modules(model):  # every TP rank keeps the same tokens: spread of the indices
        index = torch.cat([r.index.flatten() for r in sp.last]).float()
        hi, lo = index.clone(), index.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=parallel_state.get_tensor_model_parallel_group())
        extra = {"aux": sp.records[-1], "index": index, "index_spread": (hi - lo).abs().max(),
                 **({"depth": sp.routing.depth} if cfg.is_token_choice else {})}
    grads = gather_state({n: p.grad for n, p in model.named_parameters()}, model, tp_group)
    # replicated parameters (norms, routers, A of column / B of row adapters): every rank must
    # hold the same full gradient, with no reduction after backward
    spread = torch.zeros(())
    for n, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            hi, lo = p.grad.clone(), p.grad.clone()
            torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=tp_group)
            spread = torch.maximum(spread, (hi - lo).abs().max())
    if name in ("base", "base+noise"):  # random recurrence (drawn n = 6, last k = 2 with gradient) on every TP rank
        from mesh_megatron.config import RecurrenceConfig

        model.zero_grad(set_to_none=True)
        model.block.recurrence = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
        rr_loss = model(inputs, labels=labels, recurrence_key=(0, 2)).mean()
        rr_loss.backward()
        extra = {**extra, "rr_loss": rr_loss.detach(), "rr_grads": gather_state(
            {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()},
            model, tp_group)}
    if torch.distributed.get_rank() == 0:
        from mesh_megatron.model.attention import core_attention_names

        torch.save({"logits": logits, "loss": loss.detach(), "grads": grads, "core": core_attention_names(model),
                    "replicated_spread": spread, **extra},
                   os.path.join(out_dir, f"result_{name}{'' if backend == 'auto' else '_' + backend}_tp{world}.pt"))


def checkpoint_logits(ckpt_dir: str, ids_path: str, out_path: str) -> None:
    """Logits of a TP = world size training checkpoint computed the way training computes them:
    each rank loads its own mp_rank file into its TP shard of the model, logits all-gathered
    over the vocab. No merge of shards is involved: a reference for exports."""
    from mesh_megatron.checkpoint.reader import open_checkpoint, shard_name

    world = int(os.environ["WORLD_SIZE"])
    ckpt = open_checkpoint(ckpt_dir)
    assert ckpt.tp == world and ckpt.pp == 1, (ckpt.tp, ckpt.pp)
    parallel = ParallelConfig(tensor_model_parallel_size=world)
    initialize_distributed(parallel)
    set_seed(1234)
    from megatron.core import parallel_state

    model = MeshGPTModel(ckpt.model, to_transformer_config(ckpt.model, parallel))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    states = torch.load(os.path.join(ckpt.path, shard_name(tp_rank)), map_location="cpu", weights_only=False)
    model.load_state_dict(states["module"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = gather_tensor(model(torch.load(ids_path)), dim=-1, group=parallel_state.get_tensor_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)
    destroy()


def router_init_base(out_dir: str, margin: str) -> None:
    """`base` and `mesh --mesh-router-init base --mesh-router-margin MARGIN`, each drawn from
    init seed 1234 at TP = world size (the init is per parameter name, so the shared layers
    are the same weights): rank 0 saves both models' logits, gathered over the vocabulary."""
    world = int(os.environ["WORLD_SIZE"])
    parallel = ParallelConfig(tensor_model_parallel_size=world)
    initialize_distributed(parallel)
    from megatron.core import parallel_state

    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(7))
    logits = {}
    for variant, extra in (("base", {}), ("mesh", dict(mesh_router_init="base", mesh_router_margin=float(margin)))):
        cfg = preset("tiny", variant, seq_length=32, **extra)
        validate(cfg, parallel, world)
        model = MeshGPTModel(cfg, to_transformer_config(cfg, parallel), init_seed=1234).eval()
        with torch.no_grad():
            logits[variant] = gather_tensor(model(tokens), dim=-1, group=parallel_state.get_tensor_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        torch.save(logits, os.path.join(out_dir, f"router_init_tp{world}.pt"))
    destroy()


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint_logits":
        checkpoint_logits(*sys.argv[2:5])
    elif sys.argv[1] == "router_init_base":
        router_init_base(*sys.argv[2:4])
    else:
        main(*sys.argv[1:4])
