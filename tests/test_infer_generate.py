"""Generation: the KV-cache path equals recomputing everything, batches equal one-by-one,
speculative decoding equals plain greedy, streaming equals the whole text, stop strings and UTF-8
boundaries hold whatever the token split, and the user-facing API and CLI work end to end."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import UserError
from scratchlm.infer.generate import (
    BatchDecoder,
    IncrementalDecoder,
    StopMatcher,
    TextStream,
    fit_to_context,
    generate_ids,
    speculative_generate,
)
from scratchlm.infer.sampling import SamplingParams
from scratchlm.model.config import FAMILIES, model_config
from scratchlm.model.transformer import Transformer

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared machine two OpenMP threads
    spin-waiting on each other make each forward ~50x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]


def make_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # A wide init so greedy continuations vary instead of repeating one token.
    # (Vaswani's Xavier init makes a random post-LN model repeat one token; normal init does not.)
    extra = {"init": "normal"} if preset == "vaswani" else {}
    config = model_config(f"{preset}-tiny", vocab_size=64, max_seq_len=64, init_std=0.3, dropout=0.0,
                          **{**extra, **overrides})
    return Transformer(config).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def preset_model(request):
    return request.param, make_model(request.param, seed=1)


def test_cache_equals_no_cache_greedy(preset_model):
    _, model = preset_model
    with_cache = generate_ids(model, PROMPTS[:1], max_new_tokens=20)
    without = generate_ids(model, PROMPTS[:1], max_new_tokens=20, use_cache=False)
    assert with_cache == without
    assert len(set(with_cache[0])) > 3


def test_batched_equals_one_by_one(preset_model):
    _, model = preset_model
    batched = generate_ids(model, PROMPTS, max_new_tokens=12)
    alone = [generate_ids(model, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == alone
    assert generate_ids(model, PROMPTS, max_new_tokens=12, use_cache=False) == alone


def test_batch_rows_finish_independently(preset_model):
    """A row that stops early leaves the batch; the others go on exactly as alone."""
    _, model = preset_model
    alone = [generate_ids(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    stop = alone[1][3]  # row 1 stops at its 4th token
    batched = generate_ids(model, PROMPTS, max_new_tokens=10, stop_ids=[stop])
    for got, full in zip(batched, alone):
        expected = full[: full.index(stop)] if stop in full else full
        assert got == expected


def test_gqa_and_mqa_cache():
    for kv in (1, 2):
        model = make_model("llama", seed=kv, n_head=4, n_kv_head=kv)
        assert generate_ids(model, PROMPTS[:2], max_new_tokens=8) == [
            generate_ids(model, [p], max_new_tokens=8, use_cache=False)[0] for p in PROMPTS[:2]
        ]


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_speculative_equals_greedy(num_draft):
    target = make_model("llama", seed=1, n_layer=3)
    for draft in (make_model("llama", seed=2, n_layer=1), target):
        for prompt in PROMPTS[:2]:
            expected = generate_ids(target, [prompt], max_new_tokens=16)[0]
            out, stats = speculative_generate(target, draft, prompt, max_new_tokens=16, num_draft=num_draft)
            assert out == expected
        if draft is target:  # a draft that is the target is always right
            assert stats.acceptance_rate == 1.0
            assert stats.target_forwards < 16 // num_draft + 3


def test_speculative_respects_stop_ids():
    target, draft = make_model("gpt2", seed=3), make_model("gpt2", seed=4, n_layer=1)
    full = generate_ids(target, PROMPTS[:1], max_new_tokens=20)[0]
    stop = full[6]
    out, _ = speculative_generate(target, draft, PROMPTS[0], max_new_tokens=20, num_draft=4, stop_ids=[stop])
    assert out == full[: full.index(stop)]


def test_seeded_sampling_reproducible_and_batch_independent():
    model = make_model("llama", seed=5)
    params = SamplingParams(temperature=1.0, top_k=20, seed=42)
    a = generate_ids(model, PROMPTS[:1], max_new_tokens=20, sampling=params)
    b = generate_ids(model, PROMPTS, max_new_tokens=20, sampling=[params] + [SamplingParams(seed=i) for i in range(3)])
    assert a[0] == b[0]
    assert a != generate_ids(model, PROMPTS[:1], max_new_tokens=20, sampling=SamplingParams(seed=43))


def test_context_window_error_or_truncation():
    with pytest.raises(UserError, match="context window of 10"):
        fit_to_context(list(range(8)), 4, 10, "error")
    assert fit_to_context(list(range(8)), 4, 10, "truncate") == [2, 3, 4, 5, 6, 7]
    with pytest.raises(UserError, match="context window"):
        fit_to_context([1], 10, 10, "truncate")
    model = make_model("gpt2")
    with pytest.raises(UserError, match="context window"):
        BatchDecoder(model, [list(range(60))], max_new_tokens=10)


# ---- text level ---------------------------------------------------------------------------


class ByteTokenizer:
    """Ids are arbitrary byte strings (for testing how text is cut, independent of any BPE)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def token_bytes(self, i: int) -> bytes:
        return self.pieces[i]


