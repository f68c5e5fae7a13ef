"""One rank of the attention-backend test: TP = world size, one attention backend.

Every rank builds the tiny model from the same per-name init (identical for any TP), runs
forward/backward on the same tokens; rank 0 saves logits, loss and full gradients.
"""

import os
import sys

import torch

from mesh_megatron.checkpoint.tensor_parallel import gather_state, gather_tensor
from mesh_megatron.config import ExecutionConfig, ParallelConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.parallel.initialize import destroy, initialize_distributed, set_seed


def main(variant: str, backend: str, out_dir: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    parallel = ParallelConfig(tensor_model_parallel_size=world)
    cfg = preset("tiny", variant, seq_length=32)
    validate(cfg, parallel, world)
    initialize_distributed(parallel)
    set_seed(1234)
    from megatron.core import parallel_state

    model = MeshGPTModel(cfg, to_transformer_config(cfg, parallel),
                         execution=ExecutionConfig(attention_backend=backend), init_seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(7))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        logits = gather_tensor(model(inputs), dim=-1, group=tp_group)  # [b, s, v]
    loss = model(inputs, labels=labels).mean()
    loss.backward()
    grads = gather_state({n: p.grad for n, p in model.named_parameters()}, model, tp_group)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "loss": loss.detach(), "grads": grads},
                   os.path.join(out_dir, f"{variant}_{backend}_tp{world}.pt"))
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
