"""`POST /api/upload`: a file to attach to a later chat as `{"fileId": id}`; `GET` and
`DELETE /api/uploads/{id}`: one's own upload, to show or to remove.

Sent as multipart (field `file`) or, as CortexPrism's clients send it, as JSON
`{filename, mimeType, data}` with base64 data. Either way it goes through the same checks and
name/type clean-up as a file sent inline in a chat, belongs to the caller, and counts against
their upload quota (server/uploads.py).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel, Field, ValidationError

from ...agent.files import decode_files
from ...config import Settings
from ...protocol import ErrorCode, FileIn, ProtocolError
from ...sessions.ids import new_id, now_iso
from ...store.base import UploadRecord
from ..limits import ENVELOPE_BYTES
from ..uploads import check_quota, file_response
from .common import ApiError, Caller, Core, Ok, Open, api_router, doc, invalid

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
    description="413 `payload_too_large` beyond `server.max_file_bytes`, or when it would "
    "pass the caller's quota (`uploads.max_bytes_per_user`, `uploads.max_files_per_user`).",
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
    async with check_quota(core, caller.id, item.size):
        await core.store.save_upload(item)
    return {
        "ok": True,
        "path": f"uploads/{caller.id}/{item.id}",
        "filename": item.filename,
        "mimeType": item.mime_type,
        "id": item.id,
        "size": item.size,
    }


async def _own_upload(core: Core, caller: Caller, upload_id: str) -> UploadRecord:
    upload = await core.store.get_upload(upload_id)
    if upload is None or not caller.owns(upload.user_id):  # another's is answered as missing
        raise ApiError(404, ErrorCode.INVALID_MESSAGE, "Upload not found")
    return upload


@router.get(
    "/uploads/{upload_id}",
    summary="One of your uploads: the file itself (images inline, anything else as an attachment)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **doc(None, 404)},
)
async def get_upload(core: Core, caller: Caller, upload_id: str) -> Response:
    upload = await _own_upload(core, caller, upload_id)
    return file_response(upload.data, upload.mime_type, upload.filename)


@router.delete(
    "/uploads/{upload_id}",
    summary="Remove one of your uploads (chats that sent it keep their copy)",
    responses=doc(Ok, 404),
)
async def delete_upload(core: Core, caller: Caller, upload_id: str) -> dict[str, Any]:
    upload = await _own_upload(core, caller, upload_id)
    await core.store.delete_upload(upload.id)
    return {"ok": True}
