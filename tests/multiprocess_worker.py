"""Run by test_multiprocess.py under `accelerate launch --num_processes 2` (gloo on CPU); the test
imports the builders below to redo the same work on one process and compare.

    python -m accelerate.commands.launch ... tests/multiprocess_worker.py OUT_DIR

Each process takes one PPO and one GRPO iteration and one PPO update on its half of a fixed rollout;
process 0 writes what every process drew and ended with to OUT_DIR/ranks.json and the actor-critic
after the update on half the rollout to OUT_DIR/half_rollout.pt. Then, for PPO and for GRPO with
each loss aggregation, the gradient of one optimizer step on this process's half of a rollout whose
responses have unequal lengths (OUT_DIR/gradients.pt), and KTO's reference point from this
process's half of a batch (in ranks.json).
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.dpo import kto_kl_estimate
from palm_rlhf.grpo import GRPOTrainer
from palm_rlhf.ppo import Rollout, RLHFTrainer
from palm_rlhf.tokenizer import EOS_ID, ByteTokenizer

TEXTS = ["The movie is", "I liked it", "A film about", "Never again", "What a", "It was", "Plot:", "So"]
PROMPTS = [torch.cat((torch.tensor([EOS_ID]), ByteTokenizer().encode(text))) for text in TEXTS]
SEQ_LEN, BATCH, SEED = 24, 4, 5
KL = dict(beta=0.1, kl_target=0.01, kl_horizon=100)  # KL 0 at the first iteration: beta falls by the cap


class NoEOS(ByteTokenizer):
    """Every response runs to SEQ_LEN, so every process's rows hold the same number of tokens (the
    prompts, token ids, begin with the real EOS)."""

    eos_id = -1


def count_e(seq, prompt_mask, mask):
    return ((seq == ord("e")) & mask & ~prompt_mask).float().sum(dim=1)


def tiny_palm() -> PaLM:
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    torch.nn.init.normal_(palm.token_emb.weight, std=0.06)  # away from the init's near-uniform logits
    return palm


def ppo_trainer(accelerator=None, **kwargs) -> RLHFTrainer:
    torch.manual_seed(1)  # the adapters' init
    kwargs = dict(dict(reward_fn=count_e, prompt_token_ids=PROMPTS, tokenizer=NoEOS(), epochs=1, minibatch_size=BATCH,
                       max_grad_norm=1.0, seed=SEED, **KL), **kwargs)
    return RLHFTrainer(palm=tiny_palm(), accelerator=accelerator, **kwargs)


def grpo_trainer(accelerator=None, **kwargs) -> GRPOTrainer:
    torch.manual_seed(1)
    kwargs = dict(dict(reward_fn=count_e, prompt_token_ids=PROMPTS, group_size=2, minibatch_size=BATCH, seed=SEED), **kwargs)
    return GRPOTrainer(palm=tiny_palm(), accelerator=accelerator, **kwargs)


# one optimizer step's gradient, for the invariance tests: PPO, and GRPO with each aggregation
GRADIENT_CASES = {"ppo": {}, **{f"grpo_{how}": dict(loss_aggregation=how) for how in ("token", "sequence", "constant")}}
KTO_LOG_RATIOS = torch.tensor([[-3.0, -1.0, -2.0, -0.5], [1.0, 2.5, 0.5, 1.5]])  # process 0's are all negative


def gradient_trainer(case: str, accelerator=None, **kwargs):
    """The trainer of one invariance case, without clipping (the gradient itself is compared)."""
    if case == "ppo":
        return ppo_trainer(accelerator, max_grad_norm=0, minibatch_size=2 * BATCH, **kwargs)
    return grpo_trainer(accelerator, max_grad_norm=0, beta=0.1, kl_in="loss", minibatch_size=2 * BATCH,
                        **GRADIENT_CASES[case], **kwargs)


def unequal_rollout(trainer):
    """A fixed rollout of 2 * BATCH responses (the same on every process) cut to unequal lengths:
    response i keeps 1 + 5i mod (budget) tokens, so the two halves hold different token counts."""
    prompts = [trainer.prompts[i] for i in range(2 * BATCH)]
    if isinstance(trainer, GRPOTrainer):
        prompts = prompts[:BATCH]  # BATCH prompts x group_size 2
    rollout = trainer.rollout(prompts, SEQ_LEN, generator=torch.Generator().manual_seed(0))[0]
    response = rollout.mask[:, rollout.start:]
    keep = 1 + (5 * torch.arange(len(response))) % response.shape[1]
    response &= torch.arange(response.shape[1])[None] < keep[:, None]
    rollout.seq[:, rollout.start:][~response] = trainer.palm.pad_id
    return rollout


def one_step_gradient(trainer, rollout) -> dict:
    """The gradient of the trained parameters at the optimizer step of one minibatch (the whole
    rollout): {name: tensor}. The step itself is skipped."""
    grads = {}

    def record():
        grads.update({name: p.grad.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.grad is not None})

    trainer.optimizer.step = record
    trainer.optimizer_step(rollout, torch.arange(len(rollout.seq)))
    return grads


def fixed_rollout(trainer: RLHFTrainer) -> Rollout:
    """The same 2 * BATCH responses on every process (fixed prompts, fixed generator)."""
    prompts = [trainer.prompts[i] for i in range(2 * BATCH)]
    return trainer.rollout(prompts, SEQ_LEN, generator=torch.Generator().manual_seed(0))[0]


def rows(rollout, index) -> Rollout:
    tensors = {name: getattr(rollout, name)[index] for name in rollout.tensor_names()}
    return Rollout(**tensors, start=rollout.start, temperature=rollout.temperature)


def rows_of(rollout, index):
    """The rows `index` of any rollout dataclass (PPO's or GRPO's), its other fields kept."""
    return dataclasses.replace(rollout, **{name: getattr(rollout, name)[index] for name in rollout.tensor_names()})


def checksum(model) -> float:
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def drawn(trainer, stats, rollout) -> dict:
    return dict(seq=rollout.seq.tolist(), start=rollout.start, stats=stats, checksum=checksum(trainer.unwrapped))


def main(out_dir: Path):
    accelerator = Accelerator()
    rank = accelerator.process_index
    ppo = ppo_trainer(accelerator)
    report = dict(ppo=drawn(ppo, *ppo.step(SEQ_LEN, BATCH)), beta=ppo.kl.beta)
    grpo = grpo_trainer(accelerator)
    report["grpo"] = drawn(grpo, *grpo.step(SEQ_LEN, BATCH // 2))
    # DAPO's dynamic sampling: every process must take the same rounds of extra sampling
    dynamic = grpo_trainer(accelerator, dynamic_sampling=True)
    report["grpo_dynamic"] = drawn(dynamic, *dynamic.step(SEQ_LEN, BATCH // 2))

    # one update on this process's half of a rollout: the gradients averaged over the processes are
    # those of the whole rollout on one process (equal token counts, whitened once over the whole)
    half = ppo_trainer(accelerator, minibatch_size=2 * BATCH)
    rollout = fixed_rollout(half)
    half.learn(rows(rollout, slice(rank * BATCH, (rank + 1) * BATCH)))
    report["half_checksum"] = checksum(half.unwrapped)

    gradients = {}
    for case in GRADIENT_CASES:
        trainer = gradient_trainer(case, accelerator)
        rollout = unequal_rollout(trainer)
        gradients[case] = one_step_gradient(trainer, rows_of(rollout, slice(rank * BATCH, (rank + 1) * BATCH)))
    log_ratios = KTO_LOG_RATIOS[rank]
    report["kto_z0"] = float(kto_kl_estimate(log_ratios, torch.zeros_like(log_ratios), lambda x: accelerator.reduce(x, "mean")))

    reports = gather_object([report])
    if accelerator.is_main_process:
        (out_dir / "ranks.json").write_text(json.dumps(reports))
        torch.save(half.unwrapped.state_dict(), out_dir / "half_rollout.pt")
        torch.save(gradients, out_dir / "gradients.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
