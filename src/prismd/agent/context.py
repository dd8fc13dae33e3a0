"""The model's view of a session: the real conversation, trimmed to fit its context window."""

from __future__ import annotations

from dataclasses import dataclass

from ..providers.base import ChatMessage, ImagePart
from ..store.base import MessageRecord
from .files import IMAGE_TYPES, describe_for_model

# Images are sent again only for the latest few user messages that carry them; older ones are
# named in text. Keeps long picture-heavy sessions within budget.
IMAGE_MESSAGES_KEPT = 3


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


def _text_of(msg: MessageRecord, vision: bool) -> str:
    parts = [describe_for_model(f, vision) for f in msg.files]
    if msg.content:
        parts.append(msg.content)
    return "\n\n".join(parts)


def build_context(
    history: list[MessageRecord],
    system_prompt: str,
    context_window: int,
    max_output_tokens: int,
    vision: bool,
) -> BuiltContext:
    """Newest messages first until the budget is spent; the latest user message always goes."""
    system_tokens = estimate_tokens(system_prompt)
    budget = context_window - max_output_tokens - system_tokens
    usable = [m for m in history if m.role in ("user", "assistant") and (m.content or m.files)]
    picked: list[tuple[MessageRecord, str, int]] = []
    spent = 0
    for i, msg in enumerate(reversed(usable)):
        text = _text_of(msg, vision)
        cost = (
            msg.token_count
            if msg.role == "assistant" and msg.token_count
            else estimate_tokens(text)
        )
        if i > 0 and spent + cost > budget:
            break
        picked.append((msg, text, cost))
        spent += cost
    picked.reverse()
    # Providers want the conversation to start with the user and alternate roles.
    while picked and picked[0][0].role != "user":
        picked.pop(0)
    messages: list[ChatMessage] = []
    user_tokens = assistant_tokens = 0
    image_budget = IMAGE_MESSAGES_KEPT
    image_flags = [False] * len(picked)
    for idx in range(len(picked) - 1, -1, -1):
        msg = picked[idx][0]
        if vision and image_budget and any(f.mime_type in IMAGE_TYPES for f in msg.files):
            image_flags[idx] = True
            image_budget -= 1
    for idx, (msg, text, cost) in enumerate(picked):
        images = (
            [
                ImagePart(f.mime_type, _b64(f.data))
                for f in msg.files
                if f.mime_type in IMAGE_TYPES and f.data
            ]
            if image_flags[idx]
            else []
        )
        if msg.role == "user":
            user_tokens += cost
        else:
            assistant_tokens += cost
        if messages and messages[-1].role == msg.role:
            messages[-1].text = f"{messages[-1].text}\n\n{text}"
            messages[-1].images.extend(images)
        else:
            messages.append(ChatMessage(msg.role, text, images))  # type: ignore[arg-type]
    return BuiltContext(
        messages, system_tokens, user_tokens, assistant_tokens, len(usable) - len(picked)
    )


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
