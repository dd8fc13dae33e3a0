"""The turn runner: one agent turn of one session, from `start` to `done`.

A turn runs as its own task and publishes its events to the session, never to a socket, so a
disconnect does not stop it and every bound connection (and a later `resume`) sees the same
events. A turn is a loop of rounds: call the model, run the tools it asked for, feed the
results back, until it answers without tools or the round limit is hit. `stop` cancels the
work task, which closes the upstream request or kills the running tools.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Protocol

from ..config import AgentSettings, Settings
from ..protocol import (
    Chat,
    ContextUsageEvent,
    DoneEvent,
    ErrorCode,
    ProtocolError,
    ServerEvent,
    clean_text,
)
from ..providers import pricing
from ..providers.base import (
    ChatMessage,
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    ThinkingBlock,
    ToolCall,
    Usage,
)
from ..providers.registry import ProviderRegistry
from ..sessions.ids import new_id, now_iso
from ..sessions.service import LiveSession, SessionService, Turn
from ..store.base import FileRecord, MessageRecord, ToolCallPart, ToolResultPart
from ..tools.base import ToolContext, ToolError
from ..tools.builtins._paths import redact
from ..tools.registry import Caller, ToolRegistry, ToolView
from .context import BuiltContext, build_context, estimate_tokens
from .files import decode_files, extract
from .markup import FilterOutput, MalformedCall, MarkupFilter, malformed_feedback

log = logging.getLogger("prismd.turns")

# The assistant message is saved while it streams, at most this long after a piece arrived
# (for readers of the stored history; crash repair rebuilds it from the logged chunks).
SAVE_INTERVAL_S = 2.0

TEXT_PROTOCOL_PROMPT = """

