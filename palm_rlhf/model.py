"""PaLM: a decoder-only transformer, as in Chowdhery et al. 2022 ("PaLM: Scaling Language Modeling
with Pathways"), section 2. Each choice and where it comes from:

- Parallel block: y = x + Attn(LN(x)) + FF(LN(x)), one fused input projection for q, k, v and the
  feed-forward (PaLM 2, after GPT-J, Wang & Komatsuzaki 2021).
- SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer").
- Rotary position embeddings (Su et al. 2021, RoFormer); xPos as an option (Sun et al. 2022,
  "A Length-Extrapolatable Transformer").
- Multi-query attention: one key/value head shared by all query heads (Shazeer 2019, "Fast
  Transformer Decoding: One Write-Head is All You Need"), which makes the KV cache `heads` times smaller.
- No biases anywhere, LayerNorm without bias (PaLM 2); input and output embeddings tied (optional).
- Attention backends: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels, Dao et al. 2022), the `flash-attn` package on CUDA when installed, and a plain math path
  that is the reference the others are tested against.

This file holds the config and its presets, rotary embeddings, the attention backends, the parallel
block and `PaLM` (forward, the LM loss, per-token log-probs). Around it: fine-tune scopes (LoRA adapters or trainable copies of the last N layers, so
that one frozen PaLM serves as actor, critic, reward model and, with `disable_lora=True`, the frozen
reference; Hydra-RLHF, Santacroce et al. 2023) in lora.py, sampling in generate.py, saving and
loading in checkpoint.py; `PaLM` keeps short methods that call them. A forward pass takes a KV cache
(generate.KVCache: each layer writes its keys and values there and reads them back).

Notation: b batch, n query length, m key length, h heads, d head dim, D model dim, v vocab.
"""
import contextlib
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from torch import nn

from palm_rlhf import checkpoint
from palm_rlhf.lora import FinetuneScopes
from palm_rlhf.tokenizer import NUM_TOKENS, PAD_ID, ByteTokenizer, check_vocab_size

# ---------------------------------------------------------------------------------------------------
# config and presets


@dataclass
class PaLMConfig:
    num_tokens: int = NUM_TOKENS
    dim: int = 512
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    rotary_xpos: bool = False
    xpos_scale_base: int = 512
    tie_embedding: bool = True
    flash_attn: bool = True
    # the id that is never a real token: ignored by the LM loss, written after EOS, stripped from
    # padded prompts; None picks default_pad_id(num_tokens)
    pad_id: int | None = None
    causal: bool = True  # False: bidirectional attention (PaLM-rlhf-pytorch's encoder for reward models)
    # name -> {"lora_r": int, "lora_alpha": float} or {"last_n_layers": int}; saved so a checkpoint
    # with adapters loads back with them
    finetune_scopes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = default_pad_id(self.num_tokens)
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id must be a token id in [0, {self.num_tokens}), got {self.pad_id}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "PaLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown PaLM preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def default_pad_id(num_tokens: int) -> int:
    """256, the byte tokenizer's PAD, for its vocabulary of 258; for any other vocabulary 0, as
    PaLM-rlhf-pytorch (its `cross_entropy_ignore_index` and `pad_value`). Pass `pad_id` (a
    tokenizer's) wherever token 0 is real text."""
    return PAD_ID if num_tokens == NUM_TOKENS else 0


PRESETS = {
    "tiny": dict(dim=64, depth=2, heads=4, dim_head=16),  # every test runs on this
    "small": dict(dim=256, depth=6, heads=8, dim_head=32),  # CPU-trainable in minutes
    "base": dict(dim=512, depth=6, heads=8, dim_head=64),  # the benchmark config
    "medium": dict(dim=768, depth=12, heads=12, dim_head=64),
    "large": dict(dim=1024, depth=24, heads=16, dim_head=64),
}

# ---------------------------------------------------------------------------------------------------
# rotary embeddings (RoFormer eq. 34) with optional xPos decay


