"""The decode step's C kernels (scratchlm.infer.native): each equals the torch op it replaces
(F.linear, RMSNorm, RoPE + cache write, SDPA with a mask and GQA, SiLU gating), a row's result
does not depend on how many rows share the call, and decoding falls back to torch when the
kernels are switched off or cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from scratchlm.infer import native
from scratchlm.infer.fast_decode import FusedDecodeStep, NativeDecodeStep, fused_step_for
from scratchlm.infer.generate import new_kv_cache
from scratchlm.model.config import model_config
from scratchlm.model.layers import RMSNorm, apply_rope, rope_cos_sin
from scratchlm.model.transformer import Transformer

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: kernels not built")


def test_kernels_build_where_a_compiler_exists():
    assert shutil.which("cc") is not None or shutil.which("gcc") is not None
    assert native.library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, out=None, accumulate=False) -> torch.Tensor:
    packed = native.pack_weight(weight)
    M, K = x.shape
    N = weight.shape[0]
    out = torch.zeros(M, N) if out is None else out
    native.library().linear_packed_f32(x.data_ptr(), M, K, packed.data_ptr(), N, native.ptr(bias),
                                       out.data_ptr(), out.stride(0), int(accumulate))
    return out


@pytest.mark.parametrize("M", [1, 3, 8, 11])
@pytest.mark.parametrize("K,N", [(1, 1), (17, 31), (64, 33), (40, 70)])
def test_linear_equals_f_linear(M, K, N):
    torch.manual_seed(M * 100 + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    residual = torch.randn(M, N)
    torch.testing.assert_close(linear(x, w, b, residual.clone(), accumulate=True),
                               residual + F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 5, 8, 9])
def test_bf16_weights_linear_equals_f_linear_on_the_same_values(M):
    torch.manual_seed(M)
    x, w, b = torch.randn(M, 40), torch.randn(70, 40).bfloat16(), torch.randn(70)
    packed = native.huge_page_buffer(native.packed_numel(70, 40), torch.bfloat16)
    native.pack_weight(w, packed)
    out = torch.zeros(M, 70)
    native.library().linear_packed_bf16(x.data_ptr(), M, 40, packed.data_ptr(), 70, b.data_ptr(),
                                        out.data_ptr(), 70, 0)
    torch.testing.assert_close(out, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-5)


def test_linear_row_results_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    x, w = torch.randn(13, 96), torch.randn(50, 96)
    together = linear(x, w)
    for i in range(len(x)):
        assert torch.equal(linear(x[i:i + 1].clone(), w)[0], together[i])


def test_linear_fills_a_column_range_of_a_wider_buffer():
    torch.manual_seed(1)
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    wide = torch.full((3, 12), 7.0)
    lib, packed = native.library(), native.pack_weight(w)
    lib.linear_packed_f32(x.data_ptr(), 3, 16, packed.data_ptr(), 5, None, wide[:, 4:].data_ptr(), 12, 0)
    torch.testing.assert_close(wide[:, 4:9], F.linear(x, w))
    assert (wide[:, :4] == 7).all() and (wide[:, 9:] == 7).all()


def test_rmsnorm_and_silu_gating_equal_torch():
    torch.manual_seed(2)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, out = torch.randn(5, 48), torch.empty(5, 48)
    native.library().rmsnorm_f32(x.data_ptr(), 5, 48, norm.weight.data_ptr(), 1e-5, out.data_ptr())
    torch.testing.assert_close(out, norm(x).detach(), rtol=1e-5, atol=1e-6)
    h, act = torch.randn(4, 2 * 24) * 4, torch.empty(4, 24)
    h[0, :6] = torch.tensor([-200.0, -88.0, -30.0, 30.0, 88.0, 200.0])  # exp's clamped range
    native.library().silu_mul_f32(h.data_ptr(), 4, 24, act.data_ptr())
    torch.testing.assert_close(act, F.silu(h[:, :24]) * h[:, 24:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope,per_row", [(True, True), (True, False), (False, False)])
def test_qkv_split_rotates_and_writes_the_cache(rope, per_row):
    torch.manual_seed(3)
    B, H, Hkv, D, S, slot = 3, 4, 2, 8, 10, 6
    qkv = torch.randn(B, (H + 2 * Hkv) * D)
    positions = torch.tensor([[6], [2], [0]]) if per_row else torch.full((B, 1), slot)
    cos, sin = rope_cos_sin(positions, D, 10000.0)
    table_cos, table_sin = (t.reshape(S, D).contiguous() for t in rope_cos_sin(torch.arange(S)[None], D, 10000.0))
    keys, values, q = torch.zeros(B + 1, Hkv, S, D), torch.zeros(B + 1, Hkv, S, D), torch.empty(B, H, D)
    c, s = (table_cos, table_sin) if rope else (None, None)
    rows = positions.reshape(B).contiguous() if per_row else None
    native.library().qkv_to_cache_f32(qkv.data_ptr(), B, H, Hkv, D, native.ptr(c), native.ptr(s), native.ptr(rows),
                                      q.data_ptr(), keys.data_ptr(), values.data_ptr(), S, slot)
    q_ref = qkv[:, :H * D].view(B, H, 1, D)
    k_ref = qkv[:, H * D:(H + Hkv) * D].view(B, Hkv, 1, D)
    v_ref = qkv[:, (H + Hkv) * D:].view(B, Hkv, 1, D)
    if rope:
        q_ref, k_ref = apply_rope(q_ref, cos, sin), apply_rope(k_ref, cos, sin)
    torch.testing.assert_close(q, q_ref[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys[:B, :, slot], k_ref[:, :, 0], rtol=1e-6, atol=1e-6)
    assert torch.equal(values[:B, :, slot], v_ref[:, :, 0])
    written = torch.zeros(B + 1, Hkv, S, dtype=torch.bool)
    written[:B, :, slot] = True
    assert (keys.abs().sum(-1)[~written] == 0).all() and (values.abs().sum(-1)[~written] == 0).all()


def test_embedding_rows_and_out_of_range_ids():
    table, out = torch.randn(10, 6), torch.zeros(3, 6)
    lib = native.library()
    ids = torch.tensor([4, 0, 9])
    assert lib.embed_rows_f32(table.data_ptr(), 10, ids.data_ptr(), 3, 6, out.data_ptr()) == -1
    assert torch.equal(out, table[ids])
    bad = torch.tensor([1, 10, 2])
    assert lib.embed_rows_f32(table.data_ptr(), 10, bad.data_ptr(), 3, 6, out.data_ptr()) == 1


@pytest.mark.parametrize("masked", [True, False])
def test_attention_equals_sdpa_with_gqa_and_mask(masked):
    torch.manual_seed(4)
    B, H, Hkv, D, S, L = 3, 6, 2, 16, 12, 9
    q = torch.randn(B, H, D)
    keys, values = torch.randn(B + 1, Hkv, S, D), torch.randn(B + 1, Hkv, S, D)
    mask = torch.rand(B, L) > 0.4
    mask[:, -1] = True  # every row sees at least its own slot
    out, scores = torch.empty(B, H, D), torch.empty(S)
    native.library().attend_decode_f32(q.data_ptr(), keys.data_ptr(), values.data_ptr(), B, H, Hkv, D, S, L,
                                       mask.data_ptr() if masked else None, L, D ** -0.5, out.data_ptr(),
                                       scores.data_ptr())
    expected = F.scaled_dot_product_attention(
        q[:, :, None], keys[:B, :, :L], values[:B, :, :L], attn_mask=mask[:, None, None] if masked else None,
        enable_gqa=True)
    torch.testing.assert_close(out, expected[:, :, 0], rtol=1e-5, atol=1e-5)


def tiny_llama() -> Transformer:
    torch.manual_seed(5)
    config = model_config("llama-tiny", vocab_size=64, max_seq_len=32, init_std=0.3, dropout=0.0)
    return Transformer(config).eval()


def test_bf16_model_step_equals_fp32_compute_on_its_weights():
    """A bf16 model decodes with bf16 weights and fp32 activations: the same numbers as the fp32
    model holding exactly those weights, given the same cache."""
    import copy

    model16 = tiny_llama().to(torch.bfloat16)
    model32 = copy.deepcopy(model16).float()
    step = fused_step_for(model16)
    assert isinstance(step, NativeDecodeStep) and step.packed.buffer.dtype == torch.bfloat16
    with torch.inference_mode():
        ours, theirs = new_kv_cache(model32, 2, 16), new_kv_cache(model32, 2, 16)
        prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
        model32(prompt, kv_cache=ours)
        model32(prompt, kv_cache=theirs)
        for token in ([7, 8], [2, 0], [63, 1]):
            nxt = torch.tensor(token).unsqueeze(1)
            torch.testing.assert_close(step(nxt, ours), model32(nxt, kv_cache=theirs)[:, -1], rtol=1e-4, atol=1e-4)


def test_step_refuses_a_full_cache_and_a_batch_larger_than_the_cache():
    model = tiny_llama()
    step = fused_step_for(model)
    assert isinstance(step, NativeDecodeStep)
    with torch.inference_mode():
        cache = new_kv_cache(model, 1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            step(torch.tensor([[5]]), cache)
        with pytest.raises(ValueError, match="does not fit"):
            step(torch.tensor([[5], [6]]), new_kv_cache(model, 1, 4))
        with pytest.raises(ValueError, match="positions must be >= 0"):
            step(torch.tensor([[5]]), new_kv_cache(model, 1, 4), positions=torch.tensor([[-1]]))


def test_step_refuses_out_of_range_token_ids():
    model = tiny_llama()
    with torch.inference_mode():
        cache = new_kv_cache(model, 1, 8)
        model(torch.tensor([[1, 2]]), kv_cache=cache)
        with pytest.raises(IndexError, match="token id 64 is out of range"):
            fused_step_for(model)(torch.tensor([[64]]), cache)


def test_switched_off_kernels_fall_back_to_torch(monkeypatch):
    monkeypatch.setenv("SCRATCHLM_NATIVE", "0")
    monkeypatch.setattr(native, "_LIBRARY", [])
    assert native.library() is None
    assert type(fused_step_for(tiny_llama())) is FusedDecodeStep


def test_a_compiler_failure_means_no_kernels_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_LIBRARY", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="native decode kernels unavailable"):
        assert native.library() is None


def test_threads_decoding_one_model_at_once_get_their_own_results():
    from concurrent.futures import ThreadPoolExecutor

    from scratchlm.infer.generate import generate_ids

    model = tiny_llama()
    prompts = [[[1, 2, 3]], [[9, 8]], [[5, 5, 5, 5], [7]], [[30, 31]]]
    alone = [generate_ids(model, p, max_new_tokens=12) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: generate_ids(model, p, max_new_tokens=12), prompts * 3))
    assert together == alone * 3


def test_packed_weights_ask_for_huge_pages():
    from pathlib import Path

    lib = native.library()
    small = torch.empty(1000)
    assert lib.advise_huge_pages(small.data_ptr(), 4000) == 1  # no 2 MiB-aligned part
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this system")
    buffer = native.huge_page_buffer(3 << 20)  # 12 MiB: several aligned 2 MiB pages inside
    assert buffer.numel() == 3 << 20 and buffer.dtype == torch.float32
    assert lib.advise_huge_pages(buffer.data_ptr(), buffer.numel() * 4) == 0


def test_a_decoded_model_can_be_freed_with_its_packed_weights():
    import gc
    import weakref

    model = tiny_llama()
    assert isinstance(fused_step_for(model), NativeDecodeStep)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_more_than_eight_padded_rows_equal_each_row_alone():
    from scratchlm.infer.generate import generate_ids

    model = tiny_llama()
    prompts = [[(7 * i + j) % 64 for j in range(1 + i % 4)] for i in range(11)]
    together = generate_ids(model, prompts, max_new_tokens=8)
    assert together == [generate_ids(model, [p], max_new_tokens=8, use_cache=False)[0] for p in prompts]
