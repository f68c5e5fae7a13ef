#!/usr/bin/env python
"""Pretrain a MeSH recursive transformer.

    deepspeed pretrain_mesh.py --ds_config examples/zero2.json                 # embedded default
    deepspeed --num_gpus 2 pretrain_mesh.py --ds_config examples/zero2.json    # 2 data-parallel ranks
    torchrun --nproc_per_node 2 pretrain_mesh.py --tensor-model-parallel-size 2 --ds_config examples/zero1.json

All logic lives in mesh_megatron.training; `--help` lists every flag.
"""

import sys

from mesh_megatron.training.run import main

if __name__ == "__main__":  # guard: checkpoint helpers may spawn processes that re-import this file
    sys.exit(main())
