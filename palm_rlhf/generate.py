"""Sampling from a PaLM: filters, one sampled token, and the decoding loop over a batch of prompts.

`generate(model, seq_len, prompt, ...)` encodes the (left-padded) prompts once into a KV cache
(`KVCache`: one key/value head per layer, preallocated, so each step writes in place), then takes one token per step for every row, each step one forward pass
of one token per row, until every row has emitted EOS or the sequences reach `seq_len`. Like
gpt-fast's and nanochat's engines it knows nothing of tokenization: token ids in, token ids out.
Choices, and where they come from:

- Temperature sampling with optional top-k and nucleus (top-p, Holtzman et al. 2020) filters; the
  log-probs it returns are those of softmax(logits / T), the policy RL optimises, whatever filter
  restricted the draw.
- A token is drawn by the exponential race argmax(p / q), q ~ Exp(1): what torch.multinomial draws
  for one sample, from the same random numbers, without its dozen checks per step.
- G samples of a prompt share its cache (`num_samples_per_prompt`): the prompt is encoded once and
  its cache rows repeated, as GRPO's groups need.
- With weights sharded over processes (FSDP2, ZeRO-3), every forward is a collective: every process
  decodes until all have ended (`synced_gpus`, transformers' name).
- The loop runs under torch.inference_mode and returns plain tensors (`outside_autograd`).
- A bf16 model on a CPU multiplies by weights oneDNN reordered once per call (`DecodingWeights`,
  as torch.compile's weight freezing does): the same bits as nn.Linear's products, faster at a few rows.

The model is model.PaLM; the KV cache its forward pass writes to is here, with the loop that fills it.
"""
import functools

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from palm_rlhf.checkpoint import weights_sharded
from palm_rlhf.model import activation_dtype, eval_mode, rotary_tables
from palm_rlhf.tokenizer import pad

# ---------------------------------------------------------------------------------------------------
# KV cache: one key/value head per layer, preallocated so each decoding step writes in place


class KVCache:
    """What a decoding step reads and writes per layer (`model.ParallelBlock` calls `update`), and the
    positions and key mask of every row."""

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """An empty cache for `batch` rows of up to `max_len` tokens, in the dtype `model` computes in."""
        return cls(len(model.layers), batch, max_len, model.config.dim_head, model.device,
                   activation_dtype(model.token_emb.weight), model.xpos_scale_base)

    def __init__(self, depth: int, batch: int, max_len: int, dim_head: int, device, dtype,
                 xpos_scale_base: int | None = None):
        self.k = torch.zeros(depth, batch, 1, max_len, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.any_padding = False
        self.weights: DecodingWeights | None = None  # set by generate where DecodingWeights.suit the model
        # the rotary tables of every position the cache can hold, built once: a step gathers its rows
        positions = torch.arange(max_len, device=device)[None]
        cos, sin, xpos = rotary_tables(positions, dim_head, xpos_scale_base, dtype)
        self.rotary_table = (cos[0, 0], sin[0, 0], None if xpos is None else tuple(t[0, 0] for t in xpos))

    def append(self, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Registers n new tokens, real where mask (b, n) says (all of them when None); returns their
        positions (b, n)."""
        if mask is None and n == 1:  # a decoding step: three small ops
            self.key_mask[:, self.length].fill_(True)
            positions = self.next_position[:, None]
            self.next_position = self.next_position + 1
            return positions
        if mask is None:
            mask = torch.ones(self.key_mask.shape[0], n, dtype=torch.bool, device=self.key_mask.device)
        self.key_mask[:, self.length : self.length + n] = mask
        positions = self.next_position[:, None] + mask.long().cumsum(dim=1) - 1
        self.next_position = self.next_position + mask.long().sum(dim=1)
        self.any_padding = self.any_padding or not bool(mask.all())
        return positions.clamp(min=0)

    def rotary(self, positions: torch.Tensor):
        """rotary_tables(positions, ...) for positions (b, n), gathered from the tables built once."""
        cos, sin, xpos = self.rotary_table
        xpos = None if xpos is None else tuple(t[positions][:, None] for t in xpos)
        return cos[positions][:, None], sin[positions][:, None], xpos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes this step's (b, 1, n, d) keys/values; returns all keys/values so far."""
        n = k.shape[2]
        self.k[layer, :, :, self.length : self.length + n] = k
        self.v[layer, :, :, self.length : self.length + n] = v
        end = self.length + n
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, repeats: int):
        """Each row becomes `repeats` consecutive rows (b -> b * repeats): a prompt encoded once
        then serves every sample drawn from it."""
        self.k = self.k.repeat_interleave(repeats, dim=1)  # (depth, b * repeats, 1, max_len, d)
        self.v = self.v.repeat_interleave(repeats, dim=1)
        self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)
        self.next_position = self.next_position.repeat_interleave(repeats, dim=0)


