"""Uploaded files: decode, check limits, extract what the model can read.

Text and code go inline, PDFs as their extracted text (pypdf), images as image input for models
that take images. Anything else is stored and named to the model, not shown.

A PDF is a hostile document until parsed: a few KB can hold pages that cost minutes of CPU
each. Its text is extracted in a child process (`_PDF_WORKER`, in the tools' sandbox where the
machine has one: no network, no host files, its own uid), with a wall-clock limit, rlimits on
CPU time and memory, caps on pages and characters, and a kill when the turn is stopped (the
extraction is awaited by the turn's task: cancelling it kills the child). At most
`PDF_PARALLEL` extractions run at once per server, queued on a semaphore of their own: no
thread of the server is used, so logins, auth lookups and tools never wait behind parsing.

A PDF that reaches a limit is not an error of the chat: the model reads the text extracted so
far and a note in brackets saying which limit stopped it ("[The PDF could not be read: …]"
when nothing could be extracted), and the file is stored as sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import mimetypes
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..protocol import ErrorCode, FileIn, ProtocolError
from ..sessions.ids import new_id
from ..store.base import FileRecord
from ..tools.builtins import sandbox

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


@dataclass(frozen=True, slots=True)
class PdfLimits:
    timeout_s: float = 20.0  # wall clock, queueing not included
    cpu_s: int = 20
    memory_mb: int = 768
    max_pages: int = 1000
    max_chars: int = MAX_INLINE_CHARS


PDF_LIMITS = PdfLimits()
PDF_PARALLEL = 2

# The extractor: the PDF on stdin; one JSON line per finding on stdout: {"pages": n}, then
# {"page": i, "text": …} for each page, then {"end": "done" | "pages" | "chars"}; or
# {"error": …}. Standard library and pypdf only.
_PDF_WORKER = r"""
import io, json, logging, sys, warnings
logging.disable(logging.CRITICAL)
warnings.simplefilter("ignore")
def out(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
max_pages, max_chars = int(sys.argv[1]), int(sys.argv[2])
data = sys.stdin.buffer.read()
try:
    from pypdf import PdfReader
    reader = PdfReader(io.BytesIO(data))
    count = len(reader.pages)
    out({"pages": count})
    used = 0
    last = min(count, max_pages)
    for i in range(last):
        full = reader.pages[i].extract_text() or ""
        text = full[: max_chars - used]
        used += len(text)
        out({"page": i + 1, "text": text})
        if len(text) < len(full) or (used >= max_chars and i + 1 < last):
            out({"end": "chars"})
            break
    else:
        out({"end": "pages" if count > max_pages else "done"})
except Exception as exc:  # any failure of a malformed file: its reason, for the model
    out({"error": f"{type(exc).__name__}: {exc}"[:300]})
"""

_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _pdf_slot() -> asyncio.Semaphore:
    """The server's (the running loop's) queue of PDF extractions."""
    loop = asyncio.get_running_loop()
    slot = _slots.get(loop)
    if slot is None:
        slot = _slots[loop] = asyncio.Semaphore(PDF_PARALLEL)
    return slot


async def pdf_text(data: bytes, limits: PdfLimits = PDF_LIMITS) -> str:
    """The text of a PDF for the model, with a bracketed note when a limit stopped it."""
    spec = sandbox.RunSpec(
        [
            sys.executable,
            "-I",
            "-B",
            "-c",
            _PDF_WORKER,
            str(limits.max_pages),
            str(limits.max_chars),
        ],
        memory_mb=limits.memory_mb,
        max_processes=4,
        cpu_s=limits.cpu_s,
        stdin_data=data,
    )
    async with _pdf_slot():
        try:
            run = await sandbox.run(
                spec,
                timeout_s=limits.timeout_s,
                # Room for every character in UTF-8 JSON, so that nothing is cut.
                max_output_bytes=limits.max_chars * 6 + 1024 * 1024,
                fallback_ok=True,
            )
        except (OSError, subprocess.SubprocessError, sandbox.SandboxUnavailable) as exc:
            why = sandbox.start_error(exc)
            return f"[The PDF could not be read: the text extractor could not start ({why})]"
    pages: list[str] = []
    count: int | None = None
    end: str | None = None
    error: str | None = None
    for line in run.proc.output.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill, or a stray message
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("pages"), int):
            count = item["pages"]
        elif isinstance(item.get("text"), str):
            pages.append(item["text"])
        elif isinstance(item.get("end"), str):
            end = item["end"]
        elif isinstance(item.get("error"), str):
            error = item["error"]
    stopped = _limit_reached(run, limits)
    of = f" of {count}" if count is not None else ""
    note = None
    if stopped is not None:
        note = f"The PDF could not be read: {stopped}"
        if pages:
            note = f"Text extraction stopped after page {len(pages)}{of}: {stopped}"
    elif error is not None:
        note = f"The PDF could not be read: {error}"
    elif end == "chars":
        note = f"Text cut at {limits.max_chars} characters, after page {len(pages)}{of}"
    elif end == "pages":
        note = f"Only the first {limits.max_pages}{of} pages were extracted (the limit)"
    elif end is None:
        note = f"The PDF could not be read: the text extractor failed ({run.proc.status_line()})"
    text = "\n\n".join(f"--- page {i + 1} ---\n{t.strip()}" for i, t in enumerate(pages))
    if not text.strip() and note is None:
        return "[The PDF contains no extractable text]"
    return f"{text}\n\n[{note}]".strip() if note else text


def _limit_reached(run: sandbox.RunResult, limits: PdfLimits) -> str | None:
    result = run.proc
    if result.timed_out:
        return f"it takes longer than the time limit ({limits.timeout_s:g} s)"
    if result.returncode == -signal.SIGXCPU:
        return f"it needs more than the CPU time limit ({limits.cpu_s} s)"
    if run.oom_kills or "MemoryError" in result.output[-2000:]:
        return f"it needs more than the memory limit ({limits.memory_mb} MB)"
    if result.returncode not in (0, None):
        return f"the text extractor was stopped ({result.status_line()})"
    return None


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


def _is_pdf(f: FileRecord) -> bool:
    return f.mime_type == "application/pdf" or f.data[:5] == b"%PDF-"


def _extract_one(f: FileRecord) -> None:
    if f.mime_type in IMAGE_TYPES:
        f.text = None
    elif _is_text(f.filename, f.mime_type, f.data):
        f.text = f.data.decode("utf-8", errors="replace")


async def extract(files: list[FileRecord], pdf_limits: PdfLimits = PDF_LIMITS) -> None:
    """Fill in `text` for every file. PDFs are parsed in a limited child process (see the
    module's docstring); cancelling the caller kills it."""
    for f in files:
        if _is_pdf(f):
            f.text = await pdf_text(f.data, pdf_limits)
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
