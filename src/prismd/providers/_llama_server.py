"""The runtime of the `local` provider: llama.cpp's HTTP server (embedded in `xllamacpp`) serving
one GGUF model on 127.0.0.1, run by prismd as a child process:

    python -m prismd.providers._llama_server --model M.gguf --port P --parent-pid PID [...]

It prints READY_MARKER once the model is loaded and the server answers, then serves until
SIGTERM. It dies with the prismd that started it (PR_SET_PDEATHSIG), so no runtime outlives a
`kill -9` of the server. It imports nothing else of prismd: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

READY_MARKER = "prismd-llama-server-ready"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux).

    Set here, after exec, rather than in a `preexec_fn` (which is not safe in a process with
    threads, as prismd is). The parent may have died before this call: then exit at once.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:  # not Linux: prismd stops the runtime itself on a clean exit
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        sys.exit("prismd exited before its llama.cpp runtime started")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--alias", required=True, help="the model id the server reports")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--context", type=int, default=8192, help="KV cache size in tokens")
    parser.add_argument("--parallel", type=int, default=4, help="streams decoded at once")
    parser.add_argument("--threads", type=int, default=0, help="0: llama.cpp's default")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.context
    params.n_parallel = args.parallel
    # One cache shared by every stream, each of which may use all of it (what llama-server
    # does with `--parallel auto`): a single long conversation is not cut to n_ctx/parallel.
    params.kv_unified = True
    if args.threads:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    params.endpoint_props = True  # prismd reads the chat template's capabilities there
    params.ui = False
    params.verbosity = 1  # warnings and errors: prismd keeps the last lines for its messages
    try:
        server = xllamacpp.Server(params)  # returns once the model is loaded and serving
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
        print(f"error: cannot load {args.model}: {exc}", file=sys.stderr, flush=True)
        return 1

    # llama.cpp installed its own SIGTERM handler (a graceful drain); prismd wants a prompt
    # exit, and there is nothing to save.
    def leave(signum: int, frame: object) -> None:
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    print(f"{READY_MARKER} {server.listening_address}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
