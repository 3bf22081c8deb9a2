"""A decoder-only transformer for the Qwen2 family (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen),
with Llama 3 and Qwen3 through config fields; checkpoint.py reads and writes its Hugging Face
safetensors.

    model = Transformer(ModelConfig.from_hf(config_json))   # or checkpoint.load_pretrained(path)
    logits = model(input_ids)                       # (B, T, V): rows (packed, padded, plain)
    logprobs, entropy = model(ids, position_ids=pos, targets=targets)   # training rows, fused LM head
    hidden = model.prefill(prompt_ids, positions, cache)                 # a KV cache filled
    logits = model.decode(next_ids, positions, cache)                    # (B, 1, V): one step

Module names equal the Hugging Face names without the leading "model.", so a checkpoint maps
onto this module by two one-line functions (checkpoint.hf_to_ours / ours_to_hf).

Which keys a query sees comes from four inputs, any of which may be absent:
- `position_ids` (B, T); a position of 0 after the start of a row starts a new document, which is
  how packed rows (several documents per row) are expressed: documents never see each other.
  Their attention never builds a (T, T) mask: FlashAttention over variable-length sequences on
  CUDA (`varlen_attn`), one causal SDPA per document elsewhere. `doc_lens`, the documents'
  lengths, saves the host sync that reading them off position_ids costs (trainers know them);
- `attention_mask` (B, T) with 0 for padding (left-padded prompts, right-padded responses): a
  dense (B, 1, T, T) mask, for short padded batches only;
- a `KVCache` (prefill and decode), where the cache index of a token is its position id: a prefill
  writes prompts (rows start at position 0 and attend among themselves), a decode step's token
  sees the cached keys 0..p of its own row.
"""

import inspect
import itertools
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.checkpoint import checkpoint

from kernels import linear_logprobs_and_entropy, triton_runs