def rotary_tables(positions: torch.Tensor, dim_head: int, xpos_scale_base: int | None, dtype):
    """positions (b, n) -> cos, signed sin (b, 1, n, d) and xPos scales (q's, k's), each (b, 1, n, d), or None.

    sin's first half is negated, so that apply_rotary turns each pair by a roll of x, without the
    split, negation and concatenation of the usual rotate_half.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim_head, 2, device=positions.device).float() / dim_head))
    freqs = positions.float()[..., None] * inv_freq  # (b, n, d/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]  # (b, 1, n, d)
    xpos = None
    if xpos_scale_base is not None:
        # q is scaled by s^pos and k by s^-pos, so their product decays with the relative distance
        base = (torch.arange(0, dim_head, 2, device=positions.device).float() + 0.4 * dim_head) / (1.4 * dim_head)
        power = positions.float()[..., None] / xpos_scale_base
        scale = torch.cat((base**power, base**power), dim=-1)[:, None].to(dtype)
        xpos = (scale, scale.reciprocal())
    return cos.to(dtype), sin.to(dtype), xpos


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute in, for x a weight or embedding of the model: autocast's when it
    is on for x's device, else x's. The rotary tables and the KV cache take it, so that under bf16
    autocast fp32 tables do not promote q and k to fp32 beside a bf16 v (flash-attn takes only
    matching fp16 / bf16 q, k, v)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def apply_rotary(x, cos, sin):
    """x (..., d) turned pairwise (x_i, x_{i + d/2}) by the angles of the tables (RoFormer eq. 34)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll: (x1, x2) -> (x2, x1); sin is signed


# ---------------------------------------------------------------------------------------------------
# attention backends: all take q (b, h, n, d), k and v (b, 1, m, d), a boolean mask (b, 1, n, m)
# or None for plain causal with n == m


def attend_math(q, k, v, mask, dropout_p, training):
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (b, h, i, j): k's one head broadcasts
    n, m = sim.shape[-2:]
    if mask is None and n > 1:  # a single last query sees every key: nothing to mask
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
    attn = F.dropout(sim.softmax(dim=-1), dropout_p, training)
    return attn @ v  # (b, h, i, d)


def attend_one_query(q, k, v, mask, dropout_p, training):
    """A cached decoding step (n == 1): the h query heads share the one key/value head, so they are
    h rows of one (b, h, d) @ (b, d, m) product, without the broadcast copy of the cache that a
    (b, h, 1, d) @ (b, 1, d, m) matmul makes."""
    b, h, _, d = q.shape
    sim = (q.view(b, h, d) @ k[:, 0].transpose(1, 2)) * d**-0.5  # (b, h, m)
    if mask is not None:
        sim = sim.masked_fill(~mask[:, :, 0], torch.finfo(sim.dtype).min)  # mask (b, 1, 1, m) -> (b, 1, m)
    attn = F.dropout(sim.softmax(dim=-1), dropout_p) if training else sim.softmax(dim=-1)
    return (attn @ v[:, 0]).view(b, h, 1, d)


def attend_sdpa(q, k, v, mask, dropout_p, training):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p if training else 0.0, enable_gqa=True
    )


def attend_flash_attn(q, k, v, mask, dropout_p, training):
    from flash_attn import flash_attn_func  # optional dependency, only reached on CUDA

    # flash-attn wants (b, n, h, d); its causal mask is bottom-right aligned, which is what a
    # KV-cached step needs; padding masks are not supported, so those calls go through SDPA
    q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    out = flash_attn_func(q, k, v, dropout_p=dropout_p if training else 0.0, causal=True)
    return rearrange(out, "b n h d -> b h n d")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


_warned_flash_fallback = False


def resolve_attn_backend(flash_attn: bool) -> str:
    """'flash' (flash-attn package) > 'sdpa' > 'math'. flash_attn=True (the default) takes SDPA
    silently on a CPU, where flash-attn cannot run, and says so once on a CUDA machine without it."""
    global _warned_flash_fallback
    if not flash_attn:
        return "math"
    if flash_attn_available():
        return "flash"
    if torch.cuda.is_available() and not _warned_flash_fallback:
        _warned_flash_fallback = True
        warnings.warn("flash_attn=True but the flash-attn package is not installed: using torch's "
                      "scaled_dot_product_attention (pip install palm-rlhf[flash] for the flash-attn kernels)")
    return "sdpa"


# ---------------------------------------------------------------------------------------------------
# the parallel block


def linear(module: nn.Linear, x: torch.Tensor, cache=None) -> torch.Tensor:
    """module(x), or on a pass that writes a KV cache holding decoding weights (generate.DecodingWeights)
    the same product from their copy of module's weight."""
    if cache is None or cache.weights is None:
        return module(x)
    return cache.weights.linear(module, x)


class ParallelBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        attn_inner, ff_inner = heads * dim_head, dim * ff_mult
        # q and k (rotated together), v and SwiGLU's value and gate, split straight from the fused
        # output so that backward concatenates their gradients once, not twice (as a later chunk would)
        self.split_sizes = (attn_inner + dim_head, dim_head, ff_inner, ff_inner)
        self.norm = nn.LayerNorm(dim, bias=False)
        self.fused_in = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, dim, bias=False)
        self.attn_dropout, self.ff_dropout = attn_dropout, ff_dropout

    def forward(self, x, rotary, mask, backend, lora=None, cache=None, layer=0):
        b, n, _ = x.shape
        normed = self.norm(x)
        qk, v, ff_in, gate = linear(self.fused_in, normed, cache).split(self.split_sizes, dim=-1)
        if lora is not None:
            qk = qk + torch.cat((lora["q"](normed), lora["k"](normed)), dim=-1)
            v = v + lora["v"](normed)

        # q's h heads and k's one head are h + 1 heads side by side: rotated together, then split
        # (views, not einops, on this path: a decoding step is a few dozen small ops, and einops'
        # per-call cost showed in its profile)
        cos, sin, xpos = rotary
        qk = apply_rotary(qk.view(b, n, self.heads + 1, self.dim_head).transpose(1, 2), cos, sin)  # (b, h + 1, n, d)
        q, k = qk[:, : self.heads], qk[:, self.heads :]  # (b, h, n, d), (b, 1, n, d)
        if xpos is not None:
            q, k = q * xpos[0], k * xpos[1]
        v = v[:, None]  # (b, 1, n, d): one key/value head
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (b, 1, m, d)

        # one query (a cached decoding step) is two small matmuls: cheaper than a fused kernel's set-up
        attend = attend_one_query if n == 1 else ATTEND[backend if (backend != "flash" or mask is None) else "sdpa"]
        attn = attend(q, k, v, mask, self.attn_dropout, self.training)
        attn = attn.transpose(1, 2).reshape(b, n, -1)  # (b, n, h * d)

        ff_hidden = F.silu(gate) * ff_in  # SwiGLU
        if self.training:
            ff_hidden = F.dropout(ff_hidden, self.ff_dropout)
        attn_out = linear(self.attn_out, attn, cache)
        if lora is not None:
            attn_out = attn_out + lora["o"](attn)
        return x + attn_out + linear(self.ff_out, ff_hidden, cache)


ATTEND = {"math": attend_math, "sdpa": attend_sdpa, "flash": attend_flash_attn}


