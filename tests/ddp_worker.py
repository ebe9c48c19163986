"""One rank of the data-parallel test (launched by torchrun from tests/test_ddp.py; not a test itself).

Two steps of the tiny model (segments of one block, so the state's write is replayed) with a checkpoint in between; rank 0 writes the first step's gradients, the final
weights and both losses to OUT.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from block_recurrent import BlockRecurrentConfig
from block_recurrent.training.distributed import Distributed
from block_recurrent.training.trainer import TrainConfig, Trainer

torch.set_num_threads(1)
data, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
distributed = Distributed.from_env()
config = TrainConfig(data=data, out_dir=str(out / "run"), batch_size=batch_size, segments=2, warmup_steps=1,
                     eval_every=0, checkpoint_every=0, progress=False, lr=3e-3, bf16=False, final_eval=False)
trainer = Trainer(BlockRecurrentConfig.from_name("tiny").replace(max_seq_len=32), config, distributed=distributed)
losses = [trainer.train_step()["loss"]]
grads = {f"grad.{n}": p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
trainer.save()  # every rank takes part: positions and carried states are gathered to rank 0
losses.append(trainer.train_step()["loss"])
if distributed.rank == 0:
    params = {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    save_file({**grads, **params}, str(out / "result.safetensors"))
    (out / "losses.json").write_text(json.dumps({"losses": losses, "world_size": distributed.world_size}))
