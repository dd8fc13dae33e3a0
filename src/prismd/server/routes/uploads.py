"""`POST /api/upload`: a file to attach to a later chat as `{"fileId": id}`.

Sent as multipart (field `file`) or, as CortexPrism's clients send it, as JSON
`{filename, mimeType, data}` with base64 data. Either way it goes through the same checks and
name/type clean-up as a file sent inline in a chat, and belongs to the caller.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError

from ...agent.files import decode_files
from ...config import Settings
from ...protocol import ErrorCode, FileIn, ProtocolError
from ...sessions.ids import new_id, now_iso
from ...store.base import UploadRecord
from ..limits import ENVELOPE_BYTES
from .common import ApiError, Caller, Core, Open, api_router, doc, invalid

router = api_router(tags=["uploads"])


def max_body_bytes(settings: Settings) -> int:
    """The largest request body the server reads: the largest accepted file as base64 JSON
    (or multipart), or the largest recording, plus room for the envelope."""
    as_base64 = -(-settings.server.max_file_bytes // 3) * 4
    return max(as_base64, settings.voice.max_audio_bytes) + ENVELOPE_BYTES


class UploadJson(BaseModel):
    filename: str = Field(min_length=1, max_length=1024)
    mimeType: str = Field(default="application/octet-stream", max_length=255)
    data: str = Field(description="The file, base64")


class UploadOut(Open):
    ok: bool
    path: str = Field(description="Where it is stored, relative to the data directory")
    filename: str
    mimeType: str
    id: str = Field(description="prismd: send it in a chat as {fileId: id}")
    size: int


_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/json": {"schema": UploadJson.model_json_schema()},
    },
}


async def _read(request: Request, limit: int) -> tuple[str, str, bytes]:
    """(filename, type, bytes) from either kind of body."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = UploadJson.model_validate_json(await request.body())
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise invalid(".".join(str(p) for p in err["loc"]), err["msg"]) from None
        try:
            data = base64.b64decode(body.data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("data", "not valid base64") from None
        return body.filename, body.mimeType, data
    form = await request.form(max_files=1, max_fields=10)
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise invalid("file", "Field required")
    data = await file.read(limit + 1)
    return file.filename or "file", file.content_type or "application/octet-stream", data


@router.post(
    "/upload",
    status_code=201,
    summary="Upload a file (multipart `file`, or JSON with base64 `data`)",
    openapi_extra={"requestBody": _BODY},
    responses=doc(UploadOut, 413, 422, status=201),
)
async def upload(request: Request, core: Core, caller: Caller) -> dict[str, Any]:
    limit = core.settings.server.max_file_bytes
    filename, mime_type, data = await _read(request, limit)
    if len(data) > limit:
        raise ApiError(
            413, ErrorCode.PAYLOAD_TOO_LARGE, f"The file is larger than the limit of {limit} bytes"
        )
    try:
        (record,) = decode_files(
            [
                FileIn(
                    filename=filename[:255] or "file",
                    mimeType=mime_type,
                    data=base64.b64encode(data).decode("ascii"),
                )
            ],
            1,
            limit,
        )
    except ProtocolError as exc:
        raise ApiError(422, exc.code, exc.message, details=exc.details) from None
    item = UploadRecord(
        new_id("upl"), caller.id, record.filename, record.mime_type, record.size, now_iso(), data
    )
    await core.store.save_upload(item)
    return {
        "ok": True,
        "path": f"uploads/{caller.id}/{item.id}",
        "filename": item.filename,
        "mimeType": item.mime_type,
        "id": item.id,
        "size": item.size,
    }
