"""The built-in tools: files in the workspace, shell, code_exec, web_fetch, memory, current_time."""

from __future__ import annotations

from ..base import Tool
from .clock import CurrentTime
from .code_exec import CodeExec
from .files import FileEdit, FileList, FileRead, FileSearch, FileWrite
from .memory import MemoryNote, MemorySearch
from .sandbox import isolation
from .shell import Shell
from .web_fetch import WebFetch, check_address

__all__ = [
    "CodeExec",
    "CurrentTime",
    "FileEdit",
    "FileList",
    "FileRead",
    "FileSearch",
    "FileWrite",
    "MemoryNote",
    "MemorySearch",
    "Shell",
    "WebFetch",
    "builtin_tools",
    "check_address",
    "isolation",
]


def builtin_tools() -> list[Tool]:
    """One instance of each built-in tool."""
    return [
        FileRead(),
        FileWrite(),
        FileEdit(),
        FileList(),
        FileSearch(),
        Shell(),
        CodeExec(),
        WebFetch(),
        MemoryNote(),
        MemorySearch(),
        CurrentTime(),
    ]
