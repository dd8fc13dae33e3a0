"""Files uploaded with `POST /api/upload`, and their use in a `chat` (`{"fileId": …}`)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from ..auth import Principal
from ..protocol import Chat, ErrorCode, FileIn, ProtocolError

if TYPE_CHECKING:
    from .app import Prismd


async def resolve_uploads(core: Prismd, user: Principal, msg: Chat) -> Chat:
    """The chat with each `fileId` replaced by the upload's content, so that the usual checks
    and limits apply. Another user's upload is reported exactly like a missing one."""
    if len(msg.files) > core.settings.server.max_files:
        return msg  # refused with the usual message by the runner's checks
    files: list[FileIn] = []
    for i, f in enumerate(msg.files):
        if f.fileId is None:
            files.append(f)
            continue
        upload = await core.store.get_upload(f.fileId)
        if upload is None or not user.owns(upload.user_id):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f'Uploaded file "{f.fileId}" not found',
                {"field": f"files.{i}.fileId", "reason": "no such upload"},
            )
        files.append(
            FileIn(
                filename=upload.filename,
                mimeType=upload.mime_type,
                data=base64.b64encode(upload.data).decode("ascii"),
            )
        )
    return msg.model_copy(update={"files": files})
