"""`current_time`: the date and time now, in UTC or a named time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..base import Tool, ToolContext, ToolError, ToolSpec


def _offset(value: datetime) -> str:
    delta = value.utcoffset()
    assert delta is not None
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


class CurrentTime(Tool):
    spec = ToolSpec(
        name="current_time",
        description=(
            "Get the current date and time (ISO 8601, with weekday) in UTC or in a given IANA "
            "time zone such as 'Europe/Paris' or 'America/New_York'."
        ),
        parameters={
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "description": "IANA time zone name. Default: UTC.",
                }
            },
            "required": [],
            "additionalProperties": False,
        },
    )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        name = args.get("timezone") or "UTC"
        if not isinstance(name, str):
            raise ToolError("timezone must be a string")
        name = name.strip()
        if name.upper() in ("UTC", "Z", "GMT"):
            tz: Any = UTC
            name = "UTC"
        else:
            try:
                tz = ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                raise ToolError(
                    f"unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin'"
                ) from None
        now = datetime.now(tz).replace(microsecond=0)
        abbreviation = now.tzname() or ""
        return (
            f"{now.isoformat()} ({now.strftime('%A')})\n"
            f"time zone: {name} ({abbreviation}, {_offset(now)})"
        )
