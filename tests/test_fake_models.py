"""The scripted fake model servers, exercised with the real openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import anthropic
import httpx2
import openai
import pytest

from prismd.testing.fake_models import FakeModelServer, Reply

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def oai_server():
    with FakeModelServer("openai") as server:
        yield server


@pytest.fixture(scope="module")
def ant_server():
    with FakeModelServer("anthropic") as server:
        yield server


@pytest.fixture
def oai(oai_server):
    oai_server.reset()
    oai_server.default = Reply()
    return oai_server


@pytest.fixture
def ant(ant_server):
    ant_server.reset()
    ant_server.default = Reply()
    return ant_server


def oai_client(server: FakeModelServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="test", max_retries=0, **kw)


def ant_client(server: FakeModelServer, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0, **kw)


def oai_stream(client: openai.OpenAI, content="hello there", **kw):
    return client.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )


def ant_stream(client: anthropic.Anthropic, content="hello there", **kw):
    return client.messages.create(
        model="claude-fake",
        max_tokens=100,
        messages=[{"role": "user", "content": content}],
        stream=True,
        **kw,
    )


# ----------------------------------------------------------------------------- openai


def test_openai_stream_text_and_usage(oai):
    oai.script(Reply(text=["Hel", "lo", " world"], usage=(11, 3), reasoning_tokens=2))
    chunks = list(oai_stream(oai_client(oai)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"gpt-fake"}
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["Hel", "lo", " world"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 3)
    assert last.usage.total_tokens == 14
    assert last.usage.completion_tokens_details.reasoning_tokens == 2
    assert oai.completed == 1 and oai.aborted == 0
    assert oai.requests[0]["model"] == "gpt-fake" and oai.requests[0]["stream"] is True


def test_openai_echo_default_and_computed_usage(oai):
    chunks = list(oai_stream(oai_client(oai), content="hi  you"))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["You ", "said: ", "hi  ", "you"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len("hi  you") // 4 + 1
    assert usage.completion_tokens == 4


def test_openai_no_usage_unless_asked(oai):
    client = oai_client(oai)
    stream = client.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_multipart_user_content(oai):
    oai.script(Reply(text="picked"), match="cat")
    content = [
        {"type": "text", "text": "look at this "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "cat"},
    ]
    chunks = list(oai_stream(oai_client(oai), content=content))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["picked"]


def test_openai_reasoning_before_text(oai):
    oai.script(Reply(text=["answer"], reasoning=["let me ", "think"]))
    kinds = []
    for chunk in oai_stream(oai_client(oai)):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning = getattr(delta, "reasoning_content", None)
        if reasoning is None and delta.model_extra:
            reasoning = delta.model_extra.get("reasoning_content")
        if reasoning:
            kinds.append(("reasoning", reasoning))
        if delta.content:
            kinds.append(("text", delta.content))
    assert kinds == [("reasoning", "let me "), ("reasoning", "think"), ("text", "answer")]


def test_openai_non_stream(oai):
    oai.script(Reply(text=["a", "b"], reasoning=["r"], usage=(5, 7)))
    resp = oai_client(oai).chat.completions.create(model="gpt-fake", messages=USER)
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-fake"
    assert resp.choices[0].message.content == "ab"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 7)
    assert getattr(resp.choices[0].message, "reasoning_content", None) == "r"


def test_openai_models(oai):
    models = oai_client(oai).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert oai.completed == 0 and oai.requests == []


def test_openai_non_stream_disconnect(oai):
    oai.script(Reply(text="never", disconnect_after=0))
    with pytest.raises(openai.APIConnectionError):
        oai_client(oai).chat.completions.create(model="m", messages=USER)
    assert oai.completed == 0


def test_openai_rate_limit_once_then_default(oai):
    oai.script(Reply(status=429, headers={"Retry-After": "0"}, times=1))
    client = oai_client(oai)
    with pytest.raises(openai.RateLimitError) as info:
        oai_stream(client)
    assert info.value.response.headers["retry-after"] == "0"
    assert info.value.body["type"] == "rate_limit_error"
    chunks = list(oai_stream(client))  # the rule is used up: default echo
    texts = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert texts == "You said: hello there"
    assert len(oai.requests) == 2


def test_openai_server_error(oai):
    oai.script(Reply(status=500, text="boom"))
    with pytest.raises(openai.InternalServerError) as info:
        oai_stream(oai_client(oai))
    assert "boom" in str(info.value)


def test_match_selects_rule(oai):
    oai.script(Reply(text="weather!"), match="weather")
    oai.script(Reply(text="time!", times=1), match="time")
    client = oai_client(oai)

    def ask(text: str) -> str:
        resp = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": text}]
        )
        return resp.choices[0].message.content

    assert ask("what time is it") == "time!"
    assert ask("the weather please") == "weather!"
    assert ask("what time is it") == "You said: what time is it"  # time rule used up
    assert ask("weather again") == "weather!"  # times=None: forever


def test_openai_disconnect_after_raises(oai):
    oai.script(Reply(text=["a", "b", "c", "d"], disconnect_after=2))
    got = []
    with pytest.raises((httpx2.HTTPError, openai.APIError)):
        for chunk in oai_stream(oai_client(oai)):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["a", "b"]
    assert oai.completed == 0


def test_openai_close_early_counts_aborted(oai):
    oai.script(Reply(text=["x"] * 200, delay_s=0.02))
    stream = oai_stream(oai_client(oai))
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 2:
                break
    stream.close()
    assert oai.wait_aborted(1, timeout=5)
    assert oai.completed == 0


def test_openai_stall_until_client_leaves(oai):
    oai.script(Reply(text=["a", "b", "c"], stall_after=1))
    got = []
    with pytest.raises((httpx2.TimeoutException, openai.APITimeoutError)):
        for chunk in oai_stream(oai_client(oai, timeout=0.5)):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["a"]
    assert oai.wait_aborted(1, timeout=5)


def test_openai_bad_json(oai):
    oai.script(Reply(text=["a", "b"], bad_json_after=1))
    with pytest.raises(json.JSONDecodeError):
        list(oai_stream(oai_client(oai)))


def test_openai_tool_calls(oai):
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    oai.script(
        Reply(text=["calling"], tool_calls=[{"id": "call_1", "name": "weather", "arguments": args}])
    )
    ids, names, parts, finish = [], [], [], None
    for chunk in oai_stream(oai_client(oai)):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.append(tc.id)
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            if tc.function and tc.function.arguments:
                parts.append(tc.function.arguments)
        finish = choice.finish_reason or finish
    assert ids == ["call_1"] and names == ["weather"]
    assert len(parts) > 1
    assert json.loads("".join(parts)) == {"city": "Paris", "unit": "celsius"}
    assert finish == "tool_calls"


def test_openai_pacing(oai):
    """Piece i comes no sooner than first_delay_s + i * delay_s after the request (a floor:
    tests rely on these pauses; a loaded machine only makes them longer)."""
    oai.script(Reply(text=["a"] * 5, delay_s=0.05, first_delay_s=0.1))
    start = time.monotonic()
    arrived = [
        time.monotonic() - start
        for chunk in oai_stream(oai_client(oai))
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(arrived) == 5
    for i, at in enumerate(arrived):
        assert at >= 0.1 + i * 0.05 - 0.005, arrived  # (5 ms: the clocks' resolution)


def test_stamp_gives_the_schedule_origin(oai, ant):
    """Reply.stamp: the first text piece starts with "@<t0> ", t0 on the monotonic clock when
    the answer started; the other pieces are unchanged (the load benchmark's lag)."""
    oai.script(Reply(text=["a ", "b "], reasoning=["r"], stamp=True))
    before = time.monotonic()
    chunks = list(oai_stream(oai_client(oai)))
    after = time.monotonic()
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts[1:] == ["b "]
    stamp, rest = texts[0].split(" ", 1)
    assert stamp.startswith("@") and rest == "a "
    assert before <= float(stamp[1:]) <= after
    ant.script(Reply(text=["x"], stamp=True))
    events = list(ant_stream(ant_client(ant)))
    (text,) = [e.delta.text for e in events if e.type == "content_block_delta"]
    stamp, rest = text.split(" ", 1)
    assert rest == "x" and before <= float(stamp[1:]) <= time.monotonic()


# ----------------------------------------------------------------------------- anthropic


def test_anthropic_stream_text_and_usage(ant):
    ant.script(Reply(text=["Hel", "lo"], usage=(9, 2)))
    events = list(ant_stream(ant_client(ant)))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert events[0].message.usage.input_tokens == 9
    assert events[0].message.model == "claude-fake"
    texts = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert texts == ["Hel", "lo"]
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 2
    assert ant.completed == 1


def test_anthropic_helper_stream_and_list_content(ant):
    ant.script(Reply(text=["yes"]), match="blocks")
    client = ant_client(ant)
    content = [{"type": "text", "text": "list of "}, {"type": "text", "text": "blocks"}]
    with client.messages.stream(
        model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": content}]
    ) as stream:
        assert stream.get_final_text() == "yes"
    echo = client.messages.create(model="claude-fake", max_tokens=10, messages=USER)
    assert echo.content[0].text == "You said: hello there"
    assert echo.stop_reason == "end_turn"
    assert echo.usage.input_tokens == len("hello there") // 4 + 1


def test_anthropic_thinking(ant):
    ant.script(Reply(text=["done"], reasoning=["hmm ", "ok"]))
    thinking, signature, text = [], None, []
    for event in ant_stream(ant_client(ant)):
        if event.type == "content_block_delta":
            if event.delta.type == "thinking_delta":
                assert not text, "thinking must come before text"
                thinking.append(event.delta.thinking)
            elif event.delta.type == "signature_delta":
                signature = event.delta.signature
            elif event.delta.type == "text_delta":
                text.append(event.delta.text)
    assert thinking == ["hmm ", "ok"] and text == ["done"] and signature


def test_anthropic_errors(ant):
    ant.script(Reply(status=429, headers={"Retry-After": "0"}, times=1))
    ant.script(Reply(status=500, times=1))
    client = ant_client(ant)
    with pytest.raises(anthropic.RateLimitError) as info:
        ant_stream(client)
    assert info.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.InternalServerError):
        ant_stream(client)
    texts = [e.delta.text for e in ant_stream(client) if e.type == "content_block_delta"]
    assert "".join(texts) == "You said: hello there"


def test_anthropic_disconnect_and_abort(ant):
    ant.script(Reply(text=["a", "b", "c"], disconnect_after=1), match="drop")
    ant.script(Reply(text=["x"] * 200, delay_s=0.02), match="slow")
    client = ant_client(ant)
    with pytest.raises((httpx2.HTTPError, anthropic.APIError)):
        list(ant_stream(client, content="drop"))
    stream = ant_stream(client, content="slow")
    for event in stream:
        if event.type == "content_block_delta":
            break
    stream.close()
    assert ant.wait_aborted(1, timeout=5)
    assert ant.completed == 0


def test_anthropic_tool_use(ant):
    args = json.dumps({"query": "fake models", "limit": 3})
    ant.script(
        Reply(text=["ok"], tool_calls=[{"id": "toolu_1", "name": "search", "arguments": args}])
    )
    parts, start, stop_reason = [], None, None
    for event in ant_stream(ant_client(ant)):
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            start = event.content_block
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            parts.append(event.delta.partial_json)
        elif event.type == "message_delta":
            stop_reason = event.delta.stop_reason
    assert start.id == "toolu_1" and start.name == "search"
    assert json.loads("".join(parts)) == {"query": "fake models", "limit": 3}
    assert stop_reason == "tool_use"
    with ant_client(ant).messages.stream(
        model="claude-fake", max_tokens=10, messages=USER
    ) as stream:  # default reply, to check that the accumulated message parses
        stream.until_done()
    ant.script(Reply(tool_calls=[{"id": "toolu_2", "name": "search", "arguments": args}], text=[]))
    with ant_client(ant).messages.stream(
        model="claude-fake", max_tokens=10, messages=USER
    ) as stream:
        final = stream.get_final_message()
    assert final.content[-1].input == {"query": "fake models", "limit": 3}


