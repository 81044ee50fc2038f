"""model.py against independent references: transformers' GPT2LMHeadModel, plain re-computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import export
from model import GPT, GPT2_SIZES, GPTConfig

ADAMW = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)  # the recipe's


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """A random transformers GPT-2 with non-square sizes, saved in HF format, and the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_positions=40, n_embd=48, n_layer=3, n_head=3, vocab_size=101)
    model = GPT2LMHeadModel(config).eval()
    # A random init has tiny LayerNorm/bias spread; perturb everything so a wrong transpose shows.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hf_small")
    model.save_pretrained(path)
    return str(path), model


def test_from_pretrained_matches_transformers(hf_small):
    path, hf_model = hf_small
    model = GPT.from_pretrained(path).eval()
    assert model.config == GPTConfig(block_size=40, vocab_size=101, n_layer=3, n_head=3, n_embd=48)
    idx = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, dims=1)
    with torch.no_grad():
        ours, our_loss = model(idx, targets)
        theirs = hf_model(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    their_loss = F.cross_entropy(theirs.view(-1, 101), targets.view(-1))
    torch.testing.assert_close(our_loss, their_loss, atol=1e-5, rtol=0)


def test_padded_vocab_loads_trains_and_exports_without_the_padding(hf_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    model = GPT.from_pretrained(hf_gpt2_dir, vocab_size=50304)
    assert model.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(idx)
        reference = hf_model(idx).logits
    # The real rows are GPT-2's; the padding rows, each the mean of GPT-2's rows, give ordinary (not dominating) logits.
    torch.testing.assert_close(logits[..., :50257], reference, atol=1e-5, rtol=0)
    mean_row = hf_model.transformer.wte.weight.mean(dim=0)
    torch.testing.assert_close(model.lm_head.weight[50257:], mean_row.expand(47, -1), atol=1e-6, rtol=0)
    assert (logits[..., 50257:].max(-1).values < reference.max(-1).values).all()
    # Training steps through the padded model, then export drops the padding rows.
    optimizer = model.configure_optimizers(1e-3, ADAMW)[0]["optimizer"]
    for _ in range(2):
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    export.save_folder(export.to_hf(model.eval()), str(tmp_path / "export"))
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert exported.config.vocab_size == 50257
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx)[0][..., :50257], atol=1e-5, rtol=0)
    # Sampling never picks a padding token, even when the padding rows are made to dominate.
    with torch.no_grad():
        model.lm_head.weight[50257:] = model.transformer.ln_f.weight * 100
    samples = model.generate(idx[:, :4], 8, top_k=None, generator=torch.Generator().manual_seed(0))
    assert samples.max() < 50257


def test_124m_parameter_count_and_tied_weights():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 124_439_808
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # HF names, so OpenAI's weights map one to one
    names = dict(model.named_parameters())
    assert "transformer.h.11.attn.c_attn.weight" in names and "transformer.h.0.mlp.c_fc.bias" in names


def test_gpt2_sizes_by_name():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd) for name in GPT2_SIZES for c in [GPTConfig.from_name(name)]}
    assert sizes == {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    assert GPTConfig.from_name("gpt2", vocab_size=50304).vocab_size == 50304
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.from_name("gpt2-small")
    assert GPTConfig(n_embd=50, n_head=3).problems() == ["n_embd=50 is not divisible by n_head=3"]
    assert GPTConfig(n_layer=0, block_size=-1).problems() == [
        "block_size=-1 must be positive",
        "n_layer=0 must be positive",
    ]
    assert GPTConfig().problems() == []


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif ".ln_" in name or "ln_f" in name:
            assert (p == 1).all(), name
        elif name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name


def test_sdpa_attention_equals_plain_masked_softmax():
    torch.manual_seed(0)
    config = GPTConfig(block_size=24, vocab_size=64, n_layer=1, n_head=3, n_embd=48)
    attn = GPT(config).transformer.h[0].attn
    x = torch.randn(2, 24, 48)
    B, T, C = x.shape
    hs = C // 3
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=2)
    q, k, v = (t.view(B, T, 3, hs).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    expected = y @ attn.c_proj.weight.T + attn.c_proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)


def test_loss_ignores_targets_of_minus_one():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    targets[0, :5] = -1
    targets[1, 10:] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_logit_positions_give_those_positions_logits_and_loss(hf_small):
    path, hf_model = hf_small
    model = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(2))
    rows, positions = [0, 0, 0, 1, 1, 2, 2], [0, 5, 39, 7, 7, 38, 2]  # any order, repeats allowed
    targets = torch.tensor([4, -1, 9, 1, 2, -1, 100])
    with torch.no_grad():
        logits, loss = model(idx, targets, logit_positions=torch.tensor(rows) * 40 + torch.tensor(positions))
        full = hf_model(idx).logits
    expected = full[rows, positions]  # (7, 101)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    keep = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(expected[keep], targets[keep]), atol=1e-5, rtol=0)


