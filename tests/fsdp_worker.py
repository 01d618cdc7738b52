"""Run by test_fsdp.py under `accelerate launch --num_processes 2` (torchrun, gloo on CPU), without
Accelerate's wrapping: Accelerate turns FSDP on only for accelerator devices (README, "Several
processes and GPUs"), so this worker calls FSDP2's `fully_shard` itself, as Accelerate's FSDP2 plugin
does with configs/fsdp2.yaml: each ParallelBlock, then the whole PaLM.

    python -m accelerate.commands.launch ... tests/fsdp_worker.py OUT_DIR

A tiny PaLM with a LoRA scope on its frozen base; each process takes STEPS AdamW steps on its own
batch, samples greedily from the scope under FSDP, and gathers the full state dict to process 0,
which writes it with PaLM.save to OUT_DIR/final. OUT_DIR/ranks.json holds, per process, the shape
of its shard of the first block's fused input weight and the tokens it sampled from its prompt. The test imports the
builders below to redo the training on one process.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from palm_rlhf import PaLM, PaLMConfig

STEPS, BATCH, SEQ_LEN, LORA_R, LR = 2, 2, 16, 4, 1e-2
PROMPT = torch.tensor([[84, 104, 101, 32, 109, 111, 118, 105]])  # "The movi"


def tiny_palm() -> PaLM:
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    palm.add_finetune_params("actor", lora_r=LORA_R)
    return palm.finetune_only("actor")


def batch(rank: int) -> torch.Tensor:
    """Process `rank`'s batch: bytes only, so no target is PAD and each process's loss averages the
    same number of tokens (the mean of two processes' losses is then the loss of both batches)."""
    return torch.randint(0, 256, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(rank))


def prompt(rank: int) -> torch.Tensor:
    """Process 1's prompt is shorter, so it decodes more tokens than process 0, which must step
    along: each forward under FSDP gathers weights from both (generate's synced_gpus)."""
    return PROMPT[:, : PROMPT.shape[1] - 4 * rank]


def train(palm: PaLM, tokens: torch.Tensor):
    optimizer = torch.optim.AdamW(palm.finetune_parameters("actor"), lr=LR)
    for _ in range(STEPS):
        palm(tokens, return_loss=True, finetune_scope="actor").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(out_dir: Path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    palm = tiny_palm()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in palm.layers:  # each block gathered for its own forward and backward, then resharded
        fully_shard(layer, mesh=mesh)
    fully_shard(palm, mesh=mesh)  # the rest: embedding, final norm, the LoRA scope
    train(palm, batch(rank))
    tokens = palm.generate(SEQ_LEN, prompt=prompt(rank), finetune_scope="actor", temperature=0.0)
    full = get_model_state_dict(palm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # to rank 0
    report = dict(shard=list(palm.layers[0].fused_in.weight.to_local().shape), tokens=tokens.tolist())
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        palm.save(out_dir / "final", state_dict=full)
        (out_dir / "ranks.json").write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