def split_points(data, n: int) -> list[int]:
    return sorted(data.draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=8))) if n > 1 else []


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=30), data=st.data())
def test_incremental_decoding_never_splits_a_character(text, data):
    raw = text.encode("utf-8")
    cuts = [0, *split_points(data, len(raw)), len(raw)]
    pieces = [raw[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    decoder = IncrementalDecoder(ByteTokenizer(pieces))
    out = [decoder.push(i) for i in range(len(pieces))] + [decoder.flush()]
    assert "".join(out) == text
    assert "\ufffd" not in "".join(out)


def test_emoji_over_four_byte_tokens_arrives_whole():
    raw = "a🙂b".encode()
    decoder = IncrementalDecoder(ByteTokenizer([bytes([b]) for b in raw]))
    assert [decoder.push(i) for i in range(len(raw))] == ["a", "", "", "", "🙂", "b"]


@settings(max_examples=200, deadline=None)
@given(text=st.text("abc xyz", max_size=25), stop=st.text("abc ", min_size=1, max_size=4), data=st.data())
def test_stop_string_caught_across_any_split(text, stop, data):
    cuts = [0, *split_points(data, len(text)), len(text)]
    matcher = StopMatcher([stop])
    shown = "".join(matcher.push(text[a:b]) for a, b in zip(cuts, cuts[1:])) + matcher.flush()
    expected = text[: text.find(stop)] if stop in text else text
    assert shown == expected
    assert matcher.stopped == (stop in text)


def test_stop_held_back_text_is_released_when_it_is_not_a_stop():
    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == "the "
    assert matcher.push("ding") == "ENding"


# ---- end to end with a real tokenizer -------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from scratchlm.infer.api import load
    from scratchlm.runs import save_run
    from scratchlm.tokenizer.bpe import BPETokenizer

    text = "the cat sat on the mat. a dog ran in the fog. émigré café 🙂 done. " * 3
    tok = BPETokenizer.train([text], vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = Transformer(model_config("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.3))
    run = tmp_path_factory.mktemp("run")
    save_run(run, model, tok, {"model": model.config.to_dict()})
    return load(run)


def test_stream_concatenates_to_generate(lm):
    for kwargs in ({}, {"temperature": 0.9, "seed": 3}, {"stop": ["e"]}):
        whole = lm.generate("the cat", max_new_tokens=30, **kwargs)
        assert "".join(lm.stream("the cat", max_new_tokens=30, **kwargs)) == whole
    assert "e" not in lm.generate("the cat", max_new_tokens=30, stop="e")


def test_generate_text_batch_equals_single(lm):
    prompts = ["the cat sat", "a", "émigré café 🙂 done. the dog"]
    assert lm.generate(prompts, max_new_tokens=12) == [lm.generate(p, max_new_tokens=12) for p in prompts]


def test_completion_reports_finish_and_eos(lm):
    full = lm.complete("the", max_new_tokens=20, ignore_eos=True)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 20
    # Pretend the 5th generated token is end-of-text: generation stops there unless ignore_eos.
    eot = full.token_ids[4]
    first = full.token_ids.index(eot)
    stopped = lm.complete("the", max_new_tokens=20, stop_ids=[eot])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:first]


def test_logprobs_match_a_direct_forward(lm):
    scores = lm.logprobs("the cat sat on the mat")
    ids = torch.tensor([scores.ids])
    with torch.no_grad():
        logp = lm.model(ids).log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(scores.logprobs), logp, atol=1e-5)
    assert len(scores.tokens) == len(scores.ids)


def test_overflow_truncate_through_api(lm):
    long = "the cat sat on the mat. " * 20
    with pytest.raises(UserError, match="context window"):
        lm.generate(long, max_new_tokens=10)
    assert isinstance(lm.generate(long, max_new_tokens=10, overflow="truncate"), str)


def test_chat_without_template_is_a_clear_error_and_repl_falls_back(lm):
    from scratchlm.infer.chat import ChatSession, run_repl

    with pytest.raises(UserError, match="chat tokens"):
        lm.chat([{"role": "user", "content": "hi"}])
    session = ChatSession(lm, max_new_tokens=8, seed=0)
    lines = iter(["hello", "/params temperature=0", "/system be brief", "again", "/reset", "/quit"])
    out = io.StringIO()
    run_repl(session, read=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert "tokens/s" in text and "temperature=0" in text and "cleared" in text
    assert session.history == [] and session.system == "be brief"


def test_chat_with_template_stops_at_end_token(lm):
    from scratchlm.infer.api import LM
    from scratchlm.posttrain.chat_template import add_chat_tokens, render_chat

    tok = type(lm.tokenizer).from_json(lm.tokenizer.to_json())
    add_chat_tokens(tok)
    torch.manual_seed(1)
    model = Transformer(model_config("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.3)).eval()
    chat_lm = LM(model, tok)
    messages = [{"role": "user", "content": "the cat"}]
    reply = chat_lm.chat(messages, max_new_tokens=10)
    ids = render_chat(tok, messages, add_generation_prompt=True).ids
    raw = generate_ids(model, [ids], max_new_tokens=10)[0]
    end = tok.special_tokens["<|end|>"]
    expected = raw[: raw.index(end)] if end in raw else raw
    assert reply == tok.decode(expected)
    assert "".join(chat_lm.chat(messages, stream=True, max_new_tokens=10)) == reply


def test_cli_generate_streams_and_reports_errors(lm, capsys):
    from scratchlm.cli import main

    assert main(["generate", "--model", str(lm.path), "--prompt", "the cat", "--max-new-tokens", "10"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == lm.generate("the cat", max_new_tokens=10) + "\n"
    assert main(["generate", "--model", str(lm.path), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_quantized_model_generates_with_cache():
    from scratchlm.model.quant import quantize_model

    model = make_model("llama", seed=6)
    quantize_model(model, bits=8, progress=False)
    assert generate_ids(model, PROMPTS[:2], max_new_tokens=8) == [
        generate_ids(model, [p], max_new_tokens=8, use_cache=False)[0] for p in PROMPTS[:2]
    ]
