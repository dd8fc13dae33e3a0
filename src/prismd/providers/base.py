"""The model provider interface: one streaming call, typed parts out, typed errors."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..protocol import ErrorCode, PrismdError, clean_text


@dataclass(slots=True)
class ImagePart:
    mime_type: str
    data_b64: str


@dataclass(slots=True)
class ToolCall:
    """A tool call requested by the model (native tool calling), or parsed from its text."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(slots=True)
class ThinkingBlock:
    """A model's signed reasoning (Anthropic extended thinking). When thinking is on, the
    assistant message that asked for tools must carry its thinking blocks back, unchanged,
    with the tool results."""

    thinking: str = ""
    signature: str = ""
    redacted: str | None = None  # a redacted_thinking block's opaque data

    def to_json(self) -> dict[str, str]:
        if self.redacted is not None:
            return {"redacted": self.redacted}
        return {"thinking": self.thinking, "signature": self.signature}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ThinkingBlock:
        if "redacted" in data:
            return cls(redacted=str(data["redacted"]))
        return cls(str(data.get("thinking", "")), str(data.get("signature", "")))


@dataclass(slots=True)
class ChatMessage:
    """One message of the model's view. `tool` messages carry a result for `tool_call_id`."""

    role: Literal["user", "assistant", "tool"]
    text: str
    images: list[ImagePart] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # on assistant messages
    tool_call_id: str | None = None  # on tool messages
    tool_name: str | None = None  # on tool messages
    is_error: bool = False  # on tool messages
    thinking: list[ThinkingBlock] = field(default_factory=list)  # on assistant messages


@dataclass(slots=True)
class ToolDef:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class ModelRequest:
    model: str
    system: str
    messages: list[ChatMessage]
    temperature: float | None = None
    reasoning_effort: str | None = None
    max_output_tokens: int = 4096
    tools: list[ToolDef] = field(default_factory=list)  # for native tool calling


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0


@dataclass(slots=True)
class Finish:
    """Why the model ended its answer, as the API said it ("stop", "length", "tool_calls"…)."""

    reason: str


StreamPart = TextDelta | ReasoningDelta | Usage | ToolCall | ThinkingBlock | Finish


def coalesce(parts: list[StreamPart]) -> list[StreamPart]:
    """Merge neighbouring text (and reasoning) deltas that arrived together."""
    out: list[StreamPart] = []
    for part in parts:
        if isinstance(part, TextDelta | ReasoningDelta):
            part.text = clean_text(part.text)
        prev = out[-1] if out else None
        if type(part) is type(prev) and isinstance(part, TextDelta | ReasoningDelta):
            prev.text += part.text  # type: ignore[union-attr]
        else:
            out.append(part)
    return out


class ProviderError(PrismdError):
    """A model call failed; `code` is provider_error or provider_timeout.

    `retryable`: the response had started and then broke (reset, truncated, stalled). The SDKs
    already retry failures before the response; the turn runner retries these only when the
    call had produced nothing yet, so a retry can never duplicate text the user saw.
    """

    def __init__(
        self,
        message: str,
        code: ErrorCode = ErrorCode.PROVIDER_ERROR,
        retryable: bool = False,
    ):
        super().__init__(message, code)
        self.retryable = retryable


class Provider(abc.ABC):
    """One configured model endpoint. `stream` must close the upstream request when the
    consuming task is cancelled (that is how `stop` reaches the model)."""

    kind: str
    default_model: str
    base_url: str | None
    vision: bool = True
    max_output_tokens: int = 4096

    @abc.abstractmethod
    def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]: ...

    async def list_models(self) -> list[str]:
        """The ids of the models the endpoint offers (through the official SDK)."""
        raise ProviderError(f"Provider {self.kind!r} cannot list models")

    def text_tools(self, model: str) -> bool:
        """True when this model needs the text tool protocol whatever the settings say (a
        local model whose chat template has no tools)."""
        return False

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Prepare the default model in the background (called once, at startup)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass
