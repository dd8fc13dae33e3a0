"""Crash repair: a turn cut off by the death of the process running it (kill -9, power loss, a
lost machine) is ended in the session's log before anything else uses the session.

Its answer is rebuilt from the logged chunks (every chunk a client saw was logged first), kept
and marked `interrupted`; the turn is closed in the event log with a `done` whose `stopReason`
is `interrupted` (and its `context_usage`), so a client that is bound to the session, or
resumes it later, stops waiting and shows what was kept. A tool call that never returned gets
its "interrupted" result when the history is built for the model (agent/context.py).

In one process this runs at start for every session with a turn still `running`; with several
processes, when a process's lease on a session expires (sessions/coordination.py).
"""

from __future__ import annotations

import json

from ..protocol import ContextUsageEvent, DoneEvent, ServerEvent, dumps
from ..store.base import EventRow, SessionLog, Store

CRASH_MESSAGE = (
    "prismd stopped during this turn (a crash or a forced restart); the answer is kept as far "
    "as it had streamed"
)


async def repair(store: Store, session_id: str, state: SessionLog) -> list[EventRow]:
    """Mend what `state` shows was cut off; updates `state.last_seq`, waits until the repair
    is durable, and returns the events it logged (for the session's connections)."""
    last = None
    kept: dict[str, str] = {}  # turn id -> the text its answer kept
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
        if message.turn_id is not None:
            kept[message.turn_id] = content
        last = store.update_message(session_id, message.id, status="interrupted", content=content)
    rows: list[EventRow] = []
    for turn_id in state.running_turns:
        for event in _closing_events(kept.get(turn_id, "")):
            state.last_seq += 1
            event["sessionId"], event["turnId"] = session_id, turn_id
            event["seq"] = state.last_seq
            rows.append((state.last_seq, turn_id, dumps(event)))
        last = store.save_turn(session_id, turn_id, status="interrupted", stop_reason="interrupted")
    if rows:
        last = store.append_events(session_id, rows)
    if last is not None:
        await last
    return rows


def _closing_events(content: str) -> list[ServerEvent]:
    done: DoneEvent = {
        "type": "done",
        "tokensIn": 0,
        "tokensOut": 0,
        "costUsd": None,
        "durationMs": 0,
        "model": None,
        "reasoningEffort": None,
        "finalContent": content,
        "requestedModelMode": "manual",
        "resolvedProvider": None,
        "resolvedModel": None,
        "autoFallback": False,
        "autoFallbackReason": None,
        "stopReason": "interrupted",
        "costSource": None,
        "usageEstimated": True,
        "interruptedReason": CRASH_MESSAGE,
    }
    usage: ContextUsageEvent = {
        "type": "context_usage",
        "usedTokens": 0,
        "maxContext": 0,
        "percentage": 0,
        "breakdown": {
            "systemPrompt": 0,
            "userMessages": 0,
            "assistantMessages": 0,
            "reasoningOverhead": 0,
        },
    }
    return [done, usage]
