"""The model provider interface: one streaming call, typed parts out, typed errors."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from ..protocol import ErrorCode


@dataclass(slots=True)
class ImagePart:
    mime_type: str
    data_b64: str


@dataclass(slots=True)
class ChatMessage:
    role: Literal["user", "assistant"]
    text: str
    images: list[ImagePart] = field(default_factory=list)


@dataclass(slots=True)
class ModelRequest:
    model: str
    system: str
    messages: list[ChatMessage]
    temperature: float | None = None
    reasoning_effort: str | None = None
    max_output_tokens: int = 4096


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


StreamPart = TextDelta | ReasoningDelta | Usage


class ProviderError(Exception):
    """A model call failed; `code` is provider_error or provider_timeout."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROVIDER_ERROR):
        super().__init__(message)
        self.code = code
        self.message = message


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

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass
