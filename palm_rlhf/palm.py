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

On top of the base model, named fine-tune scopes (LoRA adapters or trainable copies of the last N
layers) let one frozen PaLM serve as actor, critic, reward model and, with `disable_lora=True`, the
frozen reference policy (Hydra-RLHF, Santacroce et al. 2023).

Notation: b batch, n query length, m key length, h heads, d head dim, D model dim, v vocab.
"""
import contextlib
import copy
import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from palm_rlhf.compat import GENERATE, PALM, palm_scopes, upstream_keywords
from palm_rlhf.lora import LoRA
from palm_rlhf.tokenizer import NUM_TOKENS, PAD_ID, TOKENIZER_FILE, ByteTokenizer, check_vocab_size, load_tokenizer

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
    """'flash' (flash-attn package) > 'sdpa' > 'math'. flash_attn=True without CUDA falls back once, loudly."""
    global _warned_flash_fallback
    if not flash_attn:
        return "math"
    if flash_attn_available():
        return "flash"
    if not _warned_flash_fallback:
        _warned_flash_fallback = True
        where = "no CUDA device" if not torch.cuda.is_available() else "the flash-attn package is not installed"
        warnings.warn(
            f"flash_attn=True but {where}: using torch's scaled_dot_product_attention "
            "(pip install palm-rlhf[flash] on a CUDA machine for the flash-attn kernels)"
        )
    return "sdpa"


# ---------------------------------------------------------------------------------------------------
# KV cache: one key/value head per layer, preallocated so each decoding step writes in place


class KVCache:
    def __init__(self, depth: int, batch: int, max_len: int, dim_head: int, device, dtype,
                 xpos_scale_base: int | None = None):
        self.k = torch.zeros(depth, batch, 1, max_len, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.any_padding = False
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


# ---------------------------------------------------------------------------------------------------
# the parallel block


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
        qk, v, ff_in, gate = self.fused_in(normed).split(self.split_sizes, dim=-1)
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
        attn_out = self.attn_out(attn)
        if lora is not None:
            attn_out = attn_out + lora["o"](attn)
        return x + attn_out + self.ff_out(ff_hidden)


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


# ---------------------------------------------------------------------------------------------------
# PaLM


class PaLM(nn.Module):
    @upstream_keywords(PALM, palm_scopes)
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

    # --- fine-tune scopes -------------------------------------------------------------------------

    def add_finetune_params(self, scope: str, lora_r: int | None = 8, lora_alpha: float | None = None,
                            last_n_layers: int | None = None):
        """Adds a named scope: LoRA adapters on q, k, v and the attention output of every layer, or,
        with `last_n_layers=N`, trainable copies of the last N layers (the base stays frozen)."""
        if scope in self.finetune_modules:
            raise ValueError(f"fine-tune scope {scope!r} already exists")
        if last_n_layers is not None:
            if not 1 <= last_n_layers <= len(self.layers):
                raise ValueError(f"last_n_layers must be in 1..{len(self.layers)}, got {last_n_layers}")
            self.finetune_modules[scope] = copy.deepcopy(self.layers[-last_n_layers:]).requires_grad_(True)
            self.config.finetune_scopes[scope] = {"last_n_layers": last_n_layers}
            return
        c = self.config
        attn_inner = c.heads * c.dim_head
        self.finetune_modules[scope] = nn.ModuleList(
            nn.ModuleDict(dict(
                q=LoRA(c.dim, attn_inner, lora_r, lora_alpha),
                k=LoRA(c.dim, c.dim_head, lora_r, lora_alpha),
                v=LoRA(c.dim, c.dim_head, lora_r, lora_alpha),
                o=LoRA(attn_inner, c.dim, lora_r, lora_alpha),
            ))
            for _ in self.layers
        ).to(device=self.device, dtype=self.token_emb.weight.dtype)  # a bf16 model gets bf16 adapters
        self.config.finetune_scopes[scope] = {"lora_r": lora_r, "lora_alpha": lora_alpha}

    def remove_finetune_params(self, scope: str):
        self.finetune_modules.pop(self._check_scope(scope))
        self.config.finetune_scopes.pop(scope)

    def finetune_parameters(self, scope: str = "default"):
        return list(self.finetune_modules[self._check_scope(scope)].parameters())

    def finetune_only(self, *scopes: str):
        """Freezes everything but the named scopes, so backward computes no gradient for the base."""
        self.requires_grad_(False)
        for scope in scopes:
            self.finetune_modules[self._check_scope(scope)].requires_grad_(True)
        return self

    @torch.no_grad()
    def merge_finetune_params(self, scope: str):
        """Folds a scope into the base weights and removes it: the merged model needs no adapters."""
        modules = self.finetune_modules[self._check_scope(scope)]
        if "last_n_layers" in self.config.finetune_scopes[scope]:
            for base, tuned in zip(self.layers[-len(modules):], modules):
                base.load_state_dict(tuned.state_dict())
        else:
            c = self.config
            q_end, k_end, v_end = c.heads * c.dim_head, c.heads * c.dim_head + c.dim_head, c.heads * c.dim_head + 2 * c.dim_head
            for layer, lora in zip(self.layers, modules):
                w_in = layer.fused_in.weight
                w_in[:q_end] += lora["q"].delta_weight()
                w_in[q_end:k_end] += lora["k"].delta_weight()
                w_in[k_end:v_end] += lora["v"].delta_weight()
                layer.attn_out.weight += lora["o"].delta_weight()
        self.remove_finetune_params(scope)

    def _check_scope(self, scope):
        if scope not in self.finetune_modules:
            raise KeyError(f"no fine-tune scope {scope!r}; this model has {list(self.finetune_modules)}")
        return scope

    def _layers_and_adapters(self, finetune_scope, disable_lora):
        """Per layer, (block, LoRA adapters or None) for the chosen scope."""
        if finetune_scope is None or disable_lora:
            return [(layer, None) for layer in self.layers]
        modules = self.finetune_modules[self._check_scope(finetune_scope)]
        if "last_n_layers" in self.config.finetune_scopes[finetune_scope]:
            return [(layer, None) for layer in self.layers[: len(self.layers) - len(modules)]] + [
                (layer, None) for layer in modules
            ]
        return list(zip(self.layers, modules))

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
        cache: KVCache | None = None,
    ):
        """x (b, n) token ids; mask (b, n) True for real tokens (any padding, positions follow the mask).

        Returns logits (b, n, v); the final embeddings (b, n, D) with `return_only_embedding`; or,
        with `return_loss`, the mean next-token cross-entropy of x[:, 1:] given x[:, :-1] (PAD targets
        and masked targets ignored).
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
        return self.to_logits(h)

    def log_probs(self, seq: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                  finetune_scope: str | None = None, disable_lora: bool = False) -> torch.Tensor:
        """Log-prob of each token seq[:, 1:] given its prefix, under softmax(logits / temperature):
        (b, n - 1). PPO and DPO score responses with this, at the temperature they sampled with."""
        logits = self(seq[:, :-1], mask=None if mask is None else mask[:, :-1],
                      finetune_scope=finetune_scope, disable_lora=disable_lora)
        log_probs = (logits.float() / temperature).log_softmax(dim=-1)
        return log_probs.gather(-1, seq[:, 1:, None]).squeeze(-1)

    def _check_token_ids(self, x):
        if x.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be an integer tensor, got {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_tokens):
            raise ValueError(
                f"token ids must be in [0, {self.num_tokens}); got min {int(x.min())}, max {int(x.max())}"
            )

    # --- generation -------------------------------------------------------------------------------

    @upstream_keywords(GENERATE)
    @outside_autograd
    def generate(
        self,
        seq_len: int,
        prompt=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        filter_thres: float | None = None,
        filter_logits_fn=None,
        eos_token: int | None = None,
        pad_id: int | None = None,
        use_tqdm: bool = False,
        use_cache: bool = True,
        return_log_probs: bool = False,
        return_seq_without_prompt: bool = True,
        finetune_scope: str | None = None,
        disable_lora: bool = False,
        prompt_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples_per_prompt: int = 1,
        synced_gpus: bool | None = None,
    ):
        """Samples until the sequence is `seq_len` long (prompt included, as in PaLM-rlhf-pytorch).

        prompt: (n,), (b, n), or a list of 1-D tensors of different lengths (left-padded here), or
        (b, n) with `prompt_mask` marking its real tokens (right padding is moved to the left, which
        is the prompt that `return_seq_without_prompt=False` returns). No prompt: one random token
        starts the sequence, and the whole (1, seq_len) sequence is returned, as there.
        temperature 0 is greedy. Filters, as PaLM-rlhf-pytorch's: `filter_thres=t` alone keeps the
        ceil((1 - t) * v) most likely tokens (its top_k); `filter_logits_fn(logits, thres=t)` is
        applied after top_k / top_p. `pad_id` (PaLM-rlhf-pytorch's `pad_value`) is written after
        EOS, by default the model's; `use_tqdm` shows the decoding steps.
        `num_samples_per_prompt=G` draws G samples of each prompt, rows b * G, prompt i's in rows
        i * G .. i * G + G - 1; with the cache, each prompt is encoded once and its cache shared.
        `synced_gpus` (transformers' name): every process decodes until all processes' rows have
        ended, which sharded weights need (FSDP2, ZeRO-3: each step's forward is a collective that
        every process must join); by default on exactly when the weights are sharded over processes.
        Returns the new tokens (b, seq_len - n), PAD after each sequence's first EOS; with
        `return_log_probs`, also their log-probs under softmax(logits / temperature) (the policy that
        PPO optimises; top-k/top-p only restrict what is sampled), 0 at PAD.
        """
        was_training = self.training
        self.eval()
        if prompt is None:
            return_seq_without_prompt = False
        pad_id = self.pad_id if pad_id is None else pad_id
        use_cache = use_cache and self.causal  # a bidirectional model re-reads the whole sequence each step
        top_k, logits_filter = sampling_filters(self.num_tokens, top_k, filter_thres, filter_logits_fn)
        prompt, prompt_mask, unbatched = self._prepare_prompt(prompt, prompt_mask)
        unbatched = unbatched and num_samples_per_prompt == 1
        if not use_cache:  # no cache to share: the prompts are simply repeated
            prompt = prompt.repeat_interleave(num_samples_per_prompt, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(num_samples_per_prompt, dim=0)
        b, n = prompt.shape
        num_new = seq_len - n
        if num_new < 1:
            raise ValueError(f"seq_len ({seq_len}) must exceed the prompt length ({n}): seq_len counts the prompt, "
                             f"so pass seq_len={n + 1} for one new token")
        if num_samples_per_prompt < 1:
            raise ValueError(f"num_samples_per_prompt must be at least 1, got {num_samples_per_prompt}")
        scope = dict(finetune_scope=finetune_scope, disable_lora=disable_lora)
        synced_gpus = weights_sharded(self) if synced_gpus is None else synced_gpus
        # synced, every process takes as many decoding steps as the one with the shortest prompt
        steps = reduce_int(num_new, dist.ReduceOp.MAX, self.device) if synced_gpus else num_new

        cache = None
        if use_cache:
            cache = KVCache(len(self.layers), b, n + steps, self.config.dim_head, self.device,
                            activation_dtype(self.token_emb.weight), self.xpos_scale_base)
            logits = self(prompt, mask=prompt_mask, cache=cache, **scope)[:, -1]
            if num_samples_per_prompt > 1:
                cache.repeat_interleave(num_samples_per_prompt)
                logits = logits.repeat_interleave(num_samples_per_prompt, dim=0)
                prompt = prompt.repeat_interleave(num_samples_per_prompt, dim=0)
                b = b * num_samples_per_prompt
        else:
            seq, seq_mask = prompt, prompt_mask
            logits = self(seq, mask=seq_mask, **scope)[:, -1]

        tokens = torch.full((b, steps), pad_id, dtype=torch.long, device=self.device)
        log_probs = torch.zeros(b, steps, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for t in tqdm(range(steps), desc="generate", disable=not use_tqdm):
            token, log_prob = sample_token(logits.float(), temperature, top_k, top_p, generator, return_log_probs,
                                           logits_filter)
            if eos_token is not None:  # rows that have ended get PAD, at log-prob 0
                token = token.masked_fill(done, pad_id)
                log_prob = None if log_prob is None else log_prob.masked_fill(done, 0.0)
                done = done | (token == eos_token)
            tokens[:, t] = token
            if return_log_probs:
                log_probs[:, t] = log_prob
            finished = t >= num_new - 1 or (eos_token is not None and bool(done.all()))
            if synced_gpus:
                finished = bool(reduce_int(finished, dist.ReduceOp.MIN, self.device))
            if finished:
                break
            step = token[:, None]  # (b, 1)
            if use_cache:
                logits = self(step, cache=cache, **scope)[:, -1]
            else:
                seq = torch.cat((seq, step), dim=1)
                seq_mask = torch.cat((seq_mask, torch.ones_like(step, dtype=torch.bool)), dim=1)
                logits = self(seq, mask=seq_mask, **scope)[:, -1]

        self.train(was_training)
        tokens, log_probs = tokens[:, :num_new], log_probs[:, :num_new]
        if not return_seq_without_prompt:
            tokens = torch.cat((prompt, tokens), dim=1)
        if unbatched:
            tokens, log_probs = tokens[0], log_probs[0]
        return (tokens, log_probs) if return_log_probs else tokens

    def _prepare_prompt(self, prompt, prompt_mask):
        """-> left-padded prompt (b, n), its mask (b, n), whether the caller passed one sequence."""
        if prompt is None:  # a random token that is not the pad
            prompt = torch.randint(0, self.num_tokens - 1, (1, 1))
            prompt = prompt + (prompt >= self.pad_id).long()
        if isinstance(prompt, (list, tuple)):
            if prompt_mask is not None:
                raise ValueError("prompt_mask is for a (b, n) prompt tensor, not a list of prompts")
            prompt, prompt_mask = left_pad(list(prompt), self.pad_id)
            return prompt.to(self.device), prompt_mask.to(self.device), False
        unbatched = prompt.ndim == 1
        if unbatched:
            prompt = prompt[None]
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
        elif unbatched:
            prompt_mask = prompt_mask[None]
        if not is_left_padded(prompt_mask):
            # the next token is read at the last position, which must be real in every row:
            # right (or inner) padding is moved to the left
            prompt, prompt_mask = left_pad([row[keep] for row, keep in zip(prompt.cpu(), prompt_mask.cpu())], self.pad_id)
        return prompt.to(self.device), prompt_mask.to(self.device), unbatched

    # --- checkpoints ------------------------------------------------------------------------------

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
        """Safetensors weights with the config in their metadata. A directory gets model.safetensors,
        a readable config.json (what `from_pretrained` reads) and the tokenizer's tokenizer.json; a
        file path gets one file.
        `state_dict`: the weights to write instead of this module's own, e.g. the full state dict
        that `accelerator.get_state_dict` gathers from the shards of FSDP or ZeRO-3."""
        path = Path(path)
        config_json = json.dumps(asdict(self.config))
        if path.suffix not in (".safetensors", ".pt", ".bin"):
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
            if self.tokenizer is not None:
                self.tokenizer.save(path)
            path = path / "model.safetensors"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            save_model(self, str(path), metadata={"palm_config": config_json})
        else:
            save_state_dict(state_dict, path, self, metadata={"palm_config": config_json})

    def load(self, path, strict: bool = True):
        """Loads weights saved by `save` into this model; a checkpoint of another shape fails with a
        message naming each mismatch."""
        path = weights_path(path)
        saved = read_saved_config(path)
        if saved is not None:
            mine = asdict(self.config)
            mismatched = [f"{k}: checkpoint {saved[k]!r}, model {mine[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != mine[k]]
            if saved.get("finetune_scopes", {}) != mine["finetune_scopes"]:
                mismatched.append(f"finetune_scopes: checkpoint {saved.get('finetune_scopes')}, model {mine['finetune_scopes']}")
            if mismatched:
                raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(mismatched))
        with safe_open(str(path), "pt") as f:
            own = self.state_dict()
            bad = [f"{k}: checkpoint {tuple(f.get_slice(k).get_shape())}, model {tuple(own[k].shape)}"
                   for k in f.keys() if k in own and tuple(f.get_slice(k).get_shape()) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(bad))
        load_model(self, str(path), strict=strict, device=str(self.device))
        return self

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "PaLM":
        """Builds the model a checkpoint describes (its config.json or metadata) and loads it, with
        the tokenizer saved beside it (tokenizer.json; a folder without one speaks bytes)."""
        weights = weights_path(path)
        saved = read_saved_config(weights)
        if saved is None:
            raise ValueError(f"{path} holds no PaLM config; was it written by PaLM.save?")
        known = {f.name for f in fields(PaLMConfig)}
        model = cls(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
        if (weights.parent / TOKENIZER_FILE).exists():
            tokenizer = load_tokenizer(weights.parent / TOKENIZER_FILE)
            check_vocab_size(tokenizer, model.num_tokens, where=f"the model in {weights.parent}")
            model.tokenizer = tokenizer
        return model.load(path)


def weights_sharded(module: nn.Module) -> bool:
    """Whether any of `module`'s weights are split over processes: FSDP2 makes them DTensors, ZeRO-3
    partitions them (and marks each with a `ds_id`)."""
    return any(isinstance(weight, DTensor) or hasattr(weight, "ds_id") for weight in module.parameters())


def reduce_int(value: int, op, device) -> int:
    """`value` reduced over every process (dist.ReduceOp.MIN / MAX)."""
    reduced = torch.tensor(int(value), device=device)
    dist.all_reduce(reduced, op=op)
    return int(reduced)


def save_state_dict(state_dict: dict, path, module: nn.Module, metadata: dict | None = None):
    """Writes `module`'s state dict as safetensors with each tensor that `module` holds under several
    names (the tied embedding) stored once, under its first name, as safetensors' save_model does;
    its load_model fills in the other names. Which names are one tensor is read from the module, not
    from the state dict's storage: a full state dict gathered from FSDP2 shards holds the tied
    embedding as two separate copies, which load_model would reject as an unexpected key."""
    repeated = repeated_names(module)
    unique = {name: tensor.detach().contiguous() for name, tensor in state_dict.items() if name not in repeated}
    save_file(unique, str(path), metadata=metadata)


def repeated_names(module: nn.Module) -> set[str]:
    """The names under which `module` holds a parameter or buffer that an earlier name already holds."""
    seen, repeated = set(), set()
    for name, tensor in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            repeated.add(name)
        seen.add(id(tensor))
    return repeated


SHAPE_FIELDS = ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "tie_embedding")


def weights_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def read_saved_config(path: Path) -> dict | None:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "palm_config" in metadata:
        return json.loads(metadata["palm_config"])
    config_file = path.parent / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else None


# ---------------------------------------------------------------------------------------------------
# sampling helpers


def left_pad(sequences: list[torch.Tensor], pad_id: int):
    """list of 1-D tensors -> (b, n) left-padded tensor and its mask, True at real tokens."""
    n = max(len(s) for s in sequences)
    out = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), n, dtype=torch.bool)
    for i, s in enumerate(sequences):
        if len(s):
            out[i, n - len(s):] = s
            mask[i, n - len(s):] = True
    return out, mask


def is_left_padded(mask: torch.Tensor) -> bool:
    """mask (b, n): True when no row has a False after a True (any padding is on the left)."""
    return bool((mask.long().cummax(dim=1).values == mask.long()).all())


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


def sampling_filters(num_tokens: int, top_k, filter_thres, filter_logits_fn):
    """PaLM-rlhf-pytorch's filter arguments -> (top_k, a logits filter or None). Its default filter,
    with `filter_thres=t`, keeps the ceil((1 - t) * num_tokens) most likely tokens."""
    if filter_logits_fn is not None:
        thres = 0.9 if filter_thres is None else filter_thres
        return top_k, lambda logits: filter_logits_fn(logits, thres=thres)
    if filter_thres is not None:
        if top_k is not None:
            raise ValueError("pass top_k or filter_thres (PaLM-rlhf-pytorch's top-k fraction), not both")
        top_k = max(1, math.ceil((1 - filter_thres) * num_tokens))
    return top_k, None


def sample_token(logits, temperature, top_k, top_p, generator=None, with_log_prob=True, logits_filter=None):
    """logits (b, v) -> sampled token (b,), its log-prob under softmax(logits / temperature) (b,) or
    None without `with_log_prob`. `logits_filter` (b, v) -> (b, v) runs after top-k / top-p."""
    scaled = logits if temperature in (0, 1) else logits / temperature
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        filtered = top_k_top_p_filter(scaled, top_k, top_p)
        probs = (filtered if logits_filter is None else logits_filter(filtered)).softmax(dim=-1)
        # the exponential race argmax(p / q), q ~ Exp(1): what torch.multinomial draws for one sample,
        # from the same random numbers, without its checks of p (a dozen small ops per step)
        token = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)
    if not with_log_prob:
        return token, None
    return token, scaled.log_softmax(dim=-1).gather(-1, token[:, None])[:, 0]
