"""`/ws`: translate client frames into commands and session events into frames.

A connection owns no turn. It binds to at most one session at a time and subscribes to that
session's events; its frames go out through a bounded queue drained by one writer task, so a
slow client never slows a turn or another client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .. import __version__
from ..auth import Principal
from ..core import Prismd
from ..protocol import (
    PROTOCOL_VERSION,
    ApprovalResponse,
    AudioChunk,
    AudioEnd,
    Chat,
    ErrorCode,
    NewSession,
    Ping,
    PrismdError,
    ProtocolError,
    Resume,
    SelectAgent,
    ServerEvent,
    SessionEvent,
    Speak,
    Stop,
    TranscribedEvent,
    VoiceState,
    VoiceStateEvent,
    VoiceStream,
    dumps,
    error_frame,
    parse_client_message,
)
from ..providers import pricing
from ..sessions.coordination import TurnAlreadyRan
from ..sessions.ids import new_id
from ..sessions.service import LiveSession, Turn
from .uploads import charge_chat, link_uploads, resolve_uploads, upload_ids

log = logging.getLogger("prismd.ws")
STUCK_S = 5.0  # a client whose writes made no progress this long, with a full queue, is dropped
REVOKED_FLUSH_S = 1.0  # time given to the last frames of a revoked socket before it is cut
router = APIRouter()


@router.get("/ws", include_in_schema=False)
async def ws_without_upgrade(request: Request) -> JSONResponse:
    return JSONResponse(
        {"error": "This endpoint speaks WebSocket: send an Upgrade request", "code": "upgrade"},
        status_code=426,
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


@router.websocket("/ws")
async def ws_endpoint(websocket: WebSocket) -> None:
    core: Prismd = websocket.app.state.prismd
    if getattr(websocket.state, "user", None) is None:
        # The auth middleware refuses such an upgrade; should one get here, it fails closed.
        await websocket.close(code=1008)
        return
    pricing.preload()  # the price table, before this connection's first turn needs it
    await Connection(websocket, core).run()


class Connection:
    def __init__(self, ws: WebSocket, core: Prismd) -> None:
        self.ws = ws
        self.core = core
        self.id = new_id("conn")
        self.live: LiveSession | None = None
        self.agent_id: str | None = None  # from select_agent
        # Frames to send, each with whether it is `paced` (see _enqueue); how many are.
        self._out: deque[tuple[str, bool]] = deque()
        self._paced = 0
        self._wake = asyncio.Event()
        self._held: list[tuple[int, str]] | None = None
        self._limit = core.settings.server.send_queue_frames
        self._byte_limit = core.settings.server.send_queue_bytes
        self._bytes = 0  # characters of the frames waiting (not paced ones)
        # Frames of one store batch (up to 4096) arrive at once: a reading client may hold
        # that many more for a moment. Beyond this, the memory bound holds whatever happens.
        self._hard_limit = self._limit + 4096
        self._closing = False
        self._close_code = 1000
        self._sending = False  # the writer waits in a send: the socket takes no more bytes
        self._progress = time.monotonic()  # last time a frame left (or the queue was empty)
        self._drained = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        server = core.settings.server
        self._rate = server.rate_messages_per_s
        self._burst = float(server.rate_burst)
        self._tokens = self._burst
        self._refilled = time.monotonic()
        client = ws.client
        self.client_host = client.host if client else "unknown"
        from ..voice.pipeline import ConnectionVoice  # light: engines load on first use

        self.voice = ConnectionVoice(self, core.voice, core.settings.voice)
        # Set by the auth middleware before the upgrade (the local admin in the open mode).
        self.user: Principal = ws.state.user

    # ------------------------------------------------------------ outgoing

    def deliver(self, seq: int, frame: str) -> None:
        if self._held is not None:
            self._held.append((seq, frame))
        else:
            self._enqueue(frame)

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def push(self, frame: str) -> None:
        self._enqueue(frame, paced=True)

    def release(self, after_seq: int) -> None:
        held, self._held = self._held or [], None
        for seq, frame in held:
            if seq > after_seq:
                self._enqueue(frame, paced=True)

    def send(self, frame: ServerEvent) -> None:
        self._enqueue(dumps(frame))

    def _enqueue(self, frame: str, paced: bool = False) -> None:
        """`paced`: a replay's frames (and the live ones it held back), which the server
        itself queues in steps (REPLAY_STEP) and paces with drain(): they count against the
        memory bound only, not as frames the client failed to read."""
        if self._closing:
            return
        out = self._out
        if not out:
            self._progress = time.monotonic()
            if self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_later(
                    STUCK_S / 5, self._check_stuck
                )
        elif len(out) >= self._hard_limit:
            self._drop(f"{len(out)} frames unsent")
            return
        elif not paced and (
            len(out) - self._paced >= self._limit or self._bytes >= self._byte_limit
        ):
            # `send_queue_frames` frames wait while the socket takes no more bytes (the writer
            # is blocked in a send, or has sent nothing for STUCK_S): the client reads slower
            # than its frames come, by that many frames, or not at all. It is dropped; its
            # session's turn goes on and stays resumable. A full queue whose writer is still
            # sending is a burst (a store batch, up to 4096 frames at once) to a client that
            # reads: it may pass the limit by that much (`_hard_limit`).
            if self._sending or time.monotonic() - self._progress > STUCK_S:
                self._drop(f"{len(out) - self._paced} frames ({self._bytes} bytes) unsent")
                return
        out.append((frame, paced))
        self._paced += paced
        if not paced:
            self._bytes += len(frame)
        self._wake.set()

    def _check_stuck(self) -> None:
        """While frames wait, check every second that the client reads at all; one that has
        read nothing for STUCK_S with a full queue is dropped even if nothing more comes."""
        self._watchdog = None
        if not self._out or self._closing:
            return
        full = len(self._out) >= self._limit or self._bytes >= self._byte_limit
        if full and time.monotonic() - self._progress > STUCK_S:
            self._drop(
                f"{len(self._out)} frames ({self._bytes} bytes) unsent, no progress for "
                f"{STUCK_S:g} s"
            )
            return
        self._watchdog = asyncio.get_running_loop().call_later(STUCK_S / 5, self._check_stuck)

    def _drop(self, why: str) -> None:
        log.warning("connection %s dropped: %s", self.id, why)
        self._closing = True
        self._close_code = 1013
        self._out.clear()
        self._paced = self._bytes = 0
        self._drained.set()
        # The writer may be blocked in a send to a client that does not read: cancel it, and
        # the connection ends (see run()).
        if self._writer_task is not None:
            self._writer_task.cancel()

    async def drain(self, below: int) -> None:
        """Wait until fewer than `below` frames are queued (used by long replays); a client
        that reads nothing for STUCK_S meanwhile is dropped."""
        while len(self._out) >= below and not self._closing:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), STUCK_S)
            except TimeoutError:
                if time.monotonic() - self._progress > STUCK_S:
                    self._drop(f"no progress for {STUCK_S:g} s during a replay")

    def revoke(self, reason: str, user_removed: bool = False) -> None:
        """The credential this socket was opened with no longer holds (auth/live.py): a last
        `error` `unauthorized`, then the socket closes with CLOSE_REVOKED and handles no
        further frame (no chat, approval or voice). `user_removed`: the user's running turns
        are stopped too (a logout or a revoked token leaves them running, resumable, as a
        disconnect does)."""
        if self._closing:
            return
        from ..auth.live import CLOSE_REVOKED

        self.send(error_frame(ErrorCode.UNAUTHORIZED, reason))
        self._closing = True  # nothing more is queued or handled
        self._close_code = CLOSE_REVOKED
        self.voice.cancel_transcription()
        if user_removed:
            self.core.sessions.stop_all_of(self.user.id)
        self._wake.set()  # the writer sends what is queued, then ends, and so does run()
        writer = self._writer_task
        if writer is not None:
            # A client that does not read would hold the socket open: cut it after a while.
            asyncio.get_running_loop().call_later(REVOKED_FLUSH_S, writer.cancel)

    async def _writer(self) -> None:
        out, ws = self._out, self.ws
        while True:
            await self._wake.wait()
            self._wake.clear()
            while out:
                self._sending = True
                try:
                    frame, paced = out.popleft()
                    self._paced -= paced
                    if not paced:
                        self._bytes -= len(frame)
                    await ws.send_text(frame)
                finally:
                    self._sending = False
                self._progress = time.monotonic()
                if len(out) < self._limit // 2:
                    self._drained.set()
            if self._closing:
                return

    # ------------------------------------------------------------ incoming

    async def _admit(self) -> bool:
        """Count this connection against its client address (across processes when several
        share a Redis: auth/limits.py); False if over the limit."""
        server = self.core.settings.server
        limit = server.max_connections_per_client
        loopback = self.client_host in ("127.0.0.1", "::1", "localhost", "testclient")
        applies = limit and (server.limit_loopback or not loopback)
        return await self.core.auth.limits.connect(self.client_host, limit if applies else 0)

    def _allow_frame(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def run(self) -> None:
        await self.ws.accept()
        if not await self._admit():
            limit = self.core.settings.server.max_connections_per_client
            await self.ws.send_text(
                dumps(
                    error_frame(
                        ErrorCode.RATE_LIMITED,
                        f"Too many connections from {self.client_host} (limit {limit})",
                    )
                )
            )
            await self.ws.close(code=1013, reason="too many connections")
            return
        self.core.connections.add(self)
        self.core.auth.sockets.attach(self)
        self.send(
            {
                "type": "connected",
                "protocol": PROTOCOL_VERSION,
                "server": f"prismd/{__version__}",
                "connectionId": self.id,
            }
        )
        writer = self._writer_task = asyncio.create_task(self._writer())
        max_frame = self.core.settings.server.max_frame_bytes
        try:
            while not self._closing:
                receiving = asyncio.ensure_future(self.ws.receive())
                done, _ = await asyncio.wait(
                    {receiving, writer}, return_when=asyncio.FIRST_COMPLETED
                )
                if receiving not in done:  # the writer ended: the socket is gone or dropped
                    receiving.cancel()
                    break
                message = receiving.result()
                if message["type"] == "websocket.disconnect" or self._closing:
                    break
                if not self._allow_frame():
                    wait_ms = round(1000 * (1 - self._tokens) / self._rate)
                    self._error(
                        ErrorCode.RATE_LIMITED,
                        f"Too many messages: the limit is {self._rate:g} per second "
                        f"(bursts of {self._burst:g}); this one was dropped",
                        retryAfterMs=wait_ms,
                    )
                    continue
                text = message.get("text")
                if text is None:
                    data = message.get("bytes") or b""
                    if len(data) > max_frame:
                        self._error(ErrorCode.PAYLOAD_TOO_LARGE, self._too_large(len(data)))
                    elif self.voice.streaming:  # hands-free PCM (voice_stream start)
                        await self._handle_binary(data)
                    else:
                        self._error(
                            ErrorCode.INVALID_MESSAGE,
                            "Binary frames are not accepted: send JSON text frames (or start "
                            "a voice_stream for PCM audio)",
                            details={"field": "", "reason": "binary frame"},
                        )
                    continue
                if len(text) > max_frame or (
                    len(text) * 4 > max_frame and len(text.encode()) > max_frame
                ):
                    self._error(ErrorCode.PAYLOAD_TOO_LARGE, self._too_large(len(text.encode())))
                    continue
                await self._handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            self.core.auth.sockets.detach(self)
            await self.voice.close()
            self.core.connections.discard(self)
            await self.core.auth.limits.disconnect(self.client_host)
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._unbind()
            if not writer.done():
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                code = self._close_code
                try:
                    # A client that does not read blocks the close frame too: give up after a
                    # second; the transport is closed when this handler returns.
                    await asyncio.wait_for(self.ws.close(code=code), 1.0)
                except (RuntimeError, WebSocketDisconnect, TimeoutError):
                    pass

    def _too_large(self, size: int) -> str:
        limit = self.core.settings.server.max_frame_bytes
        return f"Frame of {size} bytes exceeds the limit of {limit} bytes"

    def _error(self, code: ErrorCode, message: str, **extra: Any) -> None:
        self.core.metrics.on_error(code.value)
        self.send(error_frame(code, message, **extra))

    async def _handle_binary(self, data: bytes) -> None:
        try:
            await self.voice.binary(data)
        except PrismdError as exc:
            self._error(exc.code, exc.message, details=getattr(exc, "details", None))
        except Exception:  # noqa: BLE001 - bad audio must never end the connection
            log.exception("connection %s: voice frame failed", self.id)
            self._error(ErrorCode.INTERNAL, "Internal server error")

    async def _handle(self, text: str) -> None:
        if self._closing:  # revoked or dropped while frames were waiting
            return
        try:
            msg = parse_client_message(text)
            handler = self._handlers[type(msg)]
            await handler(self, msg)
        except PrismdError as exc:  # a refusal, or a failure with its code (the store down…)
            self._error(exc.code, exc.message, details=getattr(exc, "details", None))
        except Exception:  # noqa: BLE001 - one bad frame must never end the connection
            log.exception("connection %s: handler failed", self.id)
            self._error(ErrorCode.INTERNAL, "Internal server error")

    # ------------------------------------------------------------ binding

    def _bind(
        self, live: LiveSession, announce: bool = True, resumed: tuple[int, bool] | None = None
    ) -> None:
        """Bind to `live` (subscribe to its events); `announce`: send the `session` frame
        (`resumed`: with the session's last seq and whether a turn is running)."""
        if self.live is not live:
            self._unbind()
            self.live = live
            self.core.sessions.subscribe(live, self)
        if not announce:
            return
        record = live.record
        agent = self.core.agents.find(record.agent_id, record.owner_id) if record.agent_id else None
        frame: SessionEvent = {
            "type": "session",
            "sessionId": live.id,
            "agentId": live.record.agent_id,
            "agentName": agent.name if agent else None,
        }
        if resumed is not None:
            frame["lastSeq"], frame["turnRunning"] = resumed
        self.send(frame)

    def session_gone(self, session_id: str, reason: str) -> None:
        """The bound session was deleted (REST, another tab), or dropped after a store
        failure: unbound, and told so."""
        if self.live is not None and self.live.id == session_id:
            self.live = None
            self.send({"type": "session_ended", "sessionId": session_id, "reason": reason})

    def _unbind(self) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            self.core.sessions.unsubscribe(live, self)

    # ------------------------------------------------------------ for the voice side
    # (voice/pipeline.py's VoiceHost: all that push-to-talk and hands-free use of a socket)

    @property
    def user_id(self) -> str:
        return self.user.id

    def turn_of(self, session_id: str | None) -> Turn | None:
        live = self.live
        if live is None or session_id not in (None, live.id):
            return None
        return live.turn

    async def voice_turn(self, chat: Chat, transcribed: TranscribedEvent) -> None:
        await self._chat(chat, preface=[transcribed], meta={"input": "voice"})

    def interrupt(self) -> None:
        live = self.live
        if live is not None and live.turn is not None:
            self.core.sessions.stop(live, keep_spoken=True)

    # ------------------------------------------------------------ handlers

    async def _ping(self, msg: Ping) -> None:
        self.send({"type": "pong"})

    async def _chat(
        self,
        msg: Chat,
        preface: list[ServerEvent] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """`preface`/`meta`: a voice turn's `transcribed` event and user-message metadata."""
        core, sessions, user = self.core, self.core.sessions, self.user
        if self.live is not None and sessions.live(self.live.id) is not self.live:
            self._unbind()  # the bound session was deleted under this connection
        if not msg.message.strip() and not msg.files:
            raise ProtocolError(ErrorCode.EMPTY_MESSAGE, "Empty message")
        agent_id = msg.agentId or self.agent_id
        namespace = user.id  # agent ids are per user (agent/agents.py)
        if agent_id is None and self.live is not None and msg.sessionId in (None, self.live.id):
            agent_id = self.live.record.agent_id
            namespace = self.live.record.owner_id  # an admin in another user's session
        if agent_id is None:
            agent_id = await core.auth.default_agent(user.id)
            if agent_id is not None and core.agents.find(agent_id, user.id, user.admin) is None:
                agent_id = None  # the chosen agent was deleted since
        agent = core.agents.get(agent_id, namespace, user.admin)
        ran = await sessions.ran_before(user, msg.sessionId, msg.clientMessageId)
        if ran is not None:  # a resend: the turn it ran, again (not charged, nothing stored)
            self._bind(ran[0], announce=ran[0] is not self.live)
            await sessions.replay(ran[0], self, 0, ran[1])
            return
        sent = upload_ids(msg)
        if sent:
            msg = await resolve_uploads(core, user, msg)
        # Everything that can refuse the chat (files, limits, provider, the user's daily
        # budget) is checked before a session is created or anything is stored.
        plan = core.runner.plan(msg, agent, user)
        refund = await charge_chat(core, user, plan.text, plan.files)
        started = False  # a chat that does not run is given back to the daily budget
        try:
            live = await sessions.for_chat(user, msg.sessionId, self.live, agent.id)
            link_uploads(core, live.id, sent)  # kept while the session exists
            self._bind(live, announce=live is not self.live)
            done_turn = sessions.turn_for(live, msg.clientMessageId)
            if done_turn is not None:  # a resend that raced the first send
                await sessions.replay(live, self, 0, done_turn)
                return
            sessions.set_agent(live, agent.id)
            plan.preface, plan.meta = preface, meta
            if self._closing:  # revoked while this chat was being prepared (or a voice turn's)
                return
            try:
                await core.runner.start(live, plan)
                started = True
            except TurnAlreadyRan as already:  # found once the session was read afresh
                await sessions.replay(live, self, 0, already.turn_id)
        finally:
            if not started:
                refund()

    async def _stop(self, msg: Stop) -> None:
        self.voice.cancel_transcription()  # a voice turn not begun yet never begins
        if self.live is None or not await self.core.sessions.request_stop(self.live):
            # Not a session event (no seq): tells this client that nothing is running.
            self.send({"type": "stopped", "turnRunning": False})

    async def _new_session(self, msg: NewSession) -> None:
        if self.live is not None:
            live = self.live
            self._unbind()
            self.core.sessions.close(live)
        self.send({"type": "session_ended"})

    async def _select_agent(self, msg: SelectAgent) -> None:
        agent = self.core.agents.get(msg.agentId, self.user.id, self.user.admin)
        self.agent_id = agent.id
        self.send({"type": "agent_selected", "agentId": agent.id, "agentName": agent.name})

    async def _resume(self, msg: Resume) -> None:
        sessions = self.core.sessions
        live = await sessions.for_resume(self.user, msg.sessionId, msg.lastSeq)
        running = await sessions.running_turn(live)
        self._bind(live, resumed=(live.last_seq, running is not None))
        if msg.lastSeq is not None:
            await sessions.replay(live, self, msg.lastSeq)
        elif running is not None:
            # No position given: show the turn in progress from its start.
            await sessions.replay(live, self, 0, running)

    async def _approval_response(self, msg: ApprovalResponse) -> None:
        if self.live is None or not await self.core.sessions.request_approval(
            self.live, msg.requestId, msg.approved
        ):
            raise ProtocolError(
                ErrorCode.TOOL_ERROR,
                f'No approval request "{msg.requestId}" is pending in this session',
            )

    async def _audio(self, msg: AudioChunk | AudioEnd) -> None:
        if isinstance(msg, AudioChunk):
            await self.voice.chunk(msg)
        else:
            await self.voice.end(msg)

    async def _speak(self, msg: Speak) -> None:
        await self.voice.speak(msg)

    async def _voice_stream(self, msg: VoiceStream) -> None:
        await self.voice.voice_stream(msg)

    async def _voice_state(self, msg: VoiceState) -> None:
        if self.live is None:
            raise ProtocolError(
                ErrorCode.SESSION_NOT_FOUND, "voice_state needs a bound session (send chat first)"
            )
        speaking = msg.speaking if msg.speaking is not None else bool(msg.enabled)
        frame: VoiceStateEvent = {
            "type": "voice_state",
            "sessionId": self.live.id,
            "speaking": speaking,
        }
        self.core.sessions.relay(self.live, frame, exclude=self)

    _handlers: dict[type, Any] = {
        Ping: _ping,
        Chat: _chat,
        Stop: _stop,
        NewSession: _new_session,
        SelectAgent: _select_agent,
        Resume: _resume,
        ApprovalResponse: _approval_response,
        AudioChunk: _audio,
        AudioEnd: _audio,
        Speak: _speak,
        VoiceState: _voice_state,
        VoiceStream: _voice_stream,
    }