# Tools
You can call tools. To call one, write exactly one block per call, and nothing after the
last block:
<tool_call>{{"tool": "TOOL_NAME", "args": {{...}}}}</tool_call>
The results come back as <tool_result name="TOOL_NAME" status="ok|error|denied">…</tool_result>.
Then continue; answer without a tool call when you are done.
Available tools:
{tools}
"""


class ReplySpeaker(Protocol):
    """Speaks an answer while it streams (voice/speaker.py). The runner feeds it the clean
    text of every chunk and awaits `finish` before `done`, so its events come before `done`."""

    spoken: list[str]  # the sentences spoken so far (published as `audio`), in order

    def feed(self, text: str) -> None: ...

    async def finish(self, stopped: bool) -> None: ...

    async def cancel(self) -> None: ...


# (publish, voice, stopped) -> a ReplySpeaker for one turn
ReplySpeakerFactory = Callable[
    [Callable[[ServerEvent], None], str | None, Callable[[], bool]], ReplySpeaker
]


@dataclass(slots=True)
class TurnPlan:
    agent: AgentSettings
    caller: Caller  # who the turn runs for: decides which tools it may use
    provider: Provider
    model: str
    text: str
    files: list[FileRecord]
    chat: Chat
    # Events published before `start` with the turn's id (a voice turn's `transcribed`).
    preface: list[ServerEvent] | None = None
    # Models still to try, in order, if this one fails before its first token ("kind:model").
    fallbacks: list[str] = field(default_factory=list)
    fallback_reason: str | None = None  # why the turn is not on its first choice (done)
    choice: str | None = None  # modelMode "auto": which rule chose the model (done)
    meta: dict[str, Any] | None = None  # stored on the user message (e.g. {"input": "voice"})


@dataclass(slots=True)
class PendingCall:
    id: str
    name: str
    arguments: str  # JSON text as written by the model
    args: Any = None
    error: str | None = None  # the call could not be understood


@dataclass
class _Totals:
    tokens_in: int = 0
    tokens_out: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    last: Usage | None = None
    first_token: float | None = None
    llm_s: float = 0.0
    tool_s: float = 0.0
    rounds: int = 0
    # Priced per model call, at the model that made it (a turn may fall back to another).
    calls: int = 0
    cost: float | None = 0.0  # None once a call's model has no known price
    cost_source: dict[str, Any] | None = None


class TurnRunner:
    def __init__(
        self,
        settings: Settings,
        providers: ProviderRegistry,
        sessions: SessionService,
        tools: ToolRegistry,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.sessions = sessions
        self.tools = tools
        # Set by the server when voice is available: speaks answers that ask for it.
        self.reply_speaker: ReplySpeakerFactory | None = None

    def plan(self, chat: Chat, agent: AgentSettings, caller: Caller) -> TurnPlan:
        """Validate a chat before anything is stored; raises ProtocolError (no seq)."""
        text = chat.message.strip()
        if not text and not chat.files:
            raise ProtocolError(ErrorCode.EMPTY_MESSAGE, "Empty message")
        limits = self.settings.server
        files = decode_files(chat.files, limits.max_files, limits.max_file_bytes)
        fallbacks = list(agent.fallback if agent.fallback is not None else self.settings.fallback)
        choice, spec = self._route(chat, agent, files)
        reason = None
        while True:
            try:
                if spec is not None:
                    provider, model = self.providers.resolve_spec(spec)
                else:
                    provider, model = self.providers.resolve(agent, chat.model)
                break
            except ProtocolError as exc:
                # Not configured: the next fallback, if there is one.
                if exc.code != ErrorCode.PROVIDER_UNCONFIGURED or not fallbacks:
                    raise
                reason = f"{spec or agent.provider or 'the default provider'}: {exc.message}"
                spec = fallbacks.pop(0)
        plan = TurnPlan(agent, caller, provider, model, chat.message, files, chat)
        plan.fallbacks, plan.fallback_reason, plan.choice = fallbacks, reason, choice
        return plan

    def _route(
        self, chat: Chat, agent: AgentSettings, files: list[FileRecord]
    ) -> tuple[str | None, str | None]:
        """modelMode "auto": (the rule that chose, "provider:model"); (None, None) otherwise
        (a chat's own `model` always wins)."""
        if chat.modelMode != "auto" or chat.model:
            return None, None
        routing = self.settings.routing
        if not routing.small or not routing.large:
            return "auto: no routing configured, the agent's model", None
        size = estimate_tokens(chat.message) + sum(f.size // 4 for f in files)
        if size > routing.large_above_tokens:
            return f"auto: large, the message is about {size} tokens", routing.large
        if files and routing.large_for_attachments:
            return "auto: large, the message has attachments", routing.large
        if routing.large_for_tools and agent.tools:
            return "auto: large, the agent uses tools", routing.large
        return f"auto: small, the message is about {size} tokens", routing.small

    async def start(self, live: LiveSession, plan: TurnPlan) -> Turn:
        """Take the session's turn lock (see SessionService.begin_turn) and launch the turn."""
        turn = await self.sessions.begin_turn(live, plan.chat.clientMessageId)
        for event in plan.preface or ():
            self.sessions.publish(live, turn.id, event)
        self.sessions.publish(live, turn.id, {"type": "start"})
        execution = _Execution(self, live, turn, plan)
        turn.task = asyncio.create_task(execution.run(), name=f"turn {turn.id}")
        return turn

    def text_protocol(self, provider: Provider, model: str) -> bool:
        ps = self.settings.provider_settings(provider.kind)
        if ps.tool_calling == "text" or provider.text_tools(model):
            return True
        return any(fnmatchcase(model, p) for p in ps.text_tool_models)


class _Execution:
    """The state of one running turn."""

    def __init__(self, runner: TurnRunner, live: LiveSession, turn: Turn, plan: TurnPlan):
        self.runner = runner
        self.sessions = runner.sessions
        self.live = live
        self.turn = turn
        self.plan = plan
        self.view: ToolView = runner.tools.view(plan.agent, plan.caller)
        self.text_tools = bool(self.view.tools) and runner.text_protocol(plan.provider, plan.model)
        self.window = runner.providers.context_window(plan.provider, plan.model)
        self.totals = _Totals()
        self.pieces: list[str] = []  # clean text of the current round
        self.reasoning: list[str] = []
        self.thinking: list[ThinkingBlock] = []  # the current round's signed reasoning
        self.answer: MessageRecord | None = None  # the current round's assistant message
        self.ctx: BuiltContext | None = None
        self.corrections: list[ChatMessage] = []  # re-prompts for unparseable calls
        self.malformed: list[MalformedCall] = []
        self.speech: ReplySpeaker | None = None
        self.produced = False  # the last model call produced something before it failed
        speak = plan.chat.speak or runner.settings.voice.auto_speak
        if speak and runner.reply_speaker is not None:
            self.speech = runner.reply_speaker(
                self.publish, plan.chat.voice, lambda: turn.stop_requested
            )

    def publish(self, event: ServerEvent) -> None:
        self.sessions.publish(self.live, self.turn.id, event)

    # ------------------------------------------------------------ the turn

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must end the turn, not hang it
            log.exception("turn %s failed", self.turn.id)
            message = f"Internal error: {exc}"
            try:  # the turn ends as an error in the store too, not `running` until a repair
                self._end_in_error(message)
            except Exception:  # noqa: BLE001
                log.exception("turn %s: could not record its failure", self.turn.id)
            self.publish({"type": "error", "code": ErrorCode.INTERNAL.value, "error": message})
        finally:
            if self.speech is not None:
                await self.speech.cancel()
            self.sessions.end_turn(self.live, self.turn)

    async def _run(self) -> None:
        plan, turn, live = self.plan, self.turn, self.live
        meta = {"clientMessageId": plan.chat.clientMessageId} if plan.chat.clientMessageId else {}
        meta.update(plan.meta or {})
        user = MessageRecord(
            id=new_id("msg"),
            role="user",
            content=plan.text,
            created_at=now_iso(),
            turn_id=turn.id,
            meta=meta,
            files=plan.files,
        )
        # The turn's work, which `stop` cancels: reading the files (a PDF is parsed in a
        # sandboxed child), then the rounds.
        work = asyncio.create_task(self._work(user))
        turn.consumer = work
        if turn.stop_requested:  # `stop` arrived before the model was called
            work.cancel()
        try:
            stop_reason = await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The server is shutting down: keep what streamed, marked interrupted.
                self._close_answer("interrupted")
                self.sessions.save_turn(live, turn.id, status="interrupted", ended_at=now_iso())
                raise
            stop_reason = "stopped"
        except ProviderError as exc:
            self._end_in_error(exc.message)
            if self.speech is not None:
                await self.speech.finish(stopped=True)
            self.publish({"type": "error", "code": exc.code.value, "error": exc.message})
            return
        if self.speech is not None:
            # The last sentences are spoken before `done`; a `stop` meanwhile drops the rest.
            await self.speech.finish(stopped=stop_reason == "stopped")
            if turn.stop_requested:
                stop_reason = "stopped"
        self._finish(stop_reason)

    async def _work(self, user: MessageRecord) -> str:
        try:
            await extract(self.plan.files)
        finally:  # stored even when stopped while its files were read
            self.sessions.add_message(self.live, user)
            self.live.history.append(user)
        return await self._rounds()

    async def _rounds(self) -> str:
        max_rounds = self.runner.settings.tools.max_rounds
        corrected = False
        while True:
            self.totals.rounds += 1
            calls = await self._round()
            if not calls:
                return "end"
            if self.totals.rounds >= max_rounds:
                return "max_rounds"
            # Tool calls written as text that could not be parsed (in any tool-calling mode: the
            # markup filter runs in all of them) have no name; the model never sees a result
            # for them, so it is told once, by a corrective re-prompt.
            unparsed = all(c.error and (self.text_tools or not c.name) for c in calls)
            if unparsed:
                if corrected:
                    return "end"
                corrected = True
                self._close_answer("complete")
                self.corrections.append(
                    ChatMessage("user", "[prismd] " + malformed_feedback(self.malformed))
                )
                continue
            self.corrections.clear()  # understood: the re-prompt has done its work
            self._close_answer("complete", tool_calls=calls)
            started = time.monotonic()
            await asyncio.gather(*(self._run_tool(call) for call in calls))
            self.totals.tool_s += time.monotonic() - started

    # ------------------------------------------------------------ one model call

    def _fall_back(self, exc: ProviderError) -> bool:
        """Move the turn to its next configured fallback model after `exc` (a call that failed
        before it produced anything, after its retries). False when none is left."""
        plan = self.plan
        failed = f"{plan.provider.kind}:{plan.model}"
        while plan.fallbacks:
            spec = plan.fallbacks.pop(0)
            try:
                provider, model = self.runner.providers.resolve_spec(spec)
            except ProtocolError as unconfigured:
                log.info("turn %s: fallback %s skipped (%s)", self.turn.id, spec, unconfigured)
                continue
            plan.fallback_reason = f"{failed}: {exc.message}"
            plan.provider, plan.model = provider, model
            log.warning("turn %s: %s; falling back to %s", self.turn.id, plan.fallback_reason, spec)
            self.text_tools = bool(self.view.tools) and self.runner.text_protocol(provider, model)
            self.window = self.runner.providers.context_window(provider, model)
            return True
        return False

    async def _round(self) -> list[PendingCall]:
        live = self.live
        self.answer = MessageRecord(
            id=new_id("msg"),
            role="assistant",
            content="",
            created_at=now_iso(),
            turn_id=self.turn.id,
            status="streaming",
            # After a crash its text is rebuilt from the chunks logged after this seq.
            meta={"startSeq": self.sessions.seal(live)},
        )
        self.sessions.add_message(live, self.answer)
        self.pieces = []
        while True:
            request, ctx = self._request()
            try:
                markup, native = await self._call_model(request, ctx)
                break
            except ProviderError as exc:
                # Nothing of this call reached the user: the same round on the next model.
                if self.produced or not self._fall_back(exc):
                    raise
        calls = [self._native_call(c) for c in native]
        for parsed in markup.calls:
            arguments = json.dumps(parsed.args, ensure_ascii=False)
            calls.append(PendingCall(new_id("call"), parsed.name, arguments, parsed.args))
        self.malformed = markup.malformed
        for bad in markup.malformed:
            calls.append(PendingCall(new_id("call"), "", bad.raw, error=bad.error))
        return calls

    def _request(self) -> tuple[ModelRequest, BuiltContext]:
        """The model call of a round, for the turn's current model."""
        plan = self.plan
        provider, agent = plan.provider, plan.agent
        system = agent.system_prompt
        if self.text_tools:
            system += TEXT_PROTOCOL_PROMPT.format(tools=self.view.describe_for_prompt())
        ctx = build_context(
            self.live.history,
            system,
            self.window,
            provider.max_output_tokens,
            provider.vision,
            text_tools=self.text_tools,
        )
        self.ctx = ctx
        tools = [] if self.text_tools else self.view.definitions()
        request = ModelRequest(
            model=plan.model,
            system=system,
            messages=ctx.messages + self.corrections,
            temperature=agent.temperature,
            reasoning_effort=plan.chat.reasoningEffort,
            max_output_tokens=provider.max_output_tokens,
            tools=tools,
        )
        return request, ctx

    async def _call_model(
        self, request: ModelRequest, ctx: BuiltContext
    ) -> tuple[MarkupFilter, list[ToolCall]]:
        """Stream one model call into chunks. A stream that broke before it produced anything
        is tried again (with backoff), up to the provider's max_retries."""
        provider, live = self.plan.provider, self.live
        retries = self.runner.settings.provider_settings(provider.kind).max_retries
        attempt = 0
        while True:
            markup = MarkupFilter(self.view.tools.keys(), parse_tools=bool(self.view.tools))
            native: list[ToolCall] = []
            usage: Usage | None = None
            reasoning_before = len(self.reasoning)
            self.thinking = []
            started = saved_at = time.monotonic()
            uncounted = False
            try:
                async for part in provider.stream(request):
                    kind = type(part)
                    if kind is TextDelta:
                        if self.totals.first_token is None:
                            self.totals.first_token = time.monotonic()
                        self._emit(markup.feed(part.text))  # type: ignore[union-attr]
                        now = time.monotonic()
                        if now - saved_at >= SAVE_INTERVAL_S and self.answer is not None:
                            saved_at = now
                            self.sessions.update_message(
                                live, self.answer.id, content="".join(self.pieces)
                            )
                    elif kind is ReasoningDelta:
                        if self.totals.first_token is None:
                            self.totals.first_token = time.monotonic()
                        self.reasoning.append(part.text)  # type: ignore[union-attr]
                    elif kind is Usage:
                        usage = part  # type: ignore[assignment]
                    elif kind is ToolCall:
                        native.append(part)  # type: ignore[arg-type]
                    elif kind is ThinkingBlock:
                        self.thinking.append(part)  # type: ignore[arg-type]
                self._emit(markup.finish())
                return markup, native
            except ProviderError as exc:
                produced = self.pieces or native or len(self.reasoning) > reasoning_before
                self.produced = bool(produced)
                # A call that produced nothing is not counted (nor estimated): it is retried,
                # or the turn falls back to another model or ends in an error.
                uncounted = not produced
                if not (exc.retryable and not produced and attempt < retries):
                    raise
                attempt += 1
                log.info("turn %s: retrying the model call (%s)", self.turn.id, exc.message)
            finally:
                self.totals.llm_s += time.monotonic() - started
                if not uncounted:
                    self._count(usage, ctx)
            await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))

    def _emit(self, out: FilterOutput) -> None:
        if out.text:
            self.pieces.append(out.text)
            self.publish({"type": "chunk", "delta": out.text})
            if self.speech is not None:
                self.speech.feed(out.text)
        if out.reasoning:
            self.reasoning.append(out.reasoning)

    def _count(self, usage: Usage | None, ctx: BuiltContext) -> None:
        t = self.totals
        if usage is None:
            # The stream ended before the provider reported usage (a stop): estimate, say so.
            t.estimated = True
            text = "".join(self.pieces)
            usage = Usage(
                sum(estimate_tokens(m.text) for m in ctx.messages) + ctx.system_tokens,
                estimate_tokens(text) if text else 0,
            )
        if self.answer is not None:
            self.answer.token_count = usage.output_tokens
        provider, model = self.plan.provider, self.plan.model
        cost, source = pricing.price(
            provider.kind, provider.base_url, model, usage.input_tokens, usage.output_tokens
        )
        t.calls += 1
        t.cost = None if cost is None or t.cost is None else t.cost + cost
        t.cost_source = source if cost is not None else t.cost_source
        t.tokens_in += usage.input_tokens
        t.tokens_out += usage.output_tokens
        t.reasoning_tokens += usage.reasoning_tokens
        t.last = usage

    def _native_call(self, call: ToolCall) -> PendingCall:
        pending = PendingCall(call.id or new_id("call"), call.name, call.arguments)
        try:
            pending.args = json.loads(call.arguments or "{}")
        except ValueError as exc:
            pending.error = f"The arguments of {call.name} are not valid JSON: {exc}"
        return pending

    # ------------------------------------------------------------ tools

    async def _run_tool(self, call: PendingCall) -> None:
        settings = self.runner.settings.tools
        name = call.name or "unknown"
        shown_input = call.args if call.args is not None else call.arguments
        self.publish({"type": "tool_start", "id": call.id, "name": name, "input": shown_input})
        started = time.monotonic()
        status, output = "ok", ""
        try:
            if call.error:
                raise ToolError(call.error)
            args = self.view.validate(call.name, call.args)
            if self.view.needs_approval(call.name):
                approved, why = await self._approve(call, args)
                if not approved:
                    status, output = "denied", why
            if status == "ok":
                tool = self.view.tools[call.name]
                ctx = ToolContext(
                    session_id=self.live.id,
                    agent_id=self.plan.agent.id,
                    workspace=self.runner.tools.workspace(
                        self.plan.agent.id, self.live.id, self.live.record.owner_id
                    ),
                    data_dir=self.runner.settings.data_dir,
                    settings=settings,
                    owner_id=self.live.record.owner_id,
                    trusted=self.plan.caller.admin,
                    store=self.sessions.store,
                )
                output = await tool.run(args, ctx)
        except ToolError as exc:
            status, output = "error", str(exc)
        except asyncio.CancelledError:
            stopped = "Stopped by the user before it finished."
            self._record_result(call, name, "error", stopped, started)
            raise
        except Exception as exc:  # noqa: BLE001 - a failing tool is reported, not fatal
            log.exception("tool %s failed", name)
            # The model sees what went wrong, never the server's paths.
            failed = f"The tool failed: {type(exc).__name__}: {exc}"
            data_dir = self.runner.settings.data_dir
            status, output = "error", redact(failed, data_dir / "workspaces", data_dir)
        self._record_result(call, name, status, output, started)

    def _record_result(
        self, call: PendingCall, name: str, status: str, output: str, started: float
    ) -> None:
        settings = self.runner.settings.tools
        output = clean_text(output)
        for_model = _cut(output, settings.max_output_chars)
        message = MessageRecord(
            id=new_id("msg"),
            role="tool",
            content=for_model,
            created_at=now_iso(),
            turn_id=self.turn.id,
            tool_result=ToolResultPart(call.id, name, status),
        )
        self.sessions.add_message(self.live, message)
        self.live.history.append(message)
        self.publish(
            {
                "type": "tool_end",
                "id": call.id,
                "name": name,
                "status": status,
                "output": _cut(output, settings.display_output_chars),
                "durationMs": round((time.monotonic() - started) * 1000, 1),
            }
        )

    async def _approve(self, call: PendingCall, args: dict[str, Any]) -> tuple[bool, str]:
        """Ask the session's clients; deny on timeout or when nobody is connected."""
        if not await self.sessions.connected(self.live):
            return False, "Denied: no client was connected to approve this tool call."
        request_id = new_id("appr")
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.turn.approvals[request_id] = waiter
        query = json.dumps(args, ensure_ascii=False)
        self.publish(
            {
                "type": "approval_request",
                "requestId": request_id,
                "toolCallId": call.id,
                "reasoning": "".join(self.pieces),
                "request": {
                    "tool": call.name,
                    "query": query[:4000],
                    "requestReason": f"The agent wants to run the tool {call.name}.",
                    "sessionId": self.live.id,
                    "agentId": self.plan.agent.id,
                    "dataClassification": self.view.tools[call.name].spec.data_classification,
                },
            }
        )
        timeout = self.runner.settings.tools.approval_timeout_s
        try:
            approved = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False, f"Denied: nobody answered the approval request within {timeout:g} s."
        finally:
            self.turn.approvals.pop(request_id, None)
        return approved, "" if approved else "Denied by the user."

    # ------------------------------------------------------------ the end

    def _close_answer(
        self,
        status: str,
        meta: dict[str, Any] | None = None,
        tool_calls: list[PendingCall] | None = None,
    ) -> None:
        answer = self.answer
        if answer is None or answer.status != "streaming":
            return
        answer.content = "".join(self.pieces)
        if status == "stopped" and self.turn.keep_spoken and self.speech is not None:
            # Interrupted by the user's voice: the conversation holds what they heard (the
            # streamed text stays in meta for the record).
            meta = {**(meta or {}), "streamed": answer.content}
            answer.content = " ".join(self.speech.spoken)
        answer.status = status
        answer.reasoning = "".join(self.reasoning) or None
        answer.meta = meta or {}
        if tool_calls and self.thinking:
            # Passed back with the tool results while thinking is on (providers/anthropic.py).
            answer.meta["thinking"] = [t.to_json() for t in self.thinking]
        if tool_calls:
            # Every call with a name, also one whose arguments were not valid JSON: its error
            # result is stored under its id, and the model must see the call it answers.
            answer.tool_calls = [
                ToolCallPart(c.id, c.name, c.arguments if c.args is not None else "{}")
                for c in tool_calls
                if c.name
            ]
        self.sessions.update_message(
            self.live,
            answer.id,
            content=answer.content,
            status=status,
            token_count=answer.token_count,
            reasoning=answer.reasoning,
            meta=answer.meta,
            tool_calls=answer.tool_calls,
        )
        self.live.history.append(answer)

    def _cost(self) -> tuple[float | None, dict[str, Any] | None]:
        """The turn's cost: the sum of its model calls' (None when one of them has no known
        price); a turn that made no call costs what its model charges for nothing."""
        t, provider = self.totals, self.plan.provider
        if t.calls == 0:
            return pricing.price(provider.kind, provider.base_url, self.plan.model, 0, 0)
        return (t.cost, t.cost_source) if t.cost is not None else (None, None)

    def _end_in_error(self, message: str) -> None:
        """The turn failed (the model, or prismd itself): what streamed is kept as an `error`
        answer, and the turn is recorded with what its model calls used and cost."""
        t, provider = self.totals, self.plan.provider
        cost, _ = self._cost()
        self._close_answer("error", {"error": message})
        ended = now_iso()
        self.sessions.save_turn(
            self.live,
            self.turn.id,
            status="error",
            stop_reason="error",
            ended_at=ended,
            provider=provider.kind,
            model=self.plan.model,
            tokens_in=t.tokens_in,
            tokens_out=t.tokens_out,
            cost_usd=cost,
        )
        self.sessions.add_turn_totals(self.live, t.tokens_in, t.tokens_out, cost, ended)

    def _finish(self, stop_reason: str) -> None:
        plan, t, live = self.plan, self.totals, self.live
        provider, model, chat = plan.provider, plan.model, plan.chat
        content = "".join(self.pieces)
        reasoning = "".join(self.reasoning)
        cost, cost_source = self._cost()
        if cost_source is not None and t.estimated:
            cost_source = {**cost_source, "estimatedTokens": True}
        status = "complete" if stop_reason in ("end", "max_rounds") else "stopped"
        self._close_answer(
            status,
            {
                "provider": provider.kind,
                "model": model,
                "tokensIn": t.tokens_in,
                "tokensOut": t.tokens_out,
                "costUsd": cost,
                "stopReason": stop_reason,
                "rounds": t.rounds,
                # What the user heard of a spoken reply (all of it unless interrupted).
                **({"spoken": " ".join(self.speech.spoken)} if self.speech is not None else {}),
            },
        )
        ended = now_iso()
        self.sessions.save_turn(
            live,
            self.turn.id,
            status=status,
            stop_reason=stop_reason,
            ended_at=ended,
            provider=provider.kind,
            model=model,
            tokens_in=t.tokens_in,
            tokens_out=t.tokens_out,
            cost_usd=cost,
        )
        self.sessions.add_turn_totals(live, t.tokens_in, t.tokens_out, cost, ended)

        if reasoning:
            self.publish({"type": "reasoning", "content": reasoning})
        t0 = self.turn.started
        total_ms = (time.monotonic() - t0) * 1000
        done: DoneEvent = {
            "type": "done",
            "tokensIn": t.tokens_in,
            "tokensOut": t.tokens_out,
            "costUsd": cost,
            "durationMs": round(total_ms),
            "model": model,
            "reasoningEffort": chat.reasoningEffort,
            "finalContent": content,
            "requestedModelMode": chat.modelMode or "manual",
            "resolvedProvider": provider.kind,
            "resolvedModel": model,
            "autoFallback": plan.fallback_reason is not None,
            "autoFallbackReason": plan.fallback_reason,
            "stopReason": stop_reason,
            "costSource": cost_source,
            "usageEstimated": t.estimated,
            "rounds": t.rounds,
            "latency": {
                "firstTokenMs": (round((t.first_token - t0) * 1000, 1) if t.first_token else None),
                "llmMs": round(t.llm_s * 1000, 1),
                "toolMs": round(t.tool_s * 1000, 1),
                "totalMs": round(total_ms, 1),
            },
        }
        if plan.choice:
            done["modelChoice"] = plan.choice
        self.publish(done)
        # Always right after `done` (clients wait for it), even for a turn stopped before the
        # model answered: then it reports what was sent, with no usage.
        self.publish(_context_usage(self.ctx, t.last or Usage(0, 0), self.window))


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[… output cut: {limit} of {len(text)} characters shown]"


def _context_usage(ctx: BuiltContext | None, usage: Usage, window: int) -> ContextUsageEvent:
    if ctx is None:
        ctx = BuiltContext([], 0, 0, 0, 0)
    used = usage.input_tokens + usage.output_tokens
    # Split the provider's prompt count in proportion to our estimates of each part.
    estimated = ctx.system_tokens + ctx.user_tokens + ctx.assistant_tokens or 1
    scale = usage.input_tokens / estimated
    system = round(ctx.system_tokens * scale)
    user = round(ctx.user_tokens * scale)
    assistant = usage.input_tokens - system - user + usage.output_tokens - usage.reasoning_tokens
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