class DecodingWeights:
    """Every nn.Linear weight of a bf16 model on a CPU, reordered once per generate call into oneDNN's
    blocked layout for a batch of `rows` (what torch.compile's weight freezing does for inference).
    A decoding step multiplies a few rows by every weight, and there the reordered product is up to
    2x faster than nn.Linear's, which starts from the plain layout on every call
    (docs/rollout-precision.md#speed); the result is bitwise the same (oneDNN computes both).
    `model.linear` routes a cached forward here."""

    def __init__(self, model, rows: int):
        self.packed = {module: torch.ops.mkldnn._reorder_linear_weight(module.weight, rows)
                       for module in model.modules() if type(module) is nn.Linear and module.bias is None}

    @staticmethod
    def suit(model) -> bool:
        """True for a bf16 model computing in bf16 on a CPU with oneDNN's bf16 kernels, whole on this
        process (a sharded weight is gathered per forward, so there is nothing to reorder once)."""
        weight = model.token_emb.weight
        return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and activation_dtype(weight) == weight.dtype
                and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and not weights_sharded(model))

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed.get(module)
        if packed is None:
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# ---------------------------------------------------------------------------------------------------
# one token


def top_k_top_p_filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keeps the k most likely tokens and/or the smallest set whose probability reaches p
    (nucleus sampling, Holtzman et al. 2020); the rest get -inf."""
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already >= p
        drop_sorted[..., 0] = False  # the most likely token always stays, so top_p=0 is greedy, not empty
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits, temperature, top_k, top_p, generator=None, with_log_prob=True, logits_filter=None):
    """logits (b, v) -> sampled token (b,), its log-prob under softmax(logits / temperature) (b,) or
    None without `with_log_prob`. `logits_filter` (b, v) -> (b, v) runs after top-k / top-p."""
    scaled = logits if temperature in (0, 1) else logits / temperature
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        filtered = top_k_top_p_filter(scaled, top_k, top_p)
        probs = (filtered if logits_filter is None else logits_filter(filtered)).softmax(dim=-1)
        token = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)
    if not with_log_prob:
        return token, None
    return token, scaled.log_softmax(dim=-1).gather(-1, token[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------
# the loop


def outside_autograd(fn):
    """Runs fn under torch.inference_mode, which spares each op of a decoding step autograd's
    bookkeeping (version counters, view tracking), and returns clones of its tensors: normal tensors,
    which a loss may use later (PPO embeds the sampled tokens)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
    return wrapper


def reduce_int(value: int, op, device) -> int:
    """`value` reduced over every process (dist.ReduceOp.MIN / MAX)."""
    reduced = torch.tensor(int(value), device=device)
    dist.all_reduce(reduced, op=op)
    return int(reduced)


def is_left_padded(mask: torch.Tensor) -> bool:
    """mask (b, n): True when no row has a False after a True (any padding is on the left)."""
    return bool((mask.long().cummax(dim=1).values == mask.long()).all())


def prepare_prompt(model, prompt, prompt_mask):
    """-> left-padded prompt (b, n) and its mask (b, n) on the model's device, and whether the caller
    passed one sequence. The next token is read at the last position, which must be real in every
    row: right (or inner) padding is moved to the left."""
    if isinstance(prompt, (list, tuple)):
        if prompt_mask is not None:
            raise ValueError("prompt_mask is for a (b, n) prompt tensor, not a list of prompts")
        prompt, prompt_mask = pad(list(prompt), model.pad_id, side="left")
        return prompt.to(model.device), prompt_mask.to(model.device), False
    unbatched = prompt.ndim == 1
    if unbatched:
        prompt = prompt[None]
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    elif unbatched:
        prompt_mask = prompt_mask[None]
    if not is_left_padded(prompt_mask):
        prompt, prompt_mask = pad([row[keep] for row, keep in zip(prompt.cpu(), prompt_mask.cpu())], model.pad_id, side="left")
    return prompt.to(model.device), prompt_mask.to(model.device), unbatched


class Decoder:
    """The state of one decoding loop: the next-token logits of every row, and either the KV cache or
    (a bidirectional model, or use_cache=False) the whole sequence, re-read each step."""

    def __init__(self, model, prompt, prompt_mask, steps: int, samples: int, use_cache: bool, scope: dict):
        self.model, self.scope, self.use_cache = model, scope, use_cache and model.causal
        if not self.use_cache:  # no cache to share: the prompts are simply repeated
            self.seq = prompt.repeat_interleave(samples, dim=0)
            self.seq_mask = prompt_mask.repeat_interleave(samples, dim=0)
            self.logits = model(self.seq, mask=self.seq_mask, **scope)[:, -1]
            return
        self.cache = KVCache.for_model(model, prompt.shape[0], prompt.shape[1] + steps)
        if DecodingWeights.suit(model):
            self.cache.weights = DecodingWeights(model, prompt.shape[0] * samples)
        self.logits = model(prompt, mask=prompt_mask, cache=self.cache, **scope)[:, -1]  # the prefill
        if samples > 1:  # each prompt's cache serves its samples
            self.cache.repeat_interleave(samples)
            self.logits = self.logits.repeat_interleave(samples, dim=0)

    def step(self, token: torch.Tensor):
        """Feeds the sampled tokens (b,) and reads the next logits."""
        step = token[:, None]  # (b, 1)
        if self.use_cache:
            self.logits = self.model(step, cache=self.cache, **self.scope)[:, -1]
            return
        self.seq = torch.cat((self.seq, step), dim=1)
        self.seq_mask = torch.cat((self.seq_mask, torch.ones_like(step, dtype=torch.bool)), dim=1)
        self.logits = self.model(self.seq, mask=self.seq_mask, **self.scope)[:, -1]


