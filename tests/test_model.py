"""The Transformer's behaviour: SDPA equals the reference path, causality, KV cache, doc_ids.

Every property is checked for every preset family at tiny size, plus GQA/MQA, QK-norm and the
other switches, so a regression in any combination the presets use shows up here.
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.model import KVCache, Transformer, model_config
from scratchlm.model.config import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP barriers make two
    threads many times slower than one; restore the setting for other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
# switches beyond the presets' defaults: GQA / MQA, QK-norm, other activations and positions
VARIANTS = {
    "gpt2": dict(),
    "llama": dict(),
    "vaswani": dict(),
    "llama-mqa-qknorm": dict(n_kv_head=1, qk_norm=True),
    "gpt2-relu2-rms-nopos": dict(activation="relu2", norm="rmsnorm", positions="none"),
    "gpt2-rope-untied-gqa": dict(positions="rope", tie_embeddings=False, n_kv_head=2, bias=False),
}


def build(name: str, **overrides) -> Transformer:
    family = name.split("-")[0]
    torch.manual_seed(0)
    config = model_config(f"{family}-tiny", **{**VARIANTS.get(name, {}), **overrides})
    model = Transformer(config).eval()
    # the presets initialise norms to 1 and biases to 0; randomise everything so that a
    # mistake in a bias or norm weight cannot hide behind an identity value
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(model: Transformer, B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def run_both(model: Transformer, idx: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    model.attention_impl = "sdpa"
    fast = model(idx, **kwargs)
    model.attention_impl = "reference"
    ref = model(idx, **kwargs)
    model.attention_impl = "sdpa"
    return fast, ref


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sdpa_equals_reference_causal(name):
    model = build(name)
    fast, ref = run_both(model, tokens(model))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2-rope-untied-gqa", "vaswani"])
def test_sdpa_equals_reference_with_doc_ids_and_padding_mask(name):
    model = build(name)
    idx = tokens(model, B=3, T=20)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [5] * 20, [0] * 3 + [1] * 17])
    fast, ref = run_both(model, idx, doc_ids=doc_ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # left padding: the first rows' keys masked out, including queries that may see nothing
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[0, :5] = False
    pad[2, :11] = False
    fast, ref = run_both(model, idx, attn_mask=pad[:, None, None, :])
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_reference_gradients():
    model = build("llama-mqa-qknorm").train()
    idx = tokens(model)
    grads = {}
    for impl in ("sdpa", "reference"):
        model.attention_impl = impl
        model.zero_grad()
        model(idx).logsumexp(-1).mean().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in grads["sdpa"]:
        torch.testing.assert_close(grads["sdpa"][n], grads["reference"][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_output_at_t_ignores_later_tokens(name, impl):
    model = build(name, attention_impl=impl)
    idx = tokens(model, T=24)
    out = model(idx)
    for t in (0, 9, 22):
        changed = idx.clone()
        g = torch.Generator().manual_seed(t)
        changed[:, t + 1 :] = torch.randint(0, model.config.vocab_size, changed[:, t + 1 :].shape, generator=g)
        assert not torch.equal(changed, idx)
        out2 = model(changed)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], atol=1e-5, rtol=1e-5)
        # and the future does reach the later positions (the test can see a leak)
        assert (out2[:, t + 1 :] - out[:, t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_forward_equals_full_forward(name):
    model = build(name)
    idx = tokens(model, B=2, T=21)
    full = model(idx)
    cache = model.make_kv_cache(batch_size=2, max_len=32)
    c = model.config
    assert cache.keys[0].shape == (2, c.n_kv_head, 32, c.head_dim)  # GQA-aware buffers
    pieces, start = [], 0
    for size in (7, 1, 1, 5, 1, 6):  # prefill, single-token decode steps and multi-token chunks
        pieces.append(model(idx[:, start : start + size], kv_cache=cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)

    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(model(idx[:, :4], kv_cache=cache), full[:, :4], atol=1e-5, rtol=1e-5)


def test_kv_cache_with_reference_attention_and_bf16_buffers():
    model = build("llama")
    idx = tokens(model, B=1, T=10)
    full = model(idx)
    model.attention_impl = "reference"
    cache = model.make_kv_cache(1, 16)
    steps = [model(idx[:, :6], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # a bf16 cache rounds keys/values but still tracks the fp32 forward closely
    cache16 = KVCache.for_config(model.config, 1, 16, dtype=torch.bfloat16)
    out = torch.cat([model(idx[:, :6], kv_cache=cache16), model(idx[:, 6:], kv_cache=cache16)], 1)
    assert (out - full).abs().max() < 0.05


def test_kv_cache_padded_batch_matches_unpadded_rows():
    """Batched generation: rows left-padded, positions and attn_mask given explicitly."""
    model = build("llama")
    a, b = tokens(model, B=1, T=9, seed=3), tokens(model, B=1, T=5, seed=4)
    pad = 4
    idx = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :pad] = False
    positions = torch.stack([torch.arange(9), (torch.arange(9) - pad).clamp(min=0)])
    cache = model.make_kv_cache(2, 12)
    out = model(idx, positions=positions, attn_mask=keep[:, None, None, :], kv_cache=cache)
    torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, pad:], model(b)[0], atol=1e-5, rtol=1e-5)
    # one decode step for both rows, the padding still masked
    nxt = torch.tensor([[7], [8]])
    keep = torch.cat([keep, torch.ones(2, 1, dtype=torch.bool)], 1)
    step = model(nxt, positions=torch.tensor([[9], [5]]), attn_mask=keep[:, None, None, :], kv_cache=cache)
    torch.testing.assert_close(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_overflow_and_truncates():
    model = build("gpt2")
    cache = model.make_kv_cache(1, 8)
    model(tokens(model, B=1, T=6), kv_cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(tokens(model, B=1, T=3), kv_cache=cache)
    cache.truncate(4)
    assert cache.length == 4
    with pytest.raises(ValueError):
        cache.truncate(5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_doc_ids_isolate_packed_documents(name):
    """A packed document's outputs equal running it alone at the same positions, and do not
    change when a neighbouring document does."""
    model = build(name)
    idx = tokens(model, B=2, T=20)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [3] * 5 + [4] * 6 + [9] * 9])
    out = model(idx, doc_ids=doc_ids)
    for row, (start, end) in ((0, (8, 20)), (1, (5, 11)), (1, (11, 20))):
        positions = torch.arange(start, end)[None]
        alone = model(idx[row : row + 1, start:end], positions=positions)
        torch.testing.assert_close(out[row, start:end], alone[0], atol=1e-5, rtol=1e-5)
    changed = idx.clone()
    changed[0, :8] = (changed[0, :8] + 1) % model.config.vocab_size
    out2 = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(out2[0, 8:], out[0, 8:], atol=1e-6, rtol=1e-6)
    assert (out2[0, :8] - out[0, :8]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_preset_builds_and_trains_a_step_at_tiny_size(family):
    torch.manual_seed(0)
    model = Transformer(model_config(f"{family}-tiny")).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):  # one repeated batch: the loss must fall, so gradients reach everything
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # at init the model predicts close to uniform: loss near ln(vocab) (Vaswani's tied
    # unit-variance logits add about 0.5 nats)
    assert abs(losses[0] - torch.log(torch.tensor(model.config.vocab_size)).item()) < 1.0


def test_module_names_follow_the_contract():
    llama = Transformer(model_config("llama-tiny", qk_norm=True))
    names = {n for n, _ in llama.named_modules()}
    for n in ("tok_embeddings", "layers.0.attn_norm", "layers.1.attn.q_proj", "layers.1.attn.k_proj",
              "layers.1.attn.v_proj", "layers.1.attn.o_proj", "layers.0.mlp_norm", "layers.0.mlp.gate_proj",
              "layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "norm", "lm_head"):
        assert n in names, n
    gpt2 = Transformer(model_config("gpt2-tiny"))
    assert gpt2.lm_head.weight is gpt2.tok_embeddings.weight  # tied
    assert "pos_embeddings" in dict(gpt2.named_modules()) and "layers.0.mlp.gate_proj" not in dict(gpt2.named_modules())
    assert llama.lm_head.weight is not llama.tok_embeddings.weight
    # every projection is an nn.Linear, so LoRA / quantized layers can replace it from outside
    for n, m in llama.named_modules():
        if n.endswith("_proj") or n == "lm_head":
            assert type(m) is torch.nn.Linear, n


def test_linear_swapped_from_outside_is_called():
    """LoRA/quantization replace projections by module; the forward must go through them."""
    model = build("llama")
    idx = tokens(model)
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(1)
            return self.inner(x)

    ref = model(idx)
    for layer in model.layers:
        layer.attn.q_proj = Spy(layer.attn.q_proj)
        layer.mlp.down_proj = Spy(layer.mlp.down_proj)
    torch.testing.assert_close(model(idx), ref)
    assert len(calls) == 2 * model.config.n_layer


def test_pipeline_methods_compose_to_forward():
    model = build("llama-mqa-qknorm")
    idx = tokens(model)
    positions = model.default_positions(idx)
    h = model.embed(idx, positions)
    rope, mask = model.attention_inputs(positions)
    for layer in model.layers:
        h = layer(h, rope, mask)
    torch.testing.assert_close(model.head(h), model(idx))


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = model_config("gpt2", n_layer=8, d_model=256, n_head=4, vocab_size=1024, max_seq_len=64)
    model = Transformer(cfg)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    assert abs(std(model.layers[0].attn.q_proj.weight) - 0.02) < 0.001
    assert abs(std(model.layers[0].mlp.up_proj.weight) - 0.02) < 0.001
    scaled = 0.02 / (2 * cfg.n_layer) ** 0.5
    assert abs(std(model.layers[3].attn.o_proj.weight) - scaled) < 0.0005
    assert abs(std(model.layers[3].mlp.down_proj.weight) - scaled) < 0.0005
    assert abs(std(model.tok_embeddings.weight) - 0.02) < 0.001
    assert torch.all(model.layers[0].attn.q_proj.bias == 0) and torch.all(model.norm.weight == 1)


def test_vaswani_block_is_post_ln_with_scaled_sinusoidal_embeddings():
    """Each block ends in a LayerNorm (add & norm), so its output is normalised per token."""
    model = Transformer(model_config("vaswani-tiny")).eval()
    assert isinstance(model.norm, torch.nn.Identity)
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    h = model.embed(idx, model.default_positions(idx))
    # embedding scaled by sqrt(d_model) plus a sin/cos position code: position 0 is (0, 1, 0, 1, ...)
    tok = model.tok_embeddings(idx) * model.config.d_model**0.5
    pe0 = torch.zeros(model.config.d_model)
    pe0[1::2] = 1
    torch.testing.assert_close(h[0, 0] - tok[0, 0], pe0)
    out = model.layers[0](h)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 12), atol=1e-5, rtol=0)


def test_bf16_autocast_tracks_fp32():
    model = build("llama")
    idx = tokens(model)
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_compiles_without_graph_breaks_on_the_training_path():
    """fullgraph=True fails on any graph break; the eager backend keeps this test quick."""
    torch._dynamo.reset()
    model = build("llama-mqa-qknorm").train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = tokens(model)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [2] * 24])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(idx).float().mean().backward()
        compiled(idx, doc_ids=doc_ids).float().mean().backward()
