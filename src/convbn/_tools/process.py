"""Work in a fresh Python process: :class:`Worker`, and :func:`run_isolated` for one call.

A worker is ``python -m convbn._tools.process``: it reads requests, one JSON object per
line on stdin, ``{"target": "package.module:function", "kwargs": {...}}``, calls the
function and answers each with one JSON line, ``{"value": ...}``, on the reply channel
(the original stdout; anything else the process prints, Python or C, goes to stderr).
A function that raises is answered ``{"error": "Type: message"}`` (traceback on stderr)
and the process ends. The functions keep whatever state they need between calls in their
own module: one process serves one job.

Why a process: its peak memory is its own, it starts with nothing left over from an
earlier model, and a crash or an out-of-memory kill is a failed result, not the end of
the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from convbn._tools.output import describe_error

__all__ = ["WorkerFailed", "Worker", "run_isolated", "call_forked", "call_target"]

# The folder that holds this very convbn package: the worker imports it, installed or not.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class WorkerFailed(RuntimeError):
    """The worker's function raised, the process died, or it did not answer in time."""


def call_target(target: str, kwargs: dict[str, Any]) -> Any:
    """``package.module:function`` imported and called with ``kwargs``."""
    module_name, _, name = target.partition(":")
    return getattr(importlib.import_module(module_name), name)(**kwargs)


class Worker:
    """One worker process and its request channel.

    ``threads``: torch's thread count in the worker. ``log``: a file for the worker's
    stderr (read back by :meth:`log_text` and quoted when it crashes); None leaves it on
    this process's stderr. ``timeout``: seconds to wait for one answer (None: no limit).
    """

    def __init__(
        self, *, threads: int | None = None, log: Path | None = None, timeout: float | None = None
    ):
        self.log = log
        self.timeout = timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        command = [sys.executable, "-m", "convbn._tools.process"]
        if threads:
            command += ["--threads", str(threads)]
        self._log_file = open(log, "w") if log is not None else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            text=True,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.alive = True

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def send(self, target: str, **kwargs: Any) -> None:
        """Ask for ``target(**kwargs)`` without waiting for the answer (see :meth:`receive`)."""
        if not self.alive:
            raise WorkerFailed("worker no longer running")
        try:
            self.proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the pipe broke: the process is gone; receive() says how
            pass

    def receive(self) -> Any:
        """The answer to the oldest request not yet answered; :class:`WorkerFailed` when the
        function raised, the process died or the answer took longer than ``timeout``."""
        if not self.alive:
            raise WorkerFailed("worker no longer running")
        try:
            line = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise WorkerFailed(f"worker did not answer within {self.timeout:.0f} s") from None
        if line is None:
            status = self.proc.wait()
            self.close()
            tail = " | ".join(self.log_text().strip().splitlines()[-3:])[-300:]
            raise WorkerFailed(
                f"worker crashed (exit status {status})" + (f": {tail}" if tail else "")
            )
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise WorkerFailed(answer["error"])
        return answer["value"]

    def call(self, target: str, **kwargs: Any) -> Any:
        """``target(**kwargs)`` in the worker; its JSON answer."""
        self.send(target, **kwargs)
        return self.receive()

    def log_text(self) -> str:
        """What the worker wrote to stderr ('' when it was not sent to a file)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        """End the worker: end of input, then a kill if it has not exited within a minute."""
        if not self.alive:
            return
        self.alive = False
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_isolated(
    target: str, kwargs: dict[str, Any], *, isolate: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """``target`` ("package.module:function", returning a JSON-able dict) called with
    ``kwargs``, and the peak resident memory of the process that ran it added as
    ``peak_rss_bytes``.

    With ``isolate`` it runs in a fresh :class:`Worker` (its stderr on this one's), so the
    peak is that run's own; :class:`WorkerFailed` when it fails. Without, it runs here and
    the peak is this process's so far (only meaningful for the first run).
    """
    from convbn._tools.measure import peak_rss_bytes

    if not isolate:
        result = call_target(target, kwargs)
        result["peak_rss_bytes"] = peak_rss_bytes()
        return result
    with Worker(threads=threads) as worker:
        result = worker.call(target, **kwargs)
        result["peak_rss_bytes"] = worker.call("convbn._tools.measure:peak_rss_bytes")
    return result


def call_forked(
    target: str, kwargs: dict[str, Any], *, timeout: float | None = None
) -> tuple[Any, int]:
    """``target(**kwargs)`` in a child forked from this process, and the child's peak
    resident memory in bytes: a fresh process per call that starts with what this one has
    imported (a sweep of hundreds of models saves the interpreter's start and torch's
    import, about five seconds each). Only for a caller that has run no parallel kernel
    yet (a forked child cannot use a thread pool its parent started): the timm sweep,
    which has only built models on the meta device. Unix only.

    :class:`WorkerFailed` when the function raised, the child died (a kill for memory
    reads ``exit status -9``) or it did not answer within ``timeout`` seconds.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 0
        try:
            os.dup2(2, 1)  # what the function prints goes to stderr, as in a Worker
            sys.stdout = sys.stderr
            answer: dict[str, Any] = {"value": call_target(target, kwargs)}
        except BaseException as error:  # noqa: BLE001 (everything is the parent's answer)
            traceback.print_exc()
            answer, code = {"error": describe_error(error)}, 1
        try:
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(answer))
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: list[bytes] = []
    timed_out = False
    with os.fdopen(read_end, "rb") as answers:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([answers], [], [], wait)
            if not ready:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(answers.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status, usage = os.wait4(pid, 0)
    if timed_out:
        raise WorkerFailed(f"worker did not answer within {timeout:.0f} s")
    if not chunks:
        code = os.waitstatus_to_exitcode(status)
        raise WorkerFailed(f"worker crashed (exit status {code})")
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:  # the child died while writing its answer
        code = os.waitstatus_to_exitcode(status)
        raise WorkerFailed(f"worker crashed (exit status {code})") from None
    if "error" in answer:
        raise WorkerFailed(answer["error"])
    return answer["value"], usage.ru_maxrss * 1024


# --------------------------------------------------------------------------- the worker side


def serve(requests: TextIO, replies: TextIO) -> int:
    """Answer ``requests`` until their end (0) or a function raises (1)."""

    def reply(answer: dict[str, Any]) -> None:
        replies.write(json.dumps(answer) + "\n")
        replies.flush()

    for line in requests:
        request = json.loads(line)
        try:
            value = call_target(request["target"], request.get("kwargs", {}))
        except Exception as error:
            traceback.print_exc()
            reply({"error": describe_error(error)})
            return 1
        reply({"value": value})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--threads"] and len(argv) == 2:
        import torch

        torch.set_num_threads(int(argv[1]))
    elif argv:
        print("usage: python -m convbn._tools.process [--threads N]", file=sys.stderr)
        return 2
    # Replies on the original stdout; whatever the functions or a library print (Python or
    # C level) goes to stderr instead, so it cannot be mistaken for a reply.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(sys.stdin, replies)


if __name__ == "__main__":
    sys.exit(main())
