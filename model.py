"""GPT-2 (Radford et al. 2019): token + learned position embeddings, n_layer pre-LayerNorm blocks of causal
self-attention and a 4x MLP, a final LayerNorm and an lm_head tied to the token embedding, with Hugging Face GPT-2's
names. Imports only torch (transformers only inside from_pretrained).

    model = GPT(GPTConfig())                  # 124M, GPT-2's initialisation
    model = GPT.from_pretrained("gpt2")       # OpenAI's weights (a hub name or a local HF folder)
    logits, loss = model(idx, targets)        # idx, targets: (B, T) int64
    out = model.generate(idx, 32, top_k=50)   # idx + 32 sampled tokens; model.stream yields them one by one"""

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer; larger vocab sizes are padding for faster kernels


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence the model sees (learned positions)
    vocab_size: int = GPT2_VOCAB_SIZE  # 50257 BPE tokens; 50304 (a multiple of 128) runs faster
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_SIZES)}")
        return cls(**(GPT2_SIZES[name] | overrides))

    def problems(self):
        found = [f"{f.name}={value} must be positive" for f in fields(self) if (value := getattr(self, f.name)) <= 0]
        if self.n_head > 0 and self.n_embd % self.n_head:
            found.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return found


GPT2_SIZES = {  # GPT-2's four sizes: 124M, 350M, 774M and 1558M parameters
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled at init: it writes into the residual stream

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # Causal, but a token after cached ones sees them all. A Python bool: compile would guard on a size test.
        is_causal = kv_cache is None or kv_cache.length == 0
        if kv_cache is not None:  # sampling: the keys and values of the positions before these too
            k, v = kv_cache.update(layer, k, v)  # (B, nh, cached + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, nh, T, hs); flash on GPUs
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # the heads side by side again


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        c_fc, c_proj = nn.Linear(config.n_embd, 4 * config.n_embd), nn.Linear(4 * config.n_embd, config.n_embd)
        self.mlp = nn.Sequential(OrderedDict(c_fc=c_fc, gelu=nn.GELU(approximate="tanh"), c_proj=c_proj))  # as in GPT-2
        c_proj.RESIDUAL_PROJECTION = True

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-LayerNorm: the residual stream stays clean
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        wte, wpe = nn.Embedding(config.vocab_size, config.n_embd), nn.Embedding(config.block_size, config.n_embd)
        h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer = nn.ModuleDict(dict(wte=wte, wpe=wpe, h=h, ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # GPT-2's initialisation: N(0, 0.02) everywhere, zero biases, and the projections into the residual
        # stream scaled by 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 * (2 * config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_PROJECTION", False) else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None, logit_positions=None):
        """idx (B, T) -> (logits (B, T, vocab_size), mean loss over targets != -1, or None). With a kv_cache, idx
        follows the cached positions. logit_positions (N,), each b * T + t: those logits only, for targets (N,)."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        x = self.transformer.ln_f(x)
        if logit_positions is not None:
            x = x.view(B * T, -1)[logit_positions]  # (N, C)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (N, vocab_size)
        loss = None
        if targets is not None:  # in float32: bf16 logits would round the loss
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        if kv_cache is not None:
            kv_cache.length += T
        return logits, loss

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # the tied lm_head / wte weight counted once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM paper, appendix B): 6 per weight in a matmul (all but the position
        table; the tied wte once, as the lm_head) plus 12 * n_layer * n_embd * seq_len for attention."""
        n_matmul = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def configure_optimizers(self, learning_rate, adamw, muon=None):
        """-> ({name: optimizer}, a line saying what each updates). AdamW decays the 2+-dim weights only; with muon,
        Muon takes the blocks' 2-D weights, its updates scaled to AdamW's size so that one lr serves both."""

        def for_muon(name, p):  # the matmul weights inside the blocks; not the embeddings (nor the tied head)
            return muon is not None and name.startswith("transformer.h.") and p.dim() == 2

        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        hidden, rest = [p for n, p in named if for_muon(n, p)], [p for n, p in named if not for_muon(n, p)]
        decay, no_decay = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": adamw["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        fused = rest[0].device.type in ("cuda", "cpu", "mps")  # the whole update in a few kernel launches
        optimizers = {"optimizer": torch.optim.AdamW(groups, lr=learning_rate, fused=fused, **adamw)}
        if hidden:
            optimizers["muon"] = torch.optim.Muon(hidden, lr=learning_rate, adjust_lr_fn="match_rms_adamw", **muon)
        decay, no_decay, hidden = (f"{sum(map(torch.numel, params)):,}" for params in (decay, no_decay, hidden))
        muon_line = f"Muon on {hidden} parameters, " if muon is not None else ""
        return optimizers, f"{muon_line}AdamW with weight decay on {decay} parameters, without on {no_decay}"

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """idx (B, T) and max_new_tokens sampled after it; top_k=1 is greedy, None or 0 samples from all."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """generate()'s new tokens, (B, 1) each, as they come. Past block_size the context is cropped to its
        last block_size tokens, whose positions then shift: that window is recomputed each step."""
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"the prompt must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        block_size, kv_cache = self.config.block_size, KVCache(self.config.n_layer, self.config.block_size)
        for _ in range(max_new_tokens):
            if idx.size(1) <= block_size:  # the whole prompt once, then only the newest token
                logits, _ = self(idx[:, kv_cache.length :], kv_cache=kv_cache)
            else:
                logits, _ = self(idx[:, -block_size:])
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    @classmethod
    def from_pretrained(cls, name_or_path, vocab_size=None):
        """GPT-2 from the hub ("gpt2" ... "gpt2-xl") or a local HF folder. vocab_size pads (e.g. 50304) with
        rows at the mean embedding: ordinary logits, not the zero that would outrank GPT-2's negative ones."""
        from transformers import GPT2LMHeadModel

        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf_model.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_path} uses activation {c.activation_function!r}; GPT-2 uses gelu_new")
        if (vocab_size or c.vocab_size) < c.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the checkpoint's {c.vocab_size}")
        sizes = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=vocab_size or c.vocab_size, **sizes))
        copy_weights(hf_model.state_dict(), model.state_dict())
        return model


