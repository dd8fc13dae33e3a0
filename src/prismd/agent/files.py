"""Uploaded files: decode, check limits, extract what the model can read.

Text and code go inline, PDFs as their extracted text (pypdf), images as image input for models
that take images. Anything else is stored and named to the model, not shown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import mimetypes
from pathlib import PurePosixPath

from ..protocol import ErrorCode, FileIn, ProtocolError
from ..sessions.ids import new_id
from ..store.base import FileRecord

IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml",
    ".toml", ".ini", ".cfg", ".conf", ".xml", ".html", ".htm", ".css", ".js", ".mjs", ".ts",
    ".tsx", ".jsx", ".py", ".rb", ".go", ".rs", ".java", ".kt", ".c", ".h", ".cc", ".cpp",
    ".hpp", ".cs", ".swift", ".php", ".pl", ".sh", ".bash", ".zsh", ".sql", ".r", ".lua",
    ".scala", ".dart", ".vue", ".svelte", ".tex", ".log", ".env", ".dockerfile", ".makefile",
}  # fmt: skip
# Inline text beyond this many characters per file is cut, with a note to the model.
MAX_INLINE_CHARS = 200_000


def _safe_name(name: str) -> str:
    # Only the last path component, so a name like "../../x" never means a path.
    base = PurePosixPath(name.replace("\\", "/")).name
    return base or "file"


def _is_text(name: str, mime: str, data: bytes) -> bool:
    if mime.startswith("text/") or mime in {"application/json", "application/xml"}:
        return True
    if PurePosixPath(name.lower()).suffix in TEXT_SUFFIXES:
        return True
    if mime == "application/octet-stream" and b"\x00" not in data[:4096]:
        try:
            data[:4096].decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    return False


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        return f"[The PDF could not be read: {exc}]"
    text = "\n\n".join(f"--- page {i + 1} ---\n{t.strip()}" for i, t in enumerate(pages))
    return text if text.strip() else "[The PDF contains no extractable text]"


def decode_files(files: list[FileIn], max_files: int, max_bytes: int) -> list[FileRecord]:
    """Validate and decode; raises ProtocolError. Text extraction happens in `extract`."""
    if len(files) > max_files:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"Too many files: {len(files)} (limit {max_files})"
        )
    records = []
    for i, f in enumerate(files):
        try:
            data = base64.b64decode(f.data or "", validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"File {f.filename!r}: `data` is not valid base64",
                {"field": f"files.{i}.data", "reason": "not valid base64"},
            ) from None
        if len(data) > max_bytes:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"File {f.filename!r} is {len(data)} bytes (limit {max_bytes})",
            )
        name = _safe_name(f.filename)
        mime = (f.mimeType or "").split(";")[0].strip().lower()
        if not mime or mime == "application/octet-stream":
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        records.append(FileRecord(new_id("file"), name, mime, len(data), data))
    return records


def _extract_one(f: FileRecord) -> None:
    if f.mime_type == "application/pdf" or f.data[:5] == b"%PDF-":
        f.text = _pdf_text(f.data)
    elif f.mime_type in IMAGE_TYPES:
        f.text = None
    elif _is_text(f.filename, f.mime_type, f.data):
        f.text = f.data.decode("utf-8", errors="replace")


async def extract(files: list[FileRecord]) -> None:
    """Fill in `text` for every file (PDF parsing runs off the event loop)."""
    for f in files:
        if f.mime_type == "application/pdf" or f.data[:5] == b"%PDF-":
            await asyncio.to_thread(_extract_one, f)
        else:
            _extract_one(f)


def describe_for_model(f: FileRecord, vision: bool) -> str:
    """The text the model reads for one attachment (images travel separately)."""
    if f.text is not None:
        body = f.text
        note = ""
        if len(body) > MAX_INLINE_CHARS:
            body = body[:MAX_INLINE_CHARS]
            note = f"\n[… cut at {MAX_INLINE_CHARS} characters of {len(f.text)}]"
        return f'<file name="{f.filename}" type="{f.mime_type}">\n{body}{note}\n</file>'
    if f.mime_type in IMAGE_TYPES:
        if vision:
            return f"[Image attached: {f.filename}]"
        return f"[Image attached: {f.filename} — this model cannot see images]"
    return (
        f"[File attached: {f.filename} ({f.mime_type}, {f.size} bytes), binary content not shown]"
    )
