"""The model's view of a session: the real conversation, trimmed to fit its context window.

History is trimmed by whole exchanges (a user message and everything that answered it: tool
calls, tool results, the answer), newest first, so a tool call never loses its result.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from ..providers.base import ChatMessage, ImagePart, ThinkingBlock, ToolCall
from ..store.base import MessageRecord
from .files import IMAGE_TYPES, describe_for_model

# Images are sent again only for the latest few user messages that carry them; older ones are
# named in text. Keeps long picture-heavy sessions within budget.
IMAGE_MESSAGES_KEPT = 3
INTERRUPTED_RESULT = "[no result: the call was interrupted before it finished]"


def estimate_tokens(text: str) -> int:
    # About four characters per token for English prose and code; used only for trimming and
    # for the context breakdown, never for billing.
    return len(text) // 4 + 4


@dataclass(slots=True)
class BuiltContext:
    messages: list[ChatMessage]
    system_tokens: int
    user_tokens: int
    assistant_tokens: int
    dropped: int  # messages left out to fit the window


def tool_calls_of(msg: MessageRecord) -> list[ToolCall]:
    if not msg.tool_calls:
        return []
    try:
        raw = json.loads(msg.tool_calls)
    except ValueError:
        return []
    return [
        ToolCall(str(c.get("id") or ""), str(c.get("name") or ""), str(c.get("arguments") or "{}"))
        for c in raw
        if isinstance(c, dict)
    ]


def tool_result_of(msg: MessageRecord) -> dict[str, str]:
    try:
        data = json.loads(msg.tool_result or "{}")
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


def render_text_call(call: ToolCall) -> str:
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = call.arguments
    body = json.dumps({"tool": call.name, "args": args}, ensure_ascii=False)
    return f"<tool_call>{body}</tool_call>"


def render_text_result(name: str, output: str, status: str) -> str:
    return f'<tool_result name="{name}" status="{status}">\n{output}\n</tool_result>'


def _text_of(msg: MessageRecord, vision: bool) -> str:
    parts = [describe_for_model(f, vision) for f in msg.files]
    if msg.content:
        parts.append(msg.content)
    return "\n\n".join(parts)


def _blocks(history: list[MessageRecord]) -> list[list[MessageRecord]]:
    blocks: list[list[MessageRecord]] = []
    for msg in history:
        if msg.role not in ("user", "assistant", "tool"):
            continue
        if msg.role == "user" or not blocks:
            blocks.append([])
        blocks[-1].append(msg)
    return blocks


def _convert(
    block: list[MessageRecord], vision: bool, text_tools: bool, images: bool
) -> tuple[list[ChatMessage], int, int]:
    """A block as provider messages, with (user tokens, assistant tokens)."""
    out: list[ChatMessage] = []
    user_tokens = assistant_tokens = 0
    pending: dict[str, str] = {}  # tool call id -> name, until its result is seen

    def close_pending() -> None:
        # A crash between a call and its result: providers reject a call without a result.
        for call_id, name in pending.items():
            out.append(_result_message(call_id, name, INTERRUPTED_RESULT, "error", text_tools))
        pending.clear()

    for msg in block:
        if msg.role == "user":
            close_pending()
            text = _text_of(msg, vision)
            user_tokens += estimate_tokens(text)
            pics = (
                [
                    ImagePart(f.mime_type, base64.b64encode(f.data).decode("ascii"))
                    for f in msg.files
                    if f.mime_type in IMAGE_TYPES and f.data
                ]
                if images
                else []
            )
            if text or pics:
                out.append(ChatMessage("user", text, pics))
        elif msg.role == "assistant":
            close_pending()
            calls = [c for c in tool_calls_of(msg) if c.name]
            text = msg.content
            cost = msg.token_count or estimate_tokens(text)
            if text_tools and calls:
                text = "\n".join([text, *map(render_text_call, calls)]).strip()
                calls = []
            if not text and not calls:
                continue
            assistant_tokens += cost
            thinking = [ThinkingBlock.from_json(b) for b in msg.meta.get("thinking") or ()]
            out.append(ChatMessage("assistant", text, tool_calls=calls, thinking=thinking))
            pending.update((c.id, c.name) for c in calls)
            if text_tools:
                pending.clear()
        else:  # tool result
            result = tool_result_of(msg)
            call_id = result.get("id") or ""
            name = result.get("name") or pending.get(call_id, "tool")
            if not text_tools and call_id not in pending:
                continue  # its call was dropped or never stored: a stray result is invalid
            pending.pop(call_id, None)
            user_tokens += estimate_tokens(msg.content)
            status = result.get("status") or "ok"
            out.append(_result_message(call_id, name, msg.content, status, text_tools))
    close_pending()
    return out, user_tokens, assistant_tokens


def _result_message(
    call_id: str, name: str, output: str, status: str, text_tools: bool
) -> ChatMessage:
    if text_tools:
        return ChatMessage("user", render_text_result(name, output, status))
    return ChatMessage(
        "tool", output, tool_call_id=call_id, tool_name=name, is_error=status != "ok"
    )


def build_context(
    history: list[MessageRecord],
    system_prompt: str,
    context_window: int,
    max_output_tokens: int,
    vision: bool,
    text_tools: bool = False,
) -> BuiltContext:
    """Newest exchanges first until the budget is spent; the latest exchange always goes."""
    system_tokens = estimate_tokens(system_prompt)
    budget = context_window - max_output_tokens - system_tokens
    blocks = _blocks(history)
    image_budget = IMAGE_MESSAGES_KEPT if vision else 0
    picked: list[tuple[list[ChatMessage], int, int]] = []
    spent = 0
    for i, block in enumerate(reversed(blocks)):
        has_images = any(f.mime_type in IMAGE_TYPES for m in block for f in m.files)
        send_images = bool(has_images and image_budget)
        converted, user_t, assistant_t = _convert(block, vision, text_tools, send_images)
        if i > 0 and spent + user_t + assistant_t > budget:
            break
        if send_images:
            image_budget -= 1
        picked.append((converted, user_t, assistant_t))
        spent += user_t + assistant_t
    picked.reverse()
    messages: list[ChatMessage] = []
    for block_messages, _, _ in picked:
        for msg in block_messages:
            mergeable = msg.role in ("user", "assistant") and not msg.tool_calls
            prev = messages[-1] if messages else None
            if mergeable and prev is not None and prev.role == msg.role and not prev.tool_calls:
                prev.text = f"{prev.text}\n\n{msg.text}" if prev.text else msg.text
                prev.images.extend(msg.images)
            else:
                messages.append(msg)
    # Providers want the conversation to open with the user.
    while messages and messages[0].role != "user":
        messages.pop(0)
    used = sum(len(b) for b in blocks[len(blocks) - len(picked) :])
    total = sum(len(b) for b in blocks)
    return BuiltContext(
        messages,
        system_tokens,
        sum(p[1] for p in picked),
        sum(p[2] for p in picked),
        total - used,
    )