def attention_mask(key_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Causal mask over the last n of m keys, combined with a key padding mask (b, m): (b, 1, n, m).

    None when nothing is padded and n == m, so the backends can use their fused causal kernels.
    A query may always attend to itself, so the rows of padding queries are never empty (no NaN).
    """
    if key_mask is None:
        return None
    m = key_mask.shape[1]
    causal = torch.ones(n, m, dtype=torch.bool, device=key_mask.device).tril(m - n)
    itself = torch.eye(n, m, dtype=torch.bool, device=key_mask.device).roll(m - n, dims=1)
    return (causal & key_mask[:, None, None, :]) | itself


def bidirectional_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """A non-causal model's mask: every query sees every real key, and itself, (b, 1, n, n)."""
    n = key_mask.shape[1]
    return key_mask[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=key_mask.device)


FROZEN_BASE = (
    "the LM loss depends on no trainable parameter: this PaLM's base weights are frozen, as RewardModel, "
    "ImplicitPRM and the RL / DPO trainers freeze the base they share with their LoRA scopes. To train the "
    "PaLM itself, train it before building those, or build the reward model on a copy "
    "(RewardModel(palm, share_base=False), as PaLM-rlhf-pytorch does), or unfreeze it with "
    "palm.requires_grad_(True) (the scopes already built on it then sit on a moving base). To only "
    "evaluate the loss, compute it under torch.no_grad()."
)


class RaiseOnBackward(torch.autograd.Function):
    """Passes a loss through unchanged; its backward raises `message`. It stands where autograd would
    otherwise say only 'element 0 of tensors does not require grad', while leaving the loss usable
    for evaluation."""

    @staticmethod
    def forward(ctx, loss, anchor, message):
        ctx.message = message
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Runs the block with `module` in eval mode (no dropout), then puts every submodule back in the
    mode it was in: inference (scoring, calibration, sampling) must not depend on what the caller
    left, and a base shared by several roles keeps each role's mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False):
    """logits (..., v) and the tokens they predict (...) -> each token's log-prob under
    softmax(logits / temperature), (...), in fp32: the one per-token log-prob of every stage (the LM's
    log-probs, PPO's ratio, DPO's sums, the evaluation's KL). `with_entropy`: also the policy's
    entropy at each position, (...)."""
    log_probs = (logits.float() / temperature).log_softmax(dim=-1)
    chosen = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    if not with_entropy:
        return chosen
    return chosen, -(log_probs.exp() * log_probs).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------
# PaLM


class PaLM(FinetuneScopes, nn.Module):
    @beartype
    def __init__(
        self,
        *,
        num_tokens: int = NUM_TOKENS,
        dim: int = 512,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        rotary_xpos: bool = False,
        xpos_scale_base: int = 512,
        tie_embedding: bool = True,
        flash_attn: bool = True,
        pad_id: int | None = None,
        causal: bool = True,
        finetune_scopes: dict | None = None,
    ):
        """pad_id None: default_pad_id(num_tokens), 256 for the byte vocabulary, else 0."""
        super().__init__()
        self.config = PaLMConfig(**{k: v for k, v in locals().items() if k in PaLMConfig.__dataclass_fields__})
        self.config.finetune_scopes = {}
        self.num_tokens, self.dim, self.pad_id, self.causal = num_tokens, dim, self.config.pad_id, causal
        self.attn_backend = resolve_attn_backend(flash_attn)
        self.tokenizer = ByteTokenizer() if (num_tokens, self.pad_id) == (NUM_TOKENS, PAD_ID) else None

        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.layers = nn.ModuleList(
            [ParallelBlock(dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        if tie_embedding:
            self.to_logits.weight = self.token_emb.weight

        self.finetune_modules = nn.ModuleDict()
        for scope, spec in (finetune_scopes or {}).items():
            self.add_finetune_params(scope, **spec)

    @classmethod
    def from_config(cls, config: PaLMConfig) -> "PaLM":
        return cls(**asdict(config))

    @property
    def device(self):
        return self.token_emb.weight.device

    @property
    def xpos_scale_base(self) -> int | None:
        return self.config.xpos_scale_base if self.config.rotary_xpos else None

    def set_dropout(self, dropout: float):
        for layer in self.layers:
            layer.attn_dropout = layer.ff_dropout = dropout

    # --- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        return_loss: bool = False,
        mask: torch.Tensor | None = None,
        finetune_scope: str | None = None,
        disable_lora: bool = False,
        return_only_embedding: bool = False,
        extra_embed: torch.Tensor | None = None,
        cache=None,
    ):
        """x (b, n) token ids; mask (b, n) True for real tokens (any padding, positions follow the mask).

        Returns logits (b, n, v); the final embeddings (b, n, D) with `return_only_embedding`; or,
        with `return_loss`, the mean next-token cross-entropy of x[:, 1:] given x[:, :-1] (PAD targets
        and masked targets ignored). (Longer than a helper: training, a prefill and a decoding step
        each choose their positions and attention mask here, and then share the same layers.)
        """
        if return_loss:
            inputs, targets = x[:, :-1], x[:, 1:]
            if mask is not None:
                targets = targets.masked_fill(~mask[:, 1:], self.pad_id)
                mask = mask[:, :-1]
            logits = self(inputs, mask=mask, finetune_scope=finetune_scope, disable_lora=disable_lora,
                          extra_embed=extra_embed)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.pad_id)
            if torch.is_grad_enabled() and not loss.requires_grad:
                return RaiseOnBackward.apply(loss, torch.zeros((), requires_grad=True), FROZEN_BASE)
            return loss

        if cache is None:
            self._check_token_ids(x)
        n = x.shape[1]
        if cache is not None:
            positions = cache.append(n, mask)
            key_mask = cache.key_mask[:, : cache.length + n]
            if not cache.any_padding and (cache.length == 0 or n == 1):
                attn_mask = None  # a prefill keeps the fused causal kernels; a one-token step sees every key
            elif n == 1 and mask is None:
                attn_mask = key_mask[:, None, None]  # one real token sees every real key: (b, 1, 1, m)
            else:
                attn_mask = attention_mask(key_mask, n)
        elif mask is not None:
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
            attn_mask = attention_mask(mask, n) if self.causal else bidirectional_mask(mask)
        else:
            positions = torch.arange(n, device=x.device).expand(x.shape[0], n)
            attn_mask = None if self.causal else bidirectional_mask(torch.ones_like(x, dtype=torch.bool))

        h = self.token_emb(x)
        if extra_embed is not None:
            h = h + extra_embed
        if cache is not None:
            rotary = cache.rotary(positions)
        else:
            rotary = rotary_tables(positions, self.config.dim_head, self.xpos_scale_base, activation_dtype(h))
        for i, (layer, lora) in enumerate(self._layers_and_adapters(finetune_scope, disable_lora)):
            h = layer(h, rotary, attn_mask, self.attn_backend, lora=lora, cache=cache, layer=i)
        if cache is not None:
            cache.length += n

        h = self.norm(h)
        if return_only_embedding:
            return h
        return linear(self.to_logits, h, cache)

    def log_probs(self, seq: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                  finetune_scope: str | None = None, disable_lora: bool = False) -> torch.Tensor:
        """Log-prob of each token seq[:, 1:] given its prefix, under softmax(logits / temperature):
        (b, n - 1). PPO and DPO score responses with this, at the temperature they sampled with."""
        logits = self(seq[:, :-1], mask=None if mask is None else mask[:, :-1],
                      finetune_scope=finetune_scope, disable_lora=disable_lora)
        return token_log_probs(logits, seq[:, 1:], temperature)

    def _check_token_ids(self, x):
        if x.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be an integer tensor, got {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_tokens):
            raise ValueError(
                f"token ids must be in [0, {self.num_tokens}); got min {int(x.min())}, max {int(x.max())}"
            )

    # --- sampling (generate.py) and checkpoints (checkpoint.py) -----------------------------------

    def generate(self, seq_len: int, prompt, **options):
        """Samples until each sequence is `seq_len` long, prompt included (as PaLM-rlhf-pytorch):
        `generate.generate(self, seq_len, prompt, **options)`, where the options are documented."""
        from palm_rlhf.generate import generate  # sampling builds on the model, not the model on it

        return generate(self, seq_len, prompt, **options)

    @property
    def tokenizer(self):
        """What the token ids mean: saved beside the weights, read back by `from_pretrained`; None
        for a vocabulary that came without one (token ids in, token ids out)."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        if tokenizer is not None:
            check_vocab_size(tokenizer, self.num_tokens)
            if tokenizer.pad_id != self.pad_id:
                raise ValueError(f"the tokenizer's PAD is id {tokenizer.pad_id} but the model's pad_id is {self.pad_id}; "
                                 f"build the model with pad_id={tokenizer.pad_id}")
        self._tokenizer = tokenizer

    def save(self, path, state_dict: dict | None = None):
        """`checkpoint.save_palm`: safetensors weights, config.json and the tokenizer in a folder."""
        checkpoint.save_palm(self, path, state_dict)

    def load(self, path, strict: bool = True):
        """`checkpoint.load_palm_weights`: weights saved by `save`, each mismatch named."""
        return checkpoint.load_palm_weights(self, path, strict)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "PaLM":
        """`checkpoint.palm_from_pretrained`: the model a folder describes, with its tokenizer."""
        return checkpoint.palm_from_pretrained(cls, path, **overrides)