@outside_autograd
def generate(model, seq_len: int, prompt, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, logits_filter=None, eos_token: int | None = None, pad_id: int | None = None,
             return_log_probs: bool = False, return_seq_without_prompt: bool = True, finetune_scope: str | None = None,
             disable_lora: bool = False, prompt_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             num_samples_per_prompt: int = 1, synced_gpus: bool | None = None, use_cache: bool = True,
             use_tqdm: bool = False):
    """Samples until the sequences are `seq_len` long, prompt included (as PaLM-rlhf-pytorch counts).

    The keywords are many because they are the sampler's whole surface (transformers' generate and
    PaLM-rlhf-pytorch's take as many): what to draw (temperature, 0 greedy; top_k; top_p;
    `logits_filter` (b, v) -> (b, v) after them), where a response ends (`eos_token`; `pad_id` after
    it, by default the model's), which weights (`finetune_scope`, or the base with `disable_lora`),
    how many (`num_samples_per_prompt`), and the noise (`generator`).

    prompt: (n,), (b, n), or a list of 1-D tensors of different lengths (left-padded here), or (b, n)
    with `prompt_mask` marking its real tokens (right padding is moved to the left, which is the
    prompt `return_seq_without_prompt=False` returns). `num_samples_per_prompt=G` gives rows b * G,
    prompt i's in rows i * G .. i * G + G - 1, each prompt encoded once. `synced_gpus`: every process
    decodes until all processes' rows have ended, which sharded weights need (each forward is a
    collective); by default on exactly when they are sharded. Returns the new tokens (b, seq_len - n),
    PAD after each row's first EOS; with `return_log_probs`, also their log-probs under
    softmax(logits / temperature), 0 at PAD.
    """
    pad_id = model.pad_id if pad_id is None else pad_id
    prompt, prompt_mask, unbatched = prepare_prompt(model, prompt, prompt_mask)
    num_new = seq_len - prompt.shape[1]
    if num_new < 1:
        raise ValueError(f"seq_len ({seq_len}) must exceed the prompt length ({prompt.shape[1]}): seq_len counts the "
                         f"prompt, so pass seq_len={prompt.shape[1] + 1} for one new token")
    if num_samples_per_prompt < 1:
        raise ValueError(f"num_samples_per_prompt must be at least 1, got {num_samples_per_prompt}")
    synced_gpus = weights_sharded(model) if synced_gpus is None else synced_gpus
    # synced, every process takes as many decoding steps as the one with the shortest prompt
    steps = reduce_int(num_new, dist.ReduceOp.MAX, model.device) if synced_gpus else num_new
    with eval_mode(model):
        decoder = Decoder(model, prompt, prompt_mask, steps, num_samples_per_prompt, use_cache,
                          dict(finetune_scope=finetune_scope, disable_lora=disable_lora))
        b = prompt.shape[0] * num_samples_per_prompt
        tokens = torch.full((b, steps), pad_id, dtype=torch.long, device=model.device)
        log_probs = torch.zeros(b, steps, device=model.device)
        done = torch.zeros(b, dtype=torch.bool, device=model.device)
        for t in tqdm(range(steps), desc="generate", disable=not use_tqdm):
            token, log_prob = sample_token(decoder.logits.float(), temperature, top_k, top_p, generator,
                                           return_log_probs, logits_filter)
            if eos_token is not None:  # rows that have ended get PAD, at log-prob 0
                token = token.masked_fill(done, pad_id)
                log_prob = None if log_prob is None else log_prob.masked_fill(done, 0.0)
                done = done | (token == eos_token)
            tokens[:, t] = token
            if return_log_probs:
                log_probs[:, t] = log_prob
            finished = t >= num_new - 1 or (eos_token is not None and bool(done.all()))
            if synced_gpus:
                finished = bool(reduce_int(finished, dist.ReduceOp.MIN, model.device))
            if finished:
                break
            decoder.step(token)
    tokens, log_probs = tokens[:, :num_new], log_probs[:, :num_new]
    if not return_seq_without_prompt:
        tokens = torch.cat((prompt.repeat_interleave(num_samples_per_prompt, dim=0), tokens), dim=1)
    if unbatched and num_samples_per_prompt == 1:
        tokens, log_probs = tokens[0], log_probs[0]
    return (tokens, log_probs) if return_log_probs else tokens
