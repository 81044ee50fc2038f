"""GPT-2, the model: one file, Hugging Face GPT-2 names, weight-for-weight compatible.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig())                          # 124M, GPT-2 initialisation
    model = GPT.from_pretrained("gpt2")               # OpenAI's weights (hub name or local HF dir)
    model = GPT.from_checkpoint("log/checkpoints/step_00019073.pt")  # a train_gpt2.py checkpoint
    model = GPT.from_checkpoint("log")                # a run's latest checkpoint
    logits, loss = model(idx, targets)                # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=32, top_k=50, generator=torch.Generator(idx.device).manual_seed(0))
    for token in model.stream(idx, max_new_tokens=32): ...   # the same tokens, (B, 1) each, as they come
    model.save_pretrained("my-gpt2")                  # a Hugging Face folder: weights, tokenizer, model card

The network (Radford et al. 2019): token + learned position embeddings, n_layer pre-LayerNorm
blocks (causal self-attention, then a 4x MLP with tanh-approximate GELU), a final LayerNorm, and
an lm_head that shares its weight with the token embedding. Attention runs through
F.scaled_dot_product_attention, which picks a flash attention kernel on GPUs.

This file imports only torch; transformers is imported inside the two methods that talk to Hugging
Face, and save_pretrained leaves the rest of the folder (tokenizer, model card) to export.py.
"""

import glob
import inspect
import os
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer; larger vocab sizes are padding for faster kernels

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence the model sees (learned positions)
    vocab_size: int = GPT2_VOCAB_SIZE  # 50257 BPE tokens; 50304 (a multiple of 128) runs faster
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @classmethod
    def from_name(cls, name, **overrides):
        """The four GPT-2 sizes by their Hugging Face names, with optional overrides."""
        if name not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_SIZES)}")
        return cls(**{**GPT2_SIZES[name], **overrides})

    def problems(self):
        """Every value that cannot work, as readable strings (empty when the config is fine)."""
        found = [f"{f.name}={getattr(self, f.name)} must be positive"
                 for f in fields(self) if getattr(self, f.name) <= 0]
        if self.n_head > 0 and self.n_embd % self.n_head:
            found.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return found


GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# -----------------------------------------------------------------------------
# The transformer block