try:  # torch >= 2.10: FlashAttention over packed variable-length sequences (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None         # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None    # {"rope_type": "llama3", ...} or None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True         # q/k/v bias: Qwen2 yes, Llama 3 and Qwen3 no
    qk_norm: bool = False               # per-head RMSNorm on q and k before RoPE (Qwen3)
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json we came from

    def __post_init__(self):
        """Every field by type and range, and the relations the layers need, naming the field."""
        def positive(name, kinds=(int,)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kinds) or v <= 0:
                raise ValueError(f"{name} must be a positive {'integer' if kinds == (int,) else 'number'}, got {v!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            positive(name)
        for name in ("rms_norm_eps", "rope_theta"):
            positive(name, (int, float))
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} does not divide into num_attention_heads="
                                 f"{self.num_attention_heads} heads; fix one, or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive("head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type", "qwen2")
        if model_type not in ("qwen2", "llama", "qwen3"):
            raise ValueError(f"model_type {model_type!r} is not supported; use qwen2, llama or qwen3")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported; set it to false in config.json")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; use default or llama3")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in known and k not in ("rope_scaling", "hf_config")}
        kw.update(
            rope_theta=float(theta),
            rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else None,
            attention_bias=hf.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type != "llama"),
            model_type=model_type,
            hf_config=hf,
        )
        return cls(**kw)

    def to_hf(self) -> dict:
        """A config.json dict that transformers loads into the same architecture."""
        hf = dict(self.hf_config)
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        hf.update(
            architectures=[arch[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )
        hf.pop("rope_parameters", None)  # rope_theta + rope_scaling say it; both loaders read them
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        return hf


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3's long-context rescaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = config.rope_scaling
    if s and s["rope_type"] == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # x: (B, T, H, Dh); cos/sin: (B, T, 1, Dh); rotate-half convention, as in the HF checkpoints.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 and cast back before the weight, as the reference implementation does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def attend(q, k, v, mask=None, is_causal=False):
    """SDPA over (B, H, T, Dh) queries and (B, H_kv, S, Dh) keys/values -> (B, H, T, Dh).

    The one place the model calls SDPA. On CUDA its output is a transpose of (B, T, H, Dh)
    memory (the fused kernels' layout), so callers reshape, never view.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


# varlen_attn takes GQA keys/values as they are; newer torch asks for the flag that says so.
VARLEN_GQA = ({"enable_gqa": True} if varlen_attn is not None
              and "enable_gqa" in inspect.signature(varlen_attn).parameters else {})


def packed_attention(q, k, v, doc_lens, impl):
    """Causal attention within each document of N packed tokens: q (N, H, Dh), k/v (N, H_kv, Dh)
    -> (N, H, Dh), where doc_lens (summing to N) are the documents in order.

    "varlen" is FlashAttention over variable-length sequences (CUDA, 16-bit: an fp32 run takes
    "sdpa"); "sdpa" runs one causal SDPA per document (exact anywhere). Neither builds a (N, N) mask.
    """
    if impl == "varlen" and q.dtype in (torch.bfloat16, torch.float16):
        starts = torch.tensor([0, *itertools.accumulate(doc_lens)], dtype=torch.int32, device=q.device)
        longest = max(doc_lens)
        return varlen_attn(q, k, v, starts, starts, longest, longest, window_size=(-1, 0), **VARLEN_GQA)
    out, start = [], 0
    for n in doc_lens:
        doc = slice(start, start + n)
        out.append(attend(*(t[doc].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)[0])
        start += n
    return torch.cat(out, dim=1).transpose(0, 1)


@dataclass
class Layout:
    """Which keys each query of one forward sees, worked out once per forward (see the module
    docstring): exactly one of causal / doc_lens / mask describes attention among the call's
    tokens; kv_cache with slots and positions says where they are stored (prefill) or what they
    read (decode: mask over the cache's first kv_len positions)."""
    causal: bool = False                 # plain causal over each row (no padding, one document)
    doc_lens: list[int] | None = None    # packed documents over the flattened B * T tokens
    mask: torch.Tensor | None = None     # dense (B, 1, T, S) boolean; True = may attend
    impl: str = "sdpa"                   # packed attention: "varlen" (CUDA) or "sdpa"
    kv_cache: object = None              # a kvcache.KVCache
    slots: torch.Tensor | None = None    # (B,) cache slot of each row; None: slots 0..B-1
    cache_index: torch.Tensor | None = None  # (B, T) where each token's keys and values go
    decode: bool = False                 # one token per row, attending over the cache
    kv_lens: torch.Tensor | None = None  # (B,) decode: cache positions each row attends to
    contexts: list | None = None         # prefill: per document (start, its pages): it continues
                                         # positions 0..start-1 that those pages hold already


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, layout: Layout):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, H, Dh)
        cache = layout.kv_cache
        if cache is not None:
            cache.write(self.layer_idx, layout.cache_index, k, v)
        if layout.decode:
            out = self.decode(q, layout)
        elif layout.contexts is not None:
            out = self.continue_documents(q, k, v, layout)
        elif layout.doc_lens is not None:
            out = packed_attention(q.reshape(B * T, self.n_heads, self.head_dim),
                                   k.reshape(B * T, self.n_kv_heads, self.head_dim),
                                   v.reshape(B * T, self.n_kv_heads, self.head_dim),
                                   layout.doc_lens, layout.impl)
        else:
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=layout.mask,
                         is_causal=layout.causal).transpose(1, 2)
        return self.o_proj(out.reshape(B, T, -1))

    def continue_documents(self, q, k, v, layout):
        """Prefill of packed documents (q, k, v: (1, N, heads, Dh)), some of which continue a
        prefix whose keys and values are in the cache already (layout.contexts: per document, its
        start and pages): such a document's queries attend causally over its pages' positions
        0..start + n - 1, read back from the cache (its own new keys, written above, included);
        one that starts at 0 attends among its own tokens. Exact, one SDPA per document."""
        cache, outs, at = layout.kv_cache, [], 0
        for n, (start, pages) in zip(layout.doc_lens, layout.contexts):
            doc = slice(at, at + n)
            if start == 0:
                outs.append(attend(*(t[0, doc].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)[0])
            else:
                rows = torch.tensor(pages, device=q.device)[:cache.pages_for(start + n)]
                keys, values = (pool[self.layer_idx][rows].flatten(0, 1)[:start + n].to(q.dtype)
                                for pool in (cache.k, cache.v))  # (start + n, H_kv, Dh)
                visible = torch.arange(start + n, device=q.device)[None] <= torch.arange(start, start + n,
                                                                                        device=q.device)[:, None]
                outs.append(attend(q[0, doc].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                   values.transpose(0, 1)[None], mask=visible[None, None])[0])
            at += n
        return torch.cat(outs, dim=1).transpose(0, 1)[None]

    def decode(self, q, layout):
        """One new token per row (q: (B, 1, H, Dh)) against positions 0..kv_lens[b]-1 of each
        row's slot -> (B, 1, H, Dh). Where Triton runs (CUDA, or TRITON_INTERPRET=1) a kernel
        reads each row's pages in place up to its own length (kernels/paged_attention.py).
        Elsewhere the exact torch path: the first S = mask.shape[-1] positions of a chunk of slots
        at a time are gathered (cache.gather_slots keeps the copies small whatever the batch),
        each KV head's query heads folded into its query rows, so SDPA reads the keys once per KV
        head where enable_gqa would first copy them per query head; the mask drops what lies
        past each row's length."""
        cache, slots, mask = layout.kv_cache, layout.slots, layout.mask
        B, _, H, Dh = q.shape
        S, group = mask.shape[-1], H // self.n_kv_heads
        if triton_runs(q):
            from kernels import paged_attention  # imported on first use: triton reads TRITON_INTERPRET at import
            table = cache.block_table[:B] if slots is None else cache.block_table[slots]
            out = paged_attention.paged_decode(q[:, 0], cache.k[self.layer_idx], cache.v[self.layer_idx], table,
                                               layout.kv_lens, S)
            return out[:, None]
        chunk = cache.gather_slots(S)
        outs = []
        for a in range(0, B, chunk):
            rows = slots if chunk >= B else \
                (slots[a:a + chunk] if slots is not None else torch.arange(a, min(a + chunk, B), device=q.device))
            k, v = (t.to(q.dtype) for t in cache.gather(self.layer_idx, rows, S, B))
            n = k.shape[0]
            folded = q[a:a + n].reshape(n, self.n_kv_heads, group, Dh)
            outs.append(attend(folded, k, v, mask=mask[a:a + n].expand(n, 1, group, S)))
        return torch.cat(outs).reshape(B, 1, H, Dh)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layout: Layout):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(attention_mask, position_ids, kv_len=None):
    """Boolean (B, 1, T, S) mask, True where a query may attend to a key.

    Without a cache (kv_len None): causal, within the same document (a new document starts at
    every position id 0 after the first token), and never onto padding. With a static cache of
    length kv_len: key index j is visible to a query at position p iff j <= p.
    """
    if kv_len is not None:
        keys = torch.arange(kv_len, device=position_ids.device)
        return (keys[None, None, :] <= position_ids[:, :, None])[:, None]
    B, T = position_ids.shape
    idx = torch.arange(T, device=position_ids.device)
    starts = (position_ids == 0) & (idx > 0)
    doc = starts.cumsum(-1)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    # A padding query that sees nothing would give NaN rows; let every token see itself.
    mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask[:, None]


