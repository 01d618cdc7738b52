"""Direct preference optimisation: DPO, IPO, conservative DPO and KTO, a compact alternative to
reward model + PPO.

    DPO   Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
          Reward Model", eq. 7
    cDPO  Mitchell 2023, "A note on DPO with noisy preferences": DPO with label smoothing
    IPO   Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
          Preferences", eq. 17
    KTO   Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8,
          for unpaired desirable / undesirable examples

Each loss is a function of summed response log-probs, log pi(y|x) = sum_t log pi(y_t | x, y_<t),
under the policy and under the frozen reference. The implicit reward of a response is
beta * log(pi(y|x) / pi_ref(y|x)) (DPO section 5); preference accuracy counts how often it ranks
the chosen response above the rejected one.

How this departs from the papers:
1. The reference policy is the same PaLM with its fine-tune scope switched off (`disable_lora=True`),
   not a second copy: only the adapters train, so the base weights are the reference. Its
   log-probs can also be computed once before training and cached (`precompute_ref=True`).
2. The policy is LoRA adapters on a frozen PaLM (Hu et al. 2021), not a full fine-tune.
3. IPO uses summed log-probs, as eq. 17 is written, and `beta` plays the part of its tau.
4. KTO's reference point z0 is estimated per batch from mismatched (prompt, response) pairs, as the
   paper's section 4.1 does; where every prompt is empty (plain review snippets) a mismatched pair
   is just another response of the batch, so the batch's own log-ratios give the estimate.
5. Training runs without dropout (the PaLM keeps its rates for LM training): policy and reference
   are then one function until the adapters move, and the loss starts at log 2.

Sequences: [EOS] + prompt + response + [EOS], EOS doubling as begin-of-document; only response
tokens (its closing EOS included) are scored.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from palm_rlhf.config import check_settings, setting, with_settings
from palm_rlhf.model import token_log_probs
from palm_rlhf.reward import preference_accuracy
from palm_rlhf.tokenizer import PAD_ID, ByteTokenizer, pad
from palm_rlhf.training import check_finite, lr_lambda_warmup_cosine

METHODS = ("dpo", "ipo", "cdpo", "kto")

# ---------------------------------------------------------------------------------------------------
# losses: inputs are summed response log-probs, (b,) each


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """DPO, Rafailov et al. 2023, eq. 7:

        L = -log sigmoid(beta * [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)])

    With label_smoothing = eps > 0 it is conservative DPO (Mitchell 2023): the label is flipped with
    probability eps, L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    Returns (mean loss, chosen rewards (b,), rejected rewards (b,)), rewards = beta * log-ratio.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards  # beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, tau: float = 0.1):
    """IPO, Azar et al. 2023, eq. 17: a squared loss that pulls the log-ratio margin to 1 / (2 tau)
    instead of pushing it to infinity, so it does not overfit deterministic preferences:

        L = (log [pi(y_w) pi_ref(y_l)] / [pi(y_l) pi_ref(y_w)] - 1 / (2 tau))^2

    Returns (mean loss, chosen rewards, rejected rewards), rewards = tau * log-ratio.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * tau)) ** 2
    return losses.mean(), (tau * chosen_ratio).detach(), (tau * rejected_ratio).detach()


def kto_kl_estimate(policy_logps, ref_logps, reduce_mean=None):
    """KTO's reference point z0 = KL(pi || pi_ref), Ethayarajh et al. 2024, section 4.1: the mean
    log-ratio over mismatched (x, y') pairs of the batch, clamped at 0 and detached (no gradient
    flows through the reference point). `reduce_mean` averages over processes (their batches are of
    one size), before the clamp: a clamp per process would turn one process's negative mean into 0
    and raise the shared z0 (TRL gathers first, too)."""
    mean = (policy_logps - ref_logps).mean().detach()
    return (mean if reduce_mean is None else reduce_mean(mean)).clamp(min=0)


def kto_loss(policy_logps, ref_logps, desirable, beta: float = 0.1, kl_estimate=0.0,
             lambda_d: float = 1.0, lambda_u: float = 1.0):
    """KTO, Ethayarajh et al. 2024, eq. 8, with r = log pi(y|x) / pi_ref(y|x) and z0 = kl_estimate:

        v(x, y) = lambda_D sigmoid(beta (r - z0))   if y is desirable
                  lambda_U sigmoid(beta (z0 - r))   if y is undesirable
        L = E[lambda_y - v(x, y)]

    desirable: (b,) bool. Returns (mean loss, rewards (b,) = beta * r).
    """
    log_ratio = policy_logps - ref_logps
    desirable_value = lambda_d * torch.sigmoid(beta * (log_ratio - kl_estimate))
    undesirable_value = lambda_u * torch.sigmoid(beta * (kl_estimate - log_ratio))
    losses = torch.where(desirable, lambda_d - desirable_value, lambda_u - undesirable_value)
    return losses.mean(), (beta * log_ratio).detach()


# ---------------------------------------------------------------------------------------------------
# sequences and their log-probs


def encode_responses(prompts: list, responses: list, max_len: int = 320, tokenizer=None):
    """[EOS] + prompt + response + [EOS] per example, right-padded with PAD: see `pack_sequences`.
    A sequence longer than max_len loses the end of its response, closing EOS included: a cut
    response did not end there. `tokenizer`: bytes by default."""
    tokenizer = tokenizer or ByteTokenizer()
    heads, tails = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        head = tokenizer.encode_prompt(prompt).tolist()
        if len(head) >= max_len:
            raise ValueError(f"prompt {prompt[:40]!r}... leaves no room for a response in max_len={max_len}")
        heads.append(head)
        tails.append((tokenizer.encode(response).tolist() + [tokenizer.eos_id])[: max_len - len(head)])
    return pack_sequences(heads, tails, tokenizer.pad_id)


def pack_sequences(heads: list, tails: list, pad_id: int = PAD_ID):
    """Token lists head + tail per example, right-padded with `pad_id`.

    Returns seq (b, n) long, mask (b, n) bool (real tokens), response_mask (b, n) bool (the tail:
    the tokens that are scored).
    """
    seq, mask = pad([list(head) + list(tail) for head, tail in zip(heads, tails)], pad_id)
    response_mask, _ = pad([[0] * len(head) + [1] * len(tail) for head, tail in zip(heads, tails)], 0)
    return seq, mask, response_mask.bool()


def sequence_log_probs(model, seq, mask, response_mask, finetune_scope=None, disable_lora=False, temperature: float = 1.0):
    """Summed log-prob of each sequence's response tokens under softmax(logits / temperature), (b,).

    Goes through `model`'s forward (as PaLM.log_probs does), so that a DDP-wrapped model syncs its
    gradients; `model` may be a PaLM or its Accelerate wrapper.
    """
    logits = model(seq[:, :-1], mask=mask[:, :-1], finetune_scope=finetune_scope, disable_lora=disable_lora)
    return (token_log_probs(logits, seq[:, 1:], temperature) * response_mask[:, 1:]).sum(dim=-1)  # (b,)


@torch.no_grad()
def reference_kl(palm, seq, mask, response_mask, finetune_scope, temperature: float = 1.0):
    """Exact KL(policy || reference) at each response token, summed over the vocabulary (no sampling
    noise), the reference being the adapters switched off, both at the sampling temperature (the
    policies are softmax(logits / T)). Returns (mean per token, mean per response: the sum over a
    response's tokens, the figure PPO's KL penalty is a one-sample estimate of)."""
    policy = (palm(seq[:, :-1], mask=mask[:, :-1], finetune_scope=finetune_scope).float() / temperature).log_softmax(dim=-1)
    reference = (palm(seq[:, :-1], mask=mask[:, :-1], disable_lora=True).float() / temperature).log_softmax(dim=-1)
    kl = (policy.exp() * (policy - reference)).sum(dim=-1) * response_mask[:, 1:]  # (b, n-1)
    return float(kl.sum() / response_mask[:, 1:].sum().clamp(min=1)), float(kl.sum(dim=-1).mean())


# ---------------------------------------------------------------------------------------------------
# data


def kto_examples(records: list, desirable_min: float = 4, undesirable_max: float = 2) -> list:
    """{"prompt", "response", "rating"} records -> KTO examples {"prompt", "response", "desirable"}.

    rating >= desirable_min is desirable, rating <= undesirable_max undesirable; the middle is
    dropped (on 1..5 stars, the defaults keep 4-5 against 1-2)."""
    if desirable_min <= undesirable_max:
        raise ValueError(f"desirable_min ({desirable_min}) must exceed undesirable_max ({undesirable_max})")
    return [
        dict(prompt=r["prompt"], response=r["response"], desirable=r["rating"] >= desirable_min)
        for r in records
        if r["rating"] >= desirable_min or r["rating"] <= undesirable_max
    ]


def check_examples(examples: list, keys: tuple, what: str):
    if not examples:
        raise ValueError(f"no {what} to train on")
    missing = [k for k in keys if k not in examples[0]]
    if missing:
        raise ValueError(f"{what} need the keys {keys}; the first one lacks {missing}")


# ---------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class DPOConfig:
    """DPO's, IPO's, cDPO's and KTO's settings; the defaults are train_dpo.py's."""

    method: str = setting("dpo", "dpo, ipo, cdpo (DPO with label smoothing) or kto", choices=METHODS)
    beta: float = setting(0.1, "strength of the pull to the reference (IPO's tau)", above=0)
    label_smoothing: float = setting(0.1, "cdpo: assumed probability that a preference label is flipped", at_least=0, at_most=0.5)
    lambda_d: float = setting(1.0, "kto: weight of desirable examples", above=0)
    lambda_u: float = setting(1.0, "kto: weight of undesirable examples", above=0)
    scope: str = setting("dpo", "name of the policy's fine-tune scope on the PaLM")
    lora_r: int = setting(8, "LoRA rank of the policy adapters", at_least=1)
    lr: float = setting(1e-3, "peak learning rate of the adapters", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    warmup_steps: int = setting(20, "linear warm-up steps, then cosine decay to steps", at_least=0)
    steps: int = setting(350, "optimizer steps (350 x 16 is about one pass over the pairs); the cosine ends there", at_least=1)
    batch_size: int = setting(16, "pairs (kto: examples) per process per micro-batch", at_least=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", at_least=1)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", at_least=0)
    max_len: int = setting(96, "longest sequence in tokens (96 BPE tokens hold about 340 bytes; with a byte-level LM use about 320); longer responses are cut", at_least=2)
    precompute_ref: bool = setting(False, "compute the reference log-probs of all training data once, not per batch")
    seed: int = setting(0, "seed for pairing, batches and sampling")

    def __post_init__(self):
        check_settings(self)


class DPOTrainer:
    """Trains LoRA adapters of one PaLM by DPO, IPO, cDPO (pairs) or KTO (unpaired examples); the
    same PaLM with the adapters off is the reference. Settings: `config` (a DPOConfig, default
    DPOConfig()), any of its fields as keywords on top.

        trainer = DPOTrainer(palm=palm, pairs=pairs)   # train_dpo.py's settings
        trainer.train()                                # config.steps
        trainer.evaluate(held_out_pairs)               # dict(pref_accuracy, reward_margin, ...)
    """

    def __init__(self, *, palm, pairs: list | None = None, examples: list | None = None, config: DPOConfig | None = None,
                 accelerator: Accelerator | None = None, **settings):
        c = self.config = with_settings(config or DPOConfig(), settings, "DPOTrainer")
        if c.method == "kto":
            check_examples(examples, ("prompt", "response", "desirable"), "KTO examples")
        else:
            check_examples(pairs, ("prompt", "chosen", "rejected"), f"{c.method.upper()} pairs")
        if palm.tokenizer is None:
            raise ValueError(f"{c.method.upper()} reads text: this {palm.num_tokens}-token PaLM needs its tokenizer (palm.tokenizer = ...)")
        self.method, self.beta, self.scope, self.max_len = c.method, c.beta, c.scope, c.max_len
        self.data = examples if c.method == "kto" else pairs
        self.accelerator = accelerator or Accelerator(gradient_accumulation_steps=c.grad_accum)
        self.grad_accum = self.accelerator.gradient_accumulation_steps

        if c.scope not in palm.finetune_modules:
            palm.add_finetune_params(c.scope, lora_r=c.lora_r)
        palm.finetune_only(c.scope)
        self.palm = palm  # the unwrapped model: generation, saving, adapters
        optimizer = torch.optim.AdamW(palm.finetune_parameters(c.scope), lr=c.lr, weight_decay=c.weight_decay)
        # stepped once per optimizer step on every process, so not handed to accelerator.prepare
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_warmup_cosine(c.warmup_steps, c.steps))
        self.model, self.optimizer = self.accelerator.prepare(palm, optimizer)
        self.step = 0
        self.held_out_ref = {}
        self.ref_cache = self._reference_log_probs_of_all() if c.precompute_ref else None

    # --- batches ----------------------------------------------------------------------------------

    def _encode(self, records):
        """One forward for a batch: for pairs the chosen then the rejected responses, (2b, n)."""
        prompts = [r["prompt"] for r in records]
        if self.method == "kto":
            responses = [r["response"] for r in records]
        else:
            prompts = prompts + prompts
            responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
        return [t.to(self.accelerator.device) for t in encode_responses(prompts, responses, self.max_len, self.palm.tokenizer)]

    def _batch_indices(self, step: int, micro: int):
        # depends only on (seed, step, micro, rank): a resumed run draws the batches an
        # uninterrupted one would
        rng = np.random.default_rng([self.config.seed, step, micro, self.accelerator.process_index])
        return rng.choice(len(self.data), size=min(self.config.batch_size, len(self.data)), replace=False)

    @torch.no_grad()
    def _reference_log_probs(self, records):
        return sequence_log_probs(self.palm, *self._encode(records), disable_lora=True)

    def _reference_log_probs_of_all(self):
        """Reference log-probs of every training example, computed once: (len(data),) or (len(data), 2)."""
        chunks = []
        for start in tqdm(range(0, len(self.data), self.config.batch_size), desc="reference log-probs",
                          disable=not self.accelerator.is_main_process):
            logps = self._reference_log_probs(self.data[start : start + self.config.batch_size])
            chunks.append(logps if self.method == "kto" else torch.stack(logps.chunk(2), dim=-1))
        return torch.cat(chunks)

    # --- one update -------------------------------------------------------------------------------

    def compute_loss(self, records, ref_logps=None):
        """Loss and metrics of a batch. ref_logps: cached reference log-probs, or None to compute them."""
        seq, mask, response_mask = self._encode(records)
        policy = sequence_log_probs(self.model, seq, mask, response_mask, finetune_scope=self.scope)
        if ref_logps is None:
            with torch.no_grad():
                ref_logps = sequence_log_probs(self.model, seq, mask, response_mask, disable_lora=True)
        elif self.method != "kto":
            ref_logps = torch.cat((ref_logps[:, 0], ref_logps[:, 1]))
        if self.method == "kto":
            return self._kto_loss(records, policy, ref_logps)

        (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = policy.chunk(2), ref_logps.chunk(2)
        if self.method == "ipo":
            loss, chosen, rejected = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        else:
            smoothing = self.config.label_smoothing if self.method == "cdpo" else 0.0
            loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                              self.beta, smoothing)
        return loss, dict(loss=loss.detach(), pref_accuracy=preference_accuracy(chosen, rejected),
                          reward_margin=(chosen - rejected).mean(), chosen_reward=chosen.mean(),
                          rejected_reward=rejected.mean())

    def _kto_loss(self, records, policy, ref_logps):
        if all(not r["prompt"] for r in records):
            kl_policy, kl_ref = policy.detach(), ref_logps  # a mismatched pair is another response
        else:
            # prompt i with response i + 1: pairs the policy was not asked about
            shifted = [dict(prompt=r["prompt"], response=s["response"]) for r, s in zip(records, records[1:] + records[:1])]
            seq, mask, response_mask = self._encode(shifted)
            with torch.no_grad():
                kl_policy = sequence_log_probs(self.model, seq, mask, response_mask, finetune_scope=self.scope)
                kl_ref = sequence_log_probs(self.model, seq, mask, response_mask, disable_lora=True)
        kl = kto_kl_estimate(kl_policy, kl_ref, lambda x: self.accelerator.reduce(x, "mean"))  # one z0 for all processes
        desirable = torch.tensor([bool(r["desirable"]) for r in records], device=policy.device)
        loss, rewards = kto_loss(policy, ref_logps, desirable, self.beta, kl, self.config.lambda_d, self.config.lambda_u)
        # a batch without one kind gives nan for its mean, which every process logs alike
        desirable_reward, undesirable_reward = rewards[desirable].mean(), rewards[~desirable].mean()
        return loss, dict(loss=loss.detach(), kl_estimate=kl, desirable_reward=desirable_reward,
                          undesirable_reward=undesirable_reward, reward_margin=desirable_reward - undesirable_reward)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns the last micro-batch's metrics."""
        # without dropout: policy and reference must be one function while the adapters are zero,
        # so the loss starts at that of pi = pi_ref (log 2 for DPO), as TRL's disable_dropout
        self.model.eval()
        for micro in range(self.grad_accum):
            with self.accelerator.accumulate(self.model):
                indices = self._batch_indices(self.step, micro)
                ref = None if self.ref_cache is None else self.ref_cache[torch.from_numpy(indices).to(self.ref_cache.device)]
                loss, metrics = self.compute_loss([self.data[i] for i in indices], ref)
                check_finite(self.accelerator.reduce(loss.detach(), "mean"), self.step)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.palm.finetune_parameters(self.scope), self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        metrics = {k: float(self.accelerator.reduce(v.detach(), "mean")) for k, v in metrics.items()}
        return dict(metrics, lr=self.scheduler.get_last_lr()[0])

    def train(self, num_steps: int | None = None, callback=None):
        """Trains until `self.step == num_steps` (the config's steps by default); after each step calls
        callback(step, metrics) (logging, evaluation, checkpoints). Returns the last step's metrics."""
        num_steps = self.config.steps if num_steps is None else num_steps
        progress = tqdm(range(self.step, num_steps), initial=self.step, total=num_steps,
                        desc=self.method, disable=not self.accelerator.is_main_process)
        metrics = {}
        for _ in progress:
            metrics = self.train_step()
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if callback is not None:
                callback(self.step, metrics)
        return metrics

    # --- evaluation -------------------------------------------------------------------------------

    def _held_out_reference(self, batch, seq, mask, response_mask):
        """Reference log-probs of evaluation pairs, (2b,), memoised: the base is frozen, so they
        never change and each evaluation after the first costs half as much."""
        keys = [(p["prompt"], p["chosen"], p["rejected"]) for p in batch]
        if not all(k in self.held_out_ref for k in keys):
            ref = sequence_log_probs(self.palm, seq, mask, response_mask, disable_lora=True)
            self.held_out_ref.update(zip(keys, torch.stack(ref.chunk(2), dim=-1)))
        ref = torch.stack([self.held_out_ref[k] for k in keys])  # (b, 2): chosen, rejected
        return torch.cat((ref[:, 0], ref[:, 1]))

    @torch.no_grad()
    def evaluate(self, pairs: list, batch_size: int = 32) -> dict:
        """Implicit-reward preference accuracy on held-out pairs (whatever the training method):
        dict(pref_accuracy, reward_margin, chosen_reward, rejected_reward), rewards = beta * log-ratio."""
        check_examples(pairs, ("prompt", "chosen", "rejected"), "evaluation pairs")
        self.model.eval()
        # each process scores its own slice; the sums are added across processes
        mine = pairs[self.accelerator.process_index :: self.accelerator.num_processes]
        # only sums are kept, so the order is free: sorting by length leaves little padding
        mine = sorted(mine, key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))
        chosen, rejected = [], []
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            prompts = [p["prompt"] for p in batch] * 2
            responses = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
            seq, mask, response_mask = (t.to(self.accelerator.device)
                                        for t in encode_responses(prompts, responses, self.max_len, self.palm.tokenizer))
            policy = sequence_log_probs(self.palm, seq, mask, response_mask, finetune_scope=self.scope)
            rewards = self.beta * (policy - self._held_out_reference(batch, seq, mask, response_mask))
            chosen.append(rewards[: len(batch)])
            rejected.append(rewards[len(batch) :])
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        count = torch.tensor(float(len(chosen)), device=chosen.device)
        sums = torch.stack([preference_accuracy(chosen, rejected) * count, (chosen - rejected).sum(),
                            chosen.sum(), rejected.sum(), count])
        accuracy, margin, chosen_sum, rejected_sum, count = self.accelerator.reduce(sums, "sum").tolist()
        return dict(pref_accuracy=accuracy / count, reward_margin=margin / count,
                    chosen_reward=chosen_sum / count, rejected_reward=rejected_sum / count)