# ----------------------------------------------------------------------------- lifecycle


def test_many_concurrent_streams(oai):
    """A burst of raw streaming connections is accepted at once and paced concurrently: there
    is a moment when every one of them is streaming (each has had its first piece, none has
    ended), which one stream at a time could not give."""
    n, pieces = 300, 20
    oai.default = Reply(text=["tok "] * pieces, delay_s=0.1)
    body = json.dumps({"model": "m", "stream": True, "messages": USER}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()

    first_piece: list[float] = []
    ended: list[float] = []

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", oai.port)
        writer.write(head + body)
        data = b""
        while b'"content":"tok "' not in data:
            data += await reader.read(65536)
        first_piece.append(time.monotonic())
        data += await reader.read()  # until the server closes (Connection: close)
        ended.append(time.monotonic())
        writer.close()
        return data

    async def burst() -> list[bytes]:
        return await asyncio.gather(*(one() for _ in range(n)))

    results = asyncio.run(burst())
    assert all(r.count(b'"content":"tok "') == pieces and b"data: [DONE]" in r for r in results)
    assert oai.completed == n and len(oai.requests) == n
    assert max(first_piece) < min(ended)  # all n at once (one stream lasts ~1.9 s)


def test_stop_with_stalled_stream_is_prompt():
    server = FakeModelServer("openai", default=Reply(text=["a", "b"], stall_after=1)).start()
    thread = server._thread
    assert thread is not None
    try:
        stream = oai_stream(oai_client(server, timeout=5))
        next(iter(stream))
    finally:
        server.stop()
    # The server's thread ended: stop() did not give up on it (after 10 s) while the stalled
    # stream, which never ends by itself, held it.
    assert not thread.is_alive()
    with pytest.raises((httpx2.HTTPError, openai.APIError)):
        list(stream)


def test_cli_serves_until_killed():
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismd.testing.fake_models", "--kind", "openai"]
        + ["--pieces", "5", "--rate", "0", "--piece-text", "t "],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:") and line.endswith("/v1")
        client = openai.OpenAI(base_url=line.split()[1], api_key="test", max_retries=0)
        chunks = list(oai_stream(client))
        texts = [
            c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
        ]
        assert texts == ["t "] * 5
        assert chunks[-1].usage.completion_tokens == 5
    finally:
        proc.terminate()
        proc.wait(timeout=5)