def document_lengths(position_ids) -> list[int]:
    """Lengths of the documents of (B, T) position ids (a tensor or nested lists), in the order
    of the flattened B * T tokens: a document starts at every row start and at every position 0.

    >>> document_lengths([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    [3, 2, 5]
    """
    rows = position_ids.tolist() if torch.is_tensor(position_ids) else position_ids
    lengths = []
    for row in rows:
        for j, p in enumerate(row):
            if j == 0 or p == 0:
                lengths.append(0)
            lengths[-1] += 1
    return lengths


def on_meta(config: ModelConfig, dtype=None) -> "Transformer":
    """A Transformer of shapes only (the meta device, whatever fake mode is active), to shard,
    split or fill before Transformer.materialize or checkpoint.set_tensor."""
    with unset_fake_temporarily(), torch.device("meta"):
        model = Transformer(config)
        return model.to(dtype) if dtype is not None else model


class Transformer(nn.Module):
    """The decoder. Three entry points, one per way attention is laid out:
    forward (training rows and scoring: packed, padded or plain rows), prefill (prompts into a
    KV cache) and decode (one token per row against the cache). prefill and decode run on a module
    without FSDP2's hooks (distributed.full_weights' gathered copy, a tp.py decoder, a plain model):
    FSDP2 gathers the root's weights only around forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save memory
        self.attention = "auto"  # packed documents: "auto" (by device), "varlen" or "sdpa"

    def tie(self):
        """The LM head shares the embedding's weight when the config says so (again after any
        step that makes new parameters: to_empty, set_tensor, tensor parallelism)."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(self, device):
        """Storage on `device` for a model built on the meta device (and then perhaps sharded or
        split): uninitialized weights, the ties kept, RoPE's buffer recomputed."""
        self.to_empty(device=device)
        self.tie()
        self.inv_freq = rope_inv_freq(self.config).to(device)
        return self

    def attention_impl(self, device) -> str:
        """How packed documents attend: FlashAttention's varlen kernel on CUDA where this torch
        has it, else one SDPA per document. `self.attention` ("auto", "varlen", "sdpa") overrides
        it; the memory plan sets "varlen" to measure the CUDA path on fake CPU tensors."""
        if self.attention == "auto":
            return "varlen" if device.type == "cuda" and varlen_attn is not None else "sdpa"
        if self.attention not in ("varlen", "sdpa"):
            raise ValueError(f"attention must be auto, varlen or sdpa, got {self.attention!r}")
        if self.attention == "varlen" and varlen_attn is None:
            raise RuntimeError(f"attention='varlen' needs torch.nn.attention.varlen (torch >= 2.10); "
                               f"this is torch {torch.__version__}")
        return self.attention

    def blocks(self, input_ids, position_ids, layout: Layout):
        """Final hidden states (B, T, D) of the blocks under `layout`, the last norm applied."""
        x = self.embed_tokens(input_ids)
        angles = position_ids[:, :, None, None].float() * self.inv_freq  # (B, T, 1, Dh/2)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and layout.kv_cache is None:
                x = checkpoint(layer, x, cos, sin, layout, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, attention_mask=None, doc_lens=None, targets=None,
                temperature=1.0, hidden_only=False):
        """Rows of tokens (B, T): logits (B, T, V); or, given targets (B, T), (logprobs, entropy),
        each fp32 (B, T), of the targets under softmax(logits / temperature); or, with hidden_only,
        the hidden states (B, T, D).

        A row may pack documents (a position id of 0 after its start begins one; doc_lens, the
        documents' lengths over the flattened B * T tokens, saves reading them off the position
        ids) or be padded (attention_mask, 0 for padding: positions then count real tokens).
        The targets path runs the fused kernel on hidden states and the LM-head weight, so the
        (tokens x vocab) logits never exist whole.
        """
        B, T = input_ids.shape
        layout = Layout(impl=self.attention_impl(input_ids.device))
        given_positions = position_ids is not None
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None else \
                torch.arange(T, device=input_ids.device).expand(B, T)
        if attention_mask is not None:
            layout.mask = build_mask(attention_mask, position_ids)
        elif doc_lens is not None or given_positions:
            layout.doc_lens = list(doc_lens) if doc_lens is not None else document_lengths(position_ids)
            if len(layout.doc_lens) == B:
                layout.doc_lens, layout.causal = None, True  # one document per row: plain causal
        else:
            layout.causal = True  # no mask lets SDPA take its fastest (flash) kernel
        h = self.blocks(input_ids, position_ids, layout)
        if hidden_only:
            return h
        if targets is None:
            return self.lm_head(h)
        logprobs, entropy = linear_logprobs_and_entropy(
            h.reshape(B * T, -1), self.lm_head.weight.to(h.dtype), targets.reshape(-1), temperature)
        # Fresh tensors, not views: FSDP2 warns that a view output could lose its backward hook.
        return logprobs.view(B, T).clone(), entropy.view(B, T).clone()

    def prefill(self, input_ids, position_ids, cache, cache_index=None, cache_slots=None, doc_lens=None,
                contexts=None):
        """Write the keys and values of prompts (B, T) into `cache` and return their hidden states
        (B, T, D). Rows start at position 0 and attend among themselves (doc_lens: several prompts
        packed in a row); each token goes to cache row cache_index (B, T), or by default to its
        position in slot cache_slots (B,) (default 0..B-1). With contexts (one row of packed
        documents: per document (start, pages)), a document continues from position `start`,
        attending also to the positions before it that its pages hold (a shared prefix)."""
        layout = Layout(impl=self.attention_impl(input_ids.device), kv_cache=cache, slots=cache_slots,
                        contexts=contexts)
        layout.cache_index = cache.index(cache_slots, position_ids) if cache_index is None else cache_index
        if contexts is not None:
            layout.doc_lens = list(doc_lens)
        elif doc_lens is not None and len(doc_lens) > input_ids.shape[0]:
            layout.doc_lens = list(doc_lens)
        else:
            layout.causal = True
        return self.blocks(input_ids, position_ids, layout)

    def decode(self, input_ids, position_ids, cache, kv_len=None, cache_slots=None):
        """One new token per row (B, 1) at its position, against its cached keys and values (slot
        cache_slots[b], default b): logits (B, 1, V). Attention reads each slot's first kv_len
        positions (default: all), which must cover every query's position (unchecked: a check
        would cost a host sync per step), so a step costs the live length, not the cache's."""
        layout = Layout(kv_cache=cache, slots=cache_slots, decode=True,
                        mask=build_mask(None, position_ids, kv_len or cache.max_seq_len), kv_lens=position_ids[:, 0] + 1)
        layout.cache_index = cache.index(cache_slots, position_ids)
        return self.lm_head(self.blocks(input_ids, position_ids, layout))