class KVCache:
    """Keys and values of every layer for sampling, so each new token runs one position."""

    def __init__(self, n_layer, capacity):
        self.capacity = capacity  # the most positions it holds: the model's block_size
        self.keys = [None] * n_layer  # each (B, nh, capacity, hs), allocated on first use
        self.values = [None] * n_layer
        self.length = 0  # positions filled so far

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at the next positions; return all keys and values so far."""
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.capacity, hs)
            self.values[layer] = v.new_empty(B, nh, self.capacity, hs)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled at init: it writes into the residual stream

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # Causal unless we are decoding: then the new token(s) see every cached position.
        is_causal = True
        if kv_cache is not None:
            is_causal = kv_cache.length == 0  # prefill is causal; one new token sees all keys
            k, v = kv_cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-LayerNorm: the residual stays clean
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere, zero biases, and the projections into the residual stream
        # scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None, logit_positions=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean loss or None).

        Targets equal to -1 are ignored by the loss. With a kv_cache, idx holds only the new
        positions, which follow the kv_cache.length positions already cached. logit_positions
        (N,) indices into the B * T positions (row b, position t is b * T + t): logits of those
        positions only, (N, vocab_size), and targets (N,) if given. The lm_head is the biggest
        matmul of a small model, and HellaSwag scores only a few positions of each row.
        """
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
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        if kv_cache is not None:
            kv_cache.length += T
        return logits, loss

    def num_parameters(self):
        """Parameters counted once (the tied lm_head / wte weight is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per weight that takes part in a matmul (every parameter except the position table, with
        the tied wte counted once as the lm_head) plus 12 * n_layer * n_embd * seq_len for attention."""
        n_matmul = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * self.config.n_layer * self.config.n_embd * seq_len

    # -------------------------------------------------------------------------
    # Optimizer

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
        """AdamW with weight decay on matmul weights and embeddings (2+ dims), none on biases and
        LayerNorm gains. Returns (optimizer, info) with the size of both groups."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel does the whole update in a few launches; cpu, cuda and mps have it.
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu", "mps")
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
        info = dict(
            num_decay_tensors=len(decay), num_decay_params=sum(p.numel() for p in decay),
            num_nodecay_tensors=len(no_decay), num_nodecay_params=sum(p.numel() for p in no_decay),
            fused=fused,
        )
        return optimizer, info

    # -------------------------------------------------------------------------
    # Sampling

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Sample max_new_tokens after idx (B, T); returns (B, T + max_new_tokens).

        top_k keeps the k most likely tokens (None or 0: all of them; 1: greedy); temperature must
        be positive. stream() gives the same tokens one step at a time.
        """
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Yield the next tokens (B, 1) after idx (B, T), one sampling step at a time.

        A KV cache means each new token runs one position. Past block_size the context is cropped
        to the last block_size tokens; their positions then shift, so the window is recomputed each
        step, exactly as a model without a cache would see it.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"the prompt must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        block_size = self.config.block_size
        kv_cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) <= block_size:
                if kv_cache is None:  # prefill: the whole prompt, once
                    kv_cache = KVCache(self.config.n_layer, block_size)
                    logits, _ = self(idx, kv_cache=kv_cache)
                else:  # decode: only the newest token
                    logits, _ = self(idx[:, -1:], kv_cache=kv_cache)
            else:
                logits, _ = self(idx[:, -block_size:])
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    # -------------------------------------------------------------------------
    # Hugging Face and our checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path, vocab_size=None):
        """GPT-2 weights from the hub ("gpt2" ... "gpt2-xl") or a local Hugging Face directory.

        vocab_size pads the vocabulary (e.g. 50304); the new rows start at the mean embedding so
        that their logits are ordinary, not the zero that would outrank GPT-2's negative logits.
        """
        from transformers import GPT2LMHeadModel
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        hf_config = hf_model.config
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_path} uses activation {hf_config.activation_function!r}; GPT-2 uses gelu_new")
        config = GPTConfig(block_size=hf_config.n_positions, vocab_size=vocab_size or hf_config.vocab_size,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
        if config.vocab_size < hf_config.vocab_size:
            raise ValueError(f"vocab_size {config.vocab_size} is smaller than the checkpoint's {hf_config.vocab_size}")
        model = cls(config)
        hf_state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        state = model.state_dict()
        if set(hf_state) != set(state):
            raise ValueError(f"{name_or_path}: parameter names differ from GPT-2's: "
                             f"{sorted(set(hf_state) ^ set(state))[:5]}")
        with torch.no_grad():
            for key, value in hf_state.items():
                value = value.float()
                if key.endswith(CONV1D_WEIGHTS):
                    value = value.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                if key in ("transformer.wte.weight", "lm_head.weight") and value.size(0) < config.vocab_size:
                    padding = value.mean(dim=0, keepdim=True).expand(config.vocab_size - value.size(0), -1)
                    value = torch.cat([value, padding])
                state[key].copy_(value)
        return model

    def save_pretrained(self, directory, dtype=torch.float32, training=""):
        """Write a folder that transformers, vLLM and lm-evaluation-harness load as it is: the
        weights as GPT2LMHeadModel in dtype, padding rows dropped, with what export.save_folder adds
        (generation config, GPT-2's tokenizer, a model card whose training section is `training`).
        `directory` must be new or empty, and is never left half written."""
        import export
        from transformers import GPT2Config, GPT2LMHeadModel
        config, eot = self.config, GPT2_VOCAB_SIZE - 1
        vocab_size = min(config.vocab_size, GPT2_VOCAB_SIZE)
        hf_config = GPT2Config(vocab_size=vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                               n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                               layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # trained without dropout
        hf_model = GPT2LMHeadModel(hf_config)
        hf_state = hf_model.state_dict()
        with torch.no_grad():
            for key, value in self.state_dict().items():
                value = value.detach().float().cpu()
                if key.endswith(CONV1D_WEIGHTS):
                    value = value.t()
                if key in ("transformer.wte.weight", "lm_head.weight"):
                    value = value[:vocab_size]
                hf_state[key].copy_(value)
        export.save_folder(hf_model.to(dtype), directory, training)

    @classmethod
    def from_checkpoint(cls, path):
        """The model of a train_gpt2.py checkpoint, or of a log directory's latest (see read_checkpoint)."""
        checkpoint = read_checkpoint(path)
        model = cls(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        return model


def read_checkpoint(path):
    """A train_gpt2.py checkpoint: a plain dict read with torch.load(weights_only=True), so only
    tensors and plain values come back and no code in the file can run. `path` is a checkpoint file,
    or a log directory: its latest readable checkpoint in <path>/checkpoints/ (a newer one cut short
    by a crash is passed over). Anything else raises ValueError with one line that says so."""
    if os.path.isdir(path):
        checkpoint_dir = os.path.join(path, "checkpoints")
        for candidate in sorted(glob.glob(os.path.join(glob.escape(checkpoint_dir), "step_[0-9]*.pt")), reverse=True):
            try:
                return read_checkpoint(candidate)
            except ValueError:
                continue
        raise ValueError(f"{path} is not a checkpoint file, and {checkpoint_dir} holds no readable checkpoint "
                         f"(train_gpt2.py --log-dir {path} writes them there)")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's problem
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and format errors each have their own type
        raise ValueError(f"{path} is not a readable train_gpt2.py checkpoint ({type(e).__name__}: another kind of "
                         f"file, or a write cut short)") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= set(checkpoint):
        raise ValueError(f"{path} is not a train_gpt2.py checkpoint (it holds no model and model_config)")
    return checkpoint


def sample_next_token(logits, temperature=1.0, top_k=50, generator=None):
    """One sampling step: logits (B, vocab_size) of the last position -> next token ids (B, 1)."""
    logits = logits.float() / temperature
    if logits.size(-1) > GPT2_VOCAB_SIZE:
        logits[:, GPT2_VOCAB_SIZE:] = -float("inf")  # never sample a padding token
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# The Linear weights that Hugging Face's GPT-2 stores transposed (its Conv1D module)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
