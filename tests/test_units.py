"""Unit tests of the pure pieces: message parsing, context trimming, pricing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prismd.agent.context import build_context
from prismd.protocol import Chat, ErrorCode, ProtocolError, parse_client_message
from prismd.providers import pricing
from prismd.store.base import MessageRecord

from .conftest import of_type, openai_env


def msg(role: str, text: str, tokens: int = 0) -> MessageRecord:
    return MessageRecord(id=text, role=role, content=text, created_at="", token_count=tokens)


def test_context_keeps_newest_messages_within_the_window():
    history = []
    for i in range(50):
        history += [msg("user", f"question {i} " + "x" * 400), msg("assistant", f"answer {i}", 120)]
    history.append(msg("user", "latest"))
    ctx = build_context(history, "system", context_window=2000, max_output_tokens=500, vision=True)
    assert ctx.messages[-1].text == "latest"
    assert ctx.messages[0].role == "user"
    assert ctx.dropped > 0
    assert ctx.user_tokens + ctx.assistant_tokens <= 2000 - 500
    roles = [m.role for m in ctx.messages]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))


def test_context_always_sends_the_latest_message_even_if_too_big():
    ctx = build_context([msg("user", "y" * 100_000)], "", 1000, 100, True)
    assert len(ctx.messages) == 1


def test_context_merges_consecutive_roles_and_skips_empty():
    history = [msg("user", "a"), msg("assistant", ""), msg("user", "b")]
    ctx = build_context(history, "", 10_000, 100, True)
    assert [(m.role, m.text) for m in ctx.messages] == [("user", "a\n\nb")]


def test_parse_valid_chat():
    m = parse_client_message('{"type":"chat","message":"hi","sessionId":"s1","extra":1}')
    assert isinstance(m, Chat) and m.sessionId == "s1"


@given(st.text(max_size=200))
def test_parse_never_raises_anything_but_protocol_error(text):
    try:
        parse_client_message(text)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from(["chat", "resume", "select_agent", "stop", "speak", "audio_chunk", "x"]),
)
def test_parse_random_fields(value, kind):
    import json

    try:
        parse_client_message(json.dumps({"type": kind, "message": value, "sessionId": value}))
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


def test_deep_nesting_is_invalid_json_not_a_crash():
    with pytest.raises(ProtocolError) as exc:
        parse_client_message("[" * 100_000)
    assert exc.value.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)


def test_pricing_known_and_unknown():
    cost, source = pricing.price("openai", None, "gpt-4o-mini", 1_000_000, 0)
    assert cost == pytest.approx(0.15) and source["provider"] == "openai"
    assert pricing.price("openai", "http://127.0.0.1:1/v1", "no-such-model", 10, 10) == (
        None,
        None,
    )
    # Models served by a local Ollama have no price, whatever their name.
    assert pricing.price("ollama", None, "gpt-4o-mini", 10, 10) == (None, None)
    cost, source = pricing.price("openai", "https://api.deepseek.com/v1", "deepseek-chat", 1000, 0)
    assert source["provider"] == "deepseek"


def test_history_is_trimmed_to_the_configured_window(make_server, fake_openai):
    srv = make_server(
        openai_env(fake_openai),
        config="[providers.openai]\ncontext_window = 1200\nmax_output_tokens = 200\n",
    )
    with srv.client() as c:
        for i in range(8):
            frames = c.turn(message=f"turn {i} " + "z" * 1000)
    assert of_type(frames, "context_usage")[0]["maxContext"] == 1200
    sent = fake_openai.requests[-1]["messages"]
    assert sent[-1]["content"].startswith("turn 7")
    assert not any(m["content"].startswith("turn 0") for m in sent[1:])


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30), st.booleans())
def test_sse_decoder_is_independent_of_read_boundaries(cuts, crlf):
    from prismd.providers._http import SSEDecoder

    nl = "\r\n" if crlf else "\n"
    stream = (
        f'event: message_start{nl}data: {{"a": 1}}{nl}{nl}'
        f': a comment{nl}data: {{"b":{nl}data: 2}}{nl}{nl}'
        f'data: {{"c": "é"}}{nl}{nl}data: [DONE]{nl}{nl}data: {{"after": 1}}{nl}{nl}'
    ).encode()
    decoder, events, pos = SSEDecoder(), [], 0
    for cut in cuts:
        events += decoder.feed(stream[pos : pos + cut])
        pos += cut
    events += decoder.feed(stream[pos:])
    events += decoder.finish()
    assert events == [("message_start", {"a": 1}), (None, {"b": 2}), (None, {"c": "é"})]
    assert decoder.done


def test_coalesce_merges_neighbouring_deltas_only():
    from prismd.providers.base import ReasoningDelta, TextDelta, Usage, coalesce

    parts = [TextDelta("a"), TextDelta("b"), ReasoningDelta("r"), TextDelta("c"), Usage(1, 2)]
    assert coalesce(parts) == [TextDelta("ab"), ReasoningDelta("r"), TextDelta("c"), Usage(1, 2)]


def test_price_table_loads_on_first_use_not_at_startup():
    """An idle server does not hold genai-prices' table (~5.5 MB); the first connection loads
    it in a thread, and a price asked for before that loads it there and then."""
    import json
    import subprocess
    import sys

    code = """
import json, sys
from prismd.server.app import create_app
from prismd.providers import pricing
idle = "genai_prices" in sys.modules
thread = pricing.preload()
thread.join()
again = pricing.preload()
print(json.dumps([idle, "genai_prices" in sys.modules, again is None,
                  pricing.price("openai", None, "gpt-4o-mini", 1_000_000, 0)[0]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    idle, loaded, once, cost = json.loads(out.stdout.strip().splitlines()[-1])
    assert (idle, loaded, once) == (False, True, True)
    assert cost == pytest.approx(0.15)
    cold = (
        "from prismd.providers import pricing\n"
        "print(pricing.price('openai', None, 'gpt-4o-mini', 0, 1_000_000)[0])"
    )
    out = subprocess.run([sys.executable, "-c", cold], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o"),
        ("anthropic", "claude-sonnet-4-5"),  # tiered: above 200k input tokens
        ("anthropic", "claude-3-5-haiku-latest"),
    ],
)
def test_price_is_what_genai_prices_computes(kind, model):
    """prismd sums flat per-million prices itself (genai-prices' general path costs ~0.2 ms a
    turn); the result must be exactly genai-prices' own, tiered models included."""
    from datetime import UTC, datetime

    from genai_prices import Usage as PriceUsage

    info = pricing.lookup(kind, None, model)
    assert info is not None
    for tokens_in, tokens_out in [(0, 0), (1, 1), (100, 20), (123_456, 7_890), (250_000, 1_000)]:
        cost, source = pricing.price(kind, None, model, tokens_in, tokens_out)
        usage = PriceUsage(input_tokens=tokens_in, output_tokens=tokens_out)
        expected = info.model.calc_price(
            usage, info.provider, genai_request_timestamp=datetime.now(tz=UTC)
        ).total_price
        assert cost == pytest.approx(float(expected), rel=1e-12, abs=1e-15)
        assert source is not None and source["model"] == info.model.id


def test_every_failure_is_a_prismd_error_with_its_code():
    """One exception root; each failure carries the code a client is told (PROTOCOL.md B4)."""
    from prismd.auth.limits import RateLimited
    from prismd.protocol import PrismdError
    from prismd.providers.base import ProviderError
    from prismd.store.base import StoreUnavailable
    from prismd.tools.base import ToolError
    from prismd.voice.errors import SttUnavailable

    cases = [
        (ProtocolError(ErrorCode.TURN_IN_PROGRESS, "busy"), "turn_in_progress"),
        (ProviderError("down"), "provider_error"),
        (ProviderError("slow", ErrorCode.PROVIDER_TIMEOUT), "provider_timeout"),
        (ToolError("no"), "tool_error"),
        (StoreUnavailable("db down"), "store_unavailable"),
        (RateLimited(3), "rate_limited"),
        (SttUnavailable("no model"), "stt_unavailable"),
    ]
    for exc, code in cases:
        assert isinstance(exc, PrismdError) and exc.code == code and exc.message
