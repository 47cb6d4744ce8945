"""Ctrl-C during Ray Train's ``fit()``: the command ends as any interrupted command does.

Ray Train V2's ``TorchTrainer.fit()`` (the sequence models' and the RQ-VAE's) installs a SIGINT
handler of its own when it runs in the main thread. On Ctrl-C the handler asks the run's controller
to abort, and ``fit()`` then ends in ``SystemExit`` raised from inside ``ray.get`` (exit status 1;
``sys.exit(0)`` from the handler at the third Ctrl-C). So `recsys train` on Ray ended with status 1
and no line at all, instead of ``recsys train: interrupted`` with the resume hint and 130
(2026-12-07, a real Ray run, SIGINT to the driver alone and to its whole process group alike). The
handler also stays installed after ``fit()`` returns, so a Ctrl-C during the test evaluation that
follows would have asked a finished controller to abort.
"""

from __future__ import annotations

import signal
import socket
import threading
from contextlib import contextmanager


def _got_sigint(read: socket.socket) -> bool:
    """Whether SIGINT's number was written to the wakeup socket since it was set."""
    seen = b""
    while True:
        try:
            chunk = read.recv(4096)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        seen += chunk
    return signal.SIGINT in seen


@contextmanager
def ctrl_c_ends_ray_training():
    """Around ``trainer.fit()``: if SIGINT arrived while the block ran, leave it with KeyboardInterrupt
    (from the SystemExit that Ray Train ended ``fit()`` with, or after a ``fit()`` that returned from an
    aborted run); any other SystemExit passes unchanged. The SIGINT handler in force before the block is
    put back after it (unless it was installed outside Python, which ``signal.getsignal`` reports as
    None and no Python call can reinstate: then whatever the block left stays).

    Whether SIGINT arrived is read from Python's wakeup fd: the interpreter writes each signal's number
    to it whatever Python-level handler is installed, so Ray Train replacing the handler inside
    ``fit()`` does not hide the signal. Outside the main thread (no handler or wakeup fd can be set
    there, and Ray Train installs none) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    read, write = socket.socketpair()
    read.setblocking(False)
    write.setblocking(False)
    old_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    try:
        try:
            yield
        except SystemExit as exit_:
            if _got_sigint(read):
                raise KeyboardInterrupt from exit_
            raise
        if _got_sigint(read):
            raise KeyboardInterrupt
    finally:
        signal.set_wakeup_fd(old_fd)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        read.close()
        write.close()
