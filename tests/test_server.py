"""The OpenAI-compatible server (scratchlm.infer.server) on loopback, driven by the `openai` client.

Oracles: the official `openai` Python client must parse every response (chat, streaming,
completions, errors); greedy answers must equal what the library's `scratchlm.load(...)` API
generates for the same prompt; errors must come back in OpenAI's shape with the right status,
for malformed, over-long and wrong-typed requests alike, and the server must stay up after them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

import scratchlm  # noqa: E402
from scratchlm.infer.server import create_app  # noqa: E402
from scratchlm.runs import load_run  # noqa: E402

from server_helpers import live_server, make_run, slow_down  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("server") / MODEL, chat_tokens=True)


@pytest.fixture(scope="module")
def server(run_dir):
    run = load_run(run_dir)
    app = create_app(run.model, run.tokenizer, model_id=MODEL, api_key=KEY, max_batch=8)
    with live_server(app) as url:
        yield url, app, run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(run_dir):
    return scratchlm.load(run_dir)


def chat_messages(text="Hello there! How are you?"):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_equals_the_library_and_counts_usage(client, lm):
    from scratchlm.posttrain.chat_template import render_chat

    r = client.chat.completions.create(model=MODEL, messages=chat_messages(), max_tokens=12, temperature=0)
    expected = lm.chat(chat_messages(), max_new_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = render_chat(lm.tokenizer, chat_messages(), add_generation_prompt=True).ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)


def test_streaming_chat_matches_non_streaming_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=chat_messages("Once upon a time"), max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_sse_ending_in_done(server):
    url = server[0] + "/v1/completions"
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_equal_the_library_with_n_and_batches(client, lm):
    r = client.completions.create(model=MODEL, prompt=["Hello there", "Once upon"], max_tokens=10, temperature=0)
    assert [c.text for c in r.choices] == lm.generate(["Hello there", "Once upon"], max_new_tokens=10)
    assert [c.index for c in r.choices] == [0, 1]
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}  # beyond OpenAI's parameters
    sampled = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=7,
                                        top_p=0.95, extra_body=extra)
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=7,
                                      top_p=0.95, extra_body=extra)
    assert len(sampled.choices) == 3
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in sampled.choices}) > 1  # ... and the n choices differ


def test_stop_strings(client, lm):
    full = lm.generate("Hello there", max_new_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "bad,status,param",
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"temperature": 5}, 400, "temperature"),
        ({"max_tokens": 10**6}, 400, "max_tokens"),
        ({"max_tokens": True}, 400, "max_tokens"),
        ({"n": 0}, 400, "n"),
        ({"stop": 5}, 400, "stop"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(client, bad, status, param):
    body = {"model": MODEL, "messages": chat_messages(), "max_tokens": 4, **bad}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == status
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_malformed_bodies_and_unknown_routes(server):
    url, headers = server[0], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [
        ("POST", "/v1/chat/completions", b"{not json"),
        ("POST", "/v1/chat/completions", b"[1, 2]"),
        ("POST", "/v1/completions", b'{"model": "tiny-chat"}'),
        ("POST", "/v1/completions", b'{"prompt": [1, -5]}'),
        ("POST", "/v1/completions", b"x" * (2 << 20)),
        ("GET", "/v1/nothing-here", None),
    ]
    for method, path, content in cases:
        r = httpx.request(method, url + path, content=content, headers=headers)
        assert 400 <= r.status_code < 500, (path, r.status_code)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["model", "messages", "prompt", "temperature", "top_p", "max_tokens", "n", "stop",
                          "seed", "stream", "stream_options", "top_k", "min_p", "repetition_penalty"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(fields, json_values, max_size=5), st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_requests_never_crash_the_server(server, body, path):
    body.setdefault("max_tokens", 2)
    r = httpx.post(server[0] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_every_v1_route_requires_the_key(server):
    url, app, _ = server
    v1 = sorted({(m, r.path) for r in app.routes if getattr(r, "path", "").startswith("/v1")
                 for m in getattr(r, "methods", ()) if m != "HEAD"})
    assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= set(v1)
    for method, path in v1:
        path = path.replace("{model_name:path}", MODEL)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, json={}, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": MODEL, "prompt": "hi", "messages": chat_messages(), "max_tokens": 2})
        assert ok.status_code == 200, (path, ok.text)
    assert httpx.get(url + "/health").status_code == 200  # outside /v1: no key needed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_answers_429(run_dir):
    run = load_run(run_dir)
    app = create_app(run.model, run.tokenizer, model_id=MODEL, max_queue=0)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.body["code"] == "queue_full"


def test_disconnected_stream_frees_its_slot(server):
    url, app, run = server
    scheduler = app.state.engine.scheduler
    hook = slow_down(run.model, 0.05)  # 100 tokens would take > 5 s
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "stream": True, "temperature": 1.0,
                "extra": None}
        with httpx.stream("POST", url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # got a token: now hang up
            assert scheduler.active == 1
        deadline = time.monotonic() + 3
        while scheduler.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.active == 0
    finally:
        hook.remove()