def greedy_without_cache(model, idx, max_new_tokens):
    """The reference: a full forward over the (cropped) context for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("max_new_tokens", [20, 40])  # 40 runs past block_size (32): cropping
def test_greedy_decoding_with_kv_cache_equals_full_recompute(max_new_tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=80, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 80, (3, 6))
    with torch.no_grad():
        expected = greedy_without_cache(model, prompt, max_new_tokens)
    got = model.generate(prompt, max_new_tokens, top_k=1)
    assert got.shape == (3, 6 + max_new_tokens)
    assert torch.equal(got, expected)


def test_seeded_sampling_repeats_and_seeds_differ():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=80, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42))
    b = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42))
    c = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert torch.equal(a[:, :3], prompt)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tiny_model_overfits_one_batch(dtype, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizer = model.configure_optimizers(1e-2, ADAMW | dict(weight_decay=0.0))[0]["optimizer"]
    idx = torch.randint(0, tiny_config.vocab_size, (4, 32))
    targets = torch.roll(idx, -1, 1)
    for _ in range(80):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert loss.item() < 0.1


def test_adamw_gets_the_settings_it_is_given(tiny_config):
    model = GPT(tiny_config)
    optimizers, _ = model.configure_optimizers(6e-4, ADAMW)
    assert list(optimizers) == ["optimizer"]  # AdamW alone: the recipe
    for group in optimizers["optimizer"].param_groups:  # GPT-3's: betas (0.9, 0.95), eps 1e-8
        assert (group["lr"], group["betas"], group["eps"]) == (6e-4, (0.9, 0.95), 1e-8)
    optimizer = model.configure_optimizers(1e-3, dict(weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6))[0]["optimizer"]
    assert all((g["lr"], g["betas"], g["eps"]) == (1e-3, (0.8, 0.9), 1e-6) for g in optimizer.param_groups)


def test_weight_decay_groups(tiny_config):
    model = GPT(tiny_config)
    optimizers, info = model.configure_optimizers(1e-3, ADAMW)
    decay, no_decay = optimizers["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for g in optimizers["optimizer"].param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    named = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {n for n, p in model.named_parameters() if n.endswith("bias") or ".ln_" in n or "ln_f" in n}
    assert {named[id(p)] for p in no_decay["params"]} == no_decay_names
    n_decay = sum(p.numel() for p in decay["params"])
    n_no_decay = model.num_parameters() - n_decay
    assert info == f"AdamW with weight decay on {n_decay:,} parameters, without on {n_no_decay:,}"


MUON = dict(momentum=0.95, weight_decay=0.1, ns_steps=5)
BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_config):
    model = GPT(tiny_config)
    optimizers, info = model.configure_optimizers(1e-3, ADAMW, MUON)
    named = {id(p): n for n, p in model.named_parameters()}
    muon_names = [named[id(p)] for g in optimizers["muon"].param_groups for p in g["params"]]
    expected = [f"transformer.h.{i}.{m}" for i in range(tiny_config.n_layer) for m in BLOCK_MATRICES]
    assert sorted(muon_names) == sorted(expected)
    decay, no_decay = optimizers["optimizer"].param_groups
    assert {named[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    adamw_names = {named[id(p)] for p in decay["params"] + no_decay["params"]}
    assert adamw_names | set(muon_names) == {n for n, _ in model.named_parameters()}  # lm_head: wte, tied
    assert not adamw_names & set(muon_names)
    group = optimizers["muon"].param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["ns_steps"], group["nesterov"]) == (0.95, 0.1, 5, True)
    assert group["adjust_lr_fn"] == "match_rms_adamw" and group["lr"] == 1e-3
    n_muon = sum(p.numel() for _, p in model.named_parameters() if p.dim() == 2 and ".h." in _)
    assert info.startswith(f"Muon on {n_muon:,} parameters, AdamW with weight decay on ")


def newton_schulz(g, steps):
    """Keller Jordan's quintic Newton-Schulz iteration, written out here (in float64) as torch.optim.Muon documents
    it: G on its wide orientation, scaled to norm 1, then X <- aX + (bA + cA^2)X with A = XX^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_a_muon_step_is_nesterov_momentum_orthogonalised_and_scaled_as_adamw(tiny_config):
    # Three steps on one batch; before each, the expected new value of every Muon matrix is worked out from its
    # value and gradient: momentum m = 0.95 m + 0.05 g, Nesterov's update 0.05 g + 0.95 m, Newton-Schulz,
    # decoupled weight decay p (1 - lr wd), then lr scaled by 0.2 sqrt(max(rows, cols)) (match_rms_adamw).
    torch.manual_seed(0)
    model = GPT(tiny_config)
    lr = 2e-2
    optimizers, _ = model.configure_optimizers(lr, ADAMW, MUON)
    matrices = [p for g in optimizers["muon"].param_groups for p in g["params"]]
    momentum = [torch.zeros_like(p) for p in matrices]
    for seed in range(3):  # a new batch each step: the momentum then points elsewhere than the gradient
        idx = torch.randint(0, tiny_config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        model(idx, torch.roll(idx, -1, 1))[1].backward()
        before = [p.detach().clone() for p in matrices]
        expected = []
        for p, m in zip(matrices, momentum):
            m.mul_(0.95).add_(p.grad, alpha=0.05)
            update = newton_schulz(0.05 * p.grad + 0.95 * m, 5)
            expected.append(p.detach() * (1 - lr * 0.1) - lr * 0.2 * math.sqrt(max(p.shape)) * update)
        for optimizer in optimizers.values():
            optimizer.step()
        for p, old, want in zip(matrices, before, expected):
            step, want_step = p.detach() - old, want - old
            # torch runs Newton-Schulz in bfloat16: its direction is this float64 one's to about 0.998, its size to 1e-3
            cosine = F.cosine_similarity(step.double().flatten(), want_step.flatten(), dim=0)
            assert cosine > 0.99 and abs(step.norm() / want_step.norm() - 1) < 0.01


def test_flops_per_token_matches_the_architecture():
    config = GPTConfig()
    L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, 1024
    per_layer = 4 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    matmul_params = V * C + L * per_layer + 2 * C  # wte/lm_head once, blocks, ln_f; no wpe
    expected = 6 * matmul_params + 12 * L * C * T
    assert GPT(config).flops_per_token(T) == expected


def test_stream_yields_the_tokens_generate_returns(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    streamed = list(model.stream(prompt, 40, top_k=20, generator=torch.Generator().manual_seed(3)))  # past block_size
    assert len(streamed) == 40 and all(t.shape == (2, 1) for t in streamed)
    expected = model.generate(prompt, 40, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([prompt, *streamed], dim=1), expected)


# -----------------------------------------------------------------------------
# Sampling: what temperature and top-k do, against the softmax computed here


def empirical(samples, vocab_size):
    return torch.bincount(samples.view(-1), minlength=vocab_size).float() / samples.numel()


def test_top_k_one_is_argmax_and_top_k_never_leaves_the_k_most_likely():
    from model import sample_next_token

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (0.3, 1.0, 5.0):
        greedy = sample_next_token(logits, temperature, top_k=1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(greedy.view(-1), logits.argmax(-1))
    # 20,000 draws from one distribution: only its 5 most likely tokens, in their renormalised odds.
    row = logits[:1].expand(20_000, -1)
    samples = sample_next_token(row, 1.0, top_k=5, generator=torch.Generator().manual_seed(2))
    top5 = logits[0].topk(5).indices
    assert set(samples.view(-1).tolist()) == set(top5.tolist())
    expected = torch.zeros(50)
    expected[top5] = logits[0, top5].softmax(-1)
    torch.testing.assert_close(empirical(samples, 50), expected, atol=0.015, rtol=0)


def test_temperature_reshapes_the_distribution_as_softmax_of_logits_over_t():
    from model import sample_next_token

    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0)) * 2
    rows = logits.expand(20_000, -1)
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        samples = sample_next_token(rows, temperature, top_k=None, generator=torch.Generator().manual_seed(1))
        expected = (logits[0] / temperature).softmax(-1)
        torch.testing.assert_close(empirical(samples, 30), expected, atol=0.015, rtol=0)
        entropies.append(-(expected * expected.log()).sum().item())
    assert entropies[0] < entropies[1] - 0.3 and entropies[1] < entropies[2] - 0.3  # the sizes differ measurably


# -----------------------------------------------------------------------------
# model.py's own errors: one clear ValueError each


def test_generate_refuses_an_empty_or_one_dimensional_prompt_and_a_non_positive_temperature(tiny_config):
    model = GPT(tiny_config).eval()
    for prompt in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"shape \(B, T\) with T >= 1, got \((2, 0|5,)\)"):
            model.generate(prompt, 4)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be positive"):
            model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=temperature)


def test_a_sequence_longer_than_block_size_is_refused(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="sequence of length 33 is longer than block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_from_pretrained_refuses_a_smaller_vocab_and_another_activation(hf_small, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path, _ = hf_small
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the checkpoint's 101"):
        GPT.from_pretrained(path, vocab_size=100)
    config = GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=50, activation_function="relu")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "relu")
    with pytest.raises(ValueError, match="uses activation 'relu'; GPT-2 uses gelu_new"):
        GPT.from_pretrained(tmp_path / "relu")
