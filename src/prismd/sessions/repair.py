"""Crash repair: a session whose turn was cut off (kill -9, power loss) is mended when it is
next loaded, before anything else uses it.

A turn still `running` in the store was cut off. Its answer is rebuilt from the logged chunks
(every chunk a client saw was logged first), kept and marked `interrupted`; the turn is closed in
the event log with an `error` event, so a client that resumes it stops waiting. A tool call that
never returned gets its "interrupted" result when the history is built for the model
(agent/context.py).
"""

from __future__ import annotations

import json

from ..protocol import ErrorCode, dumps, error_frame
from ..store.base import SessionLog, Store

CRASH_MESSAGE = (
    "prismd stopped during this turn (a crash or a forced restart); the answer is kept as far "
    "as it had streamed"
)


async def repair(store: Store, session_id: str, state: SessionLog) -> None:
    """Mend what `state` shows was cut off; updates `state.last_seq` (and waits until the
    repair is durable)."""
    last = None
    for message in state.streaming:
        content = message.content
        if message.start_seq is not None and message.turn_id is not None:
            frames = await store.read_events(session_id, message.start_seq, message.turn_id)
            logged = "".join(
                event.get("delta", "")
                for _, frame in frames
                if (event := json.loads(frame)).get("type") == "chunk"
            )
            if len(logged) >= len(content):
                content = logged
        last = store.update_message(session_id, message.id, status="interrupted", content=content)
    for turn_id in state.running_turns:
        state.last_seq += 1
        frame = error_frame(ErrorCode.INTERNAL, CRASH_MESSAGE)
        frame.update(sessionId=session_id, turnId=turn_id, seq=state.last_seq)
        store.append_events(session_id, [(state.last_seq, turn_id, dumps(frame))])
        last = store.save_turn(session_id, turn_id, status="interrupted", stop_reason="error")
    if last is not None:
        await last