def sample_next_token(logits, temperature=1.0, top_k=50, generator=None):
    """One sampling step: logits (B, vocab_size) of the last position -> next token ids (B, 1)."""
    logits = logits.float() / temperature
    logits[:, GPT2_VOCAB_SIZE:] = -float("inf")  # never sample a padding token (if the vocabulary has any)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


class KVCache:
    """Keys and values of every layer while sampling, so that each new token runs one position: per layer
    (2, B, nh, capacity, hs), made on first use. length: the positions filled so far (GPT.forward's count)."""

    def __init__(self, n_layer, capacity):
        self.kv, self.capacity, self.length = [None] * n_layer, capacity, 0

    def update(self, layer, k, v):  # k, v (B, nh, T, hs) of the next positions -> all keys and values so far
        if self.kv[layer] is None:
            self.kv[layer] = k.new_empty(2, *k.shape[:2], self.capacity, k.size(3))
        end = self.length + k.size(2)
        self.kv[layer][0, :, :, self.length : end], self.kv[layer][1, :, :, self.length : end] = k, v
        return self.kv[layer][0, :, :, :end], self.kv[layer][1, :, :, :end]


def copy_weights(source, target):
    """Copy a GPT-2 state dict into another, ours into HF's or back: HF's Conv1D weights, (in, out), are
    transposed for nn.Linear, and the vocabulary's rows are cut to the target's or padded with their mean."""
    with torch.no_grad():
        for key, tensor in target.items():
            value = source[key].detach().float().cpu()
            if key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                value = value.t()
            if key in ("transformer.wte.weight", "lm_head.weight"):
                padding = value.mean(dim=0, keepdim=True).expand(max(len(tensor) - len(value), 0), -1)
                value = torch.cat([value[: len(tensor)], padding])
            tensor.copy_(value)
