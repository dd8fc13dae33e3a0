"""The turn runner: one agent turn of one session, from `start` to `done`.

A turn runs as its own task and publishes its events to the session, never to a socket, so a
disconnect does not stop it and every bound connection (and a later `resume`) sees the same
events. `stop` cancels the task that reads the model stream, which closes the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..config import AgentSettings, Settings
from ..protocol import Chat, ErrorCode, ProtocolError
from ..providers import pricing
from ..providers.base import (
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from ..providers.registry import ProviderRegistry
from ..sessions.manager import LiveSession, SessionManager, Turn, new_id, now_iso
from ..store.base import FileRecord, MessageRecord
from .context import build_context, estimate_tokens
from .files import decode_files, extract

log = logging.getLogger("prismd.turns")

# The assistant message is saved while it streams, at most this long after a piece arrived.
SAVE_INTERVAL_S = 0.25


@dataclass(slots=True)
class TurnPlan:
    agent: AgentSettings
    provider: Provider
    model: str
    text: str
    files: list[FileRecord]
    chat: Chat


class TurnRunner:
    def __init__(
        self, settings: Settings, providers: ProviderRegistry, manager: SessionManager
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.manager = manager
        self.store = manager.store

    def plan(self, chat: Chat, agent: AgentSettings) -> TurnPlan:
        """Validate a chat before anything is stored; raises ProtocolError (no seq)."""
        text = chat.message.strip()
        if not text and not chat.files:
            raise ProtocolError(ErrorCode.EMPTY_MESSAGE, "Empty message")
        limits = self.settings.server
        files = decode_files(chat.files, limits.max_files, limits.max_file_bytes)
        provider, model = self.providers.resolve(agent, chat.model)
        return TurnPlan(agent, provider, model, chat.message, files, chat)

    def start(self, live: LiveSession, plan: TurnPlan) -> Turn:
        """Take the session's turn lock and launch the turn. Synchronous, hence atomic."""
        turn = self.manager.begin_turn(live, plan.chat.clientMessageId)
        self.manager.publish(live, turn.id, {"type": "start"})
        turn.task = asyncio.create_task(self._run(live, turn, plan), name=f"turn {turn.id}")
        return turn

    def stop(self, live: LiveSession) -> bool:
        turn = live.turn
        if turn is None or turn.stop_requested or turn.task is None:
            return False
        turn.stop_requested = True
        self.manager.publish(live, turn.id, {"type": "stopped"})
        if turn.consumer is not None:
            turn.consumer.cancel()
        return True

    async def _run(self, live: LiveSession, turn: Turn, plan: TurnPlan) -> None:
        try:
            await self._run_turn(live, turn, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must end the turn, not hang it
            log.exception("turn %s failed", turn.id)
            self.manager.publish(
                live,
                turn.id,
                {
                    "type": "error",
                    "code": ErrorCode.INTERNAL.value,
                    "error": f"Internal error: {exc}",
                },
            )
        finally:
            self.manager.end_turn(live, turn)

    async def _run_turn(self, live: LiveSession, turn: Turn, plan: TurnPlan) -> None:
        sid = live.id
        t0 = turn.started
        await extract(plan.files)
        user = MessageRecord(
            id=new_id("msg"),
            role="user",
            content=plan.text,
            created_at=now_iso(),
            turn_id=turn.id,
            meta={"clientMessageId": plan.chat.clientMessageId}
            if plan.chat.clientMessageId
            else {},
            files=plan.files,
        )
        self.store.add_message(sid, user)
        live.history.append(user)

        provider, model, agent = plan.provider, plan.model, plan.agent
        window = self.providers.context_window(provider, model)
        ctx = build_context(
            live.history, agent.system_prompt, window, provider.max_output_tokens, provider.vision
        )
        request = ModelRequest(
            model=model,
            system=agent.system_prompt,
            messages=ctx.messages,
            temperature=agent.temperature,
            reasoning_effort=plan.chat.reasoningEffort,
            max_output_tokens=provider.max_output_tokens,
        )
        answer = MessageRecord(
            id=new_id("msg"),
            role="assistant",
            content="",
            created_at=now_iso(),
            turn_id=turn.id,
            status="streaming",
        )
        self.store.add_message(sid, answer)

        pieces: list[str] = []
        reasoning: list[str] = []
        usage: Usage | None = None
        first_token: float | None = None
        saved_at = time.monotonic()
        publish = self.manager.publish

        async def consume() -> None:
            nonlocal usage, first_token, saved_at
            async for part in provider.stream(request):
                if type(part) is TextDelta:
                    if not part.text:
                        continue
                    if first_token is None:
                        first_token = time.monotonic()
                    pieces.append(part.text)
                    publish(live, turn.id, {"type": "chunk", "delta": part.text})
                    now = time.monotonic()
                    if now - saved_at >= SAVE_INTERVAL_S:
                        saved_at = now
                        self.store.update_message(sid, answer.id, content="".join(pieces))
                elif type(part) is ReasoningDelta:
                    if first_token is None:
                        first_token = time.monotonic()
                    reasoning.append(part.text)
                elif type(part) is Usage:
                    usage = part

        llm_start = time.monotonic()
        consumer = asyncio.create_task(consume())
        turn.consumer = consumer
        if turn.stop_requested:  # `stop` arrived before the model was called
            consumer.cancel()
        error: ProviderError | None = None
        stop_reason = "end"
        try:
            await consumer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The server is shutting down: keep what streamed, marked interrupted.
                self._save_answer(live, answer, pieces, reasoning, "interrupted", 0)
                self.store.save_turn(sid, turn.id, status="interrupted", ended_at=now_iso())
                raise
            stop_reason = "stopped"
        except ProviderError as exc:
            error = exc
        llm_ms = (time.monotonic() - llm_start) * 1000

        content = "".join(pieces)
        reasoning_text = "".join(reasoning)
        if error is not None:
            self._save_answer(live, answer, pieces, reasoning, "error", 0, {"error": error.message})
            self.store.save_turn(
                sid, turn.id, status="error", stop_reason="error", ended_at=now_iso()
            )
            publish(
                live, turn.id, {"type": "error", "code": error.code.value, "error": error.message}
            )
            return

        estimated = usage is None
        if usage is None:
            # The stream ended before the provider reported usage (a stop): estimate, say so.
            usage = Usage(
                sum(estimate_tokens(m.text) for m in ctx.messages) + ctx.system_tokens,
                estimate_tokens(content + reasoning_text) if (content or reasoning_text) else 0,
            )
        cost, cost_source = pricing.price(
            provider.kind, provider.base_url, model, usage.input_tokens, usage.output_tokens
        )
        if cost_source is not None and estimated:
            cost_source = {**cost_source, "estimatedTokens": True}
        status = "complete" if stop_reason == "end" else "stopped"
        meta = {
            "provider": provider.kind,
            "model": model,
            "tokensIn": usage.input_tokens,
            "tokensOut": usage.output_tokens,
            "costUsd": cost,
            "stopReason": stop_reason,
        }
        self._save_answer(live, answer, pieces, reasoning, status, usage.output_tokens, meta)
        ended = now_iso()
        self.store.save_turn(
            sid,
            turn.id,
            status=status,
            stop_reason=stop_reason,
            ended_at=ended,
            provider=provider.kind,
            model=model,
            tokens_in=usage.input_tokens,
            tokens_out=usage.output_tokens,
            cost_usd=cost,
        )
        self.store.add_turn_totals(sid, usage.input_tokens, usage.output_tokens, cost, ended)
        record = live.record
        record.turn_count += 1
        record.last_turn_at = ended
        record.tokens_in += usage.input_tokens
        record.tokens_out += usage.output_tokens
        if cost is not None:
            record.cost_usd = (record.cost_usd or 0.0) + cost

        if reasoning_text:
            publish(live, turn.id, {"type": "reasoning", "content": reasoning_text})
        total_ms = (time.monotonic() - t0) * 1000
        chat = plan.chat
        publish(
            live,
            turn.id,
            {
                "type": "done",
                "tokensIn": usage.input_tokens,
                "tokensOut": usage.output_tokens,
                "costUsd": cost,
                "durationMs": round(total_ms),
                "model": model,
                "reasoningEffort": chat.reasoningEffort,
                "finalContent": content,
                "requestedModelMode": chat.modelMode or "manual",
                "resolvedProvider": provider.kind,
                "resolvedModel": model,
                "autoFallback": False,
                "autoFallbackReason": None,
                "stopReason": stop_reason,
                "costSource": cost_source,
                "usageEstimated": estimated,
                "latency": {
                    "firstTokenMs": round((first_token - t0) * 1000, 1) if first_token else None,
                    "llmMs": round(llm_ms, 1),
                    "toolMs": 0,
                    "totalMs": round(total_ms, 1),
                },
            },
        )
        publish(live, turn.id, self._context_usage(ctx, usage, window))

    def _save_answer(
        self,
        live: LiveSession,
        answer: MessageRecord,
        pieces: list[str],
        reasoning: list[str],
        status: str,
        tokens: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        answer.content = "".join(pieces)
        answer.status = status
        answer.token_count = tokens
        answer.reasoning = "".join(reasoning) or None
        answer.meta = meta or {}
        self.store.update_message(
            live.id,
            answer.id,
            content=answer.content,
            status=status,
            token_count=tokens,
            reasoning=answer.reasoning,
            meta=answer.meta,
        )
        live.history.append(answer)

    @staticmethod
    def _context_usage(ctx: Any, usage: Usage, window: int) -> dict[str, Any]:
        used = usage.input_tokens + usage.output_tokens
        # Split the provider's prompt count in proportion to our estimates of each part.
        estimated = ctx.system_tokens + ctx.user_tokens + ctx.assistant_tokens or 1
        scale = usage.input_tokens / estimated
        system = round(ctx.system_tokens * scale)
        user = round(ctx.user_tokens * scale)
        assistant = (
            usage.input_tokens - system - user + usage.output_tokens - usage.reasoning_tokens
        )
        return {
            "type": "context_usage",
            "usedTokens": used,
            "maxContext": window,
            "percentage": round(100 * used / window, 1) if window else 0,
            "breakdown": {
                "systemPrompt": system,
                "userMessages": user,
                "assistantMessages": max(assistant, 0),
                "reasoningOverhead": usage.reasoning_tokens,
            },
        }
