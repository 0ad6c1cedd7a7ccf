"""Naming a rank that died: under torchrun, whatever ends a rank (its own error, SIGKILL, the
out-of-memory killer, a crash), the job ends with one line naming it and the checkpoint to resume from.

A rank killed by a signal cannot say so, and the others see only a broken connection (gloo) or nothing
at all (NCCL, until torchrun stops them with SIGTERM). So every rank keeps a listening socket open for
the whole run (it accepts connections while the process lives) and tells every other rank how it ends
when it ends on purpose: ``failed`` (it printed its own error), ``ending`` (it stops because of another
rank), ``stopped`` (SIGTERM or Ctrl-C), ``done``. When a rank's training fails, or SIGTERM arrives, it
asks every other rank: one whose socket refuses the connection and that never said how it ended has
died. The lowest rank still alive prints the line; the others print nothing more. Only the address
exchange at the start is a collective: the rest is plain TCP, so it works with the process group broken.
"""

import os
import secrets
import signal
import socket
import sys
import threading

import torch.distributed as dist

from . import checkpoints

PROBE_SECONDS = 2.0    # connecting to a live rank takes milliseconds (the kernel accepts for it)
GRACE_SECONDS = 10.0   # after SIGTERM: time the training thread gets to stop at a safe point and report


class RankStopped(RuntimeError):
    """SIGTERM (torchrun stopping the job) reached this rank; raised at the next safe point."""


def is_communication_error(error):
    """A collective that failed because another process went away (its cause is reported elsewhere)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "nccl", "connection closed",
                                                                           "connection reset"))


def _local_address():
    """The address this host uses to reach the rendezvous host (MASTER_ADDR), where the other ranks look."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    family, _, _, _, target = socket.getaddrinfo(master, int(os.environ.get("MASTER_PORT", "29500")),
                                                 type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)  # UDP: no packet is sent, the kernel only picks the route
        return family, probe.getsockname()[0]


def _rank_list(ranks):
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


class RankWatch:
    """One per rank, from ``start`` (after the process group exists) to the end of the run."""

    def __init__(self, group, run_dir):
        self.rank, self.world, self.run_dir = group.rank, group.world, run_dir
        self.ended = {}                        # rank -> how it said it ended
        self.stop_requested = threading.Event()
        self._reported = threading.Event()
        self._lock = threading.Lock()
        self._listener, self.peers, self._token = None, {}, ""

    def start(self):
        family, address = _local_address()
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((address, 0))
        self._listener.listen(64)
        table = [None] * self.world
        dist.all_gather_object(table, (address, self._listener.getsockname()[1], secrets.token_hex(8)))
        self._token = table[0][2]  # rank 0's: messages of other jobs on the same host are ignored
        self.peers = {r: (host, port) for r, (host, port, _) in enumerate(table) if r != self.rank}
        threading.Thread(target=self._serve, name="eligen-rank-watch", daemon=True).start()
        self._watch_signals()
        return self

    # -- what the other ranks say ----------------------------------------------------------------
    def _serve(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                try:
                    connection.settimeout(PROBE_SECONDS)
                    words = connection.recv(256).decode(errors="replace").split()
                    if len(words) == 4 and words[0] == "eligen" and words[1] == self._token:
                        self.ended[int(words[2])] = words[3]
                        connection.sendall(b"ok\n")
                except (OSError, ValueError):
                    pass  # a probe (connect and close) or a stray connection

    def _tell(self, peer, how):
        """Say how this rank ends; False when the peer's socket refuses (it is gone)."""
        try:
            with socket.create_connection(self.peers[peer], timeout=PROBE_SECONDS) as connection:
                connection.sendall(f"eligen {self._token} {self.rank} {how}\n".encode())
                connection.recv(16)  # the peer recorded it
            return True
        except OSError:
            return False

    def _alive(self, peer):
        try:
            socket.create_connection(self.peers[peer], timeout=PROBE_SECONDS).close()
            return True
        except OSError:
            return False

    def dead_ranks(self):
        """Ranks that are gone without having said how they ended."""
        gone = [peer for peer in self.peers if peer not in self.ended and not self._alive(peer)]
        return {peer for peer in gone if peer not in self.ended}

    # -- how this rank ends ----------------------------------------------------------------------
    def check_stop(self):
        """The training loop's safe point (before each micro-batch): stop there after SIGTERM."""
        if self.stop_requested.is_set():
            raise RankStopped("stopped by SIGTERM")

    def finished(self):
        for peer in self.peers:
            self._tell(peer, "done")

    def report(self, error):
        """Print what ended the run, once per rank (whichever thread notices first). Returns True when
        ``error`` is this rank's own (its line printed; the caller keeps the traceback)."""
        with self._lock:
            if self._reported.is_set():
                return False
            dead = self.dead_ranks()
            alive = sorted(set(range(self.world)) - dead)
            stopped = isinstance(error, (RankStopped, KeyboardInterrupt))
            explained = any(how == "failed" for how in self.ended.values())
            line, how, own = None, "ending", False
            if dead:
                if self.rank == alive[0]:
                    line = (f"EliGen training failed: {_rank_list(dead)} of {self.world} died (ended without "
                            f"reporting an error: killed, for example by SIGKILL or the out-of-memory killer, or "
                            f"crashed); {self._resume()}")
            elif stopped:
                how = "stopped"
                if not explained and self.rank == alive[0]:
                    line = (f"EliGen training stopped: SIGTERM or Ctrl-C reached rank {self.rank} of {self.world} "
                            f"(torchrun stops every rank when it is interrupted); {self._resume()}")
            elif not (explained and is_communication_error(error)):
                line, how, own = f"EliGen training failed: rank {self.rank} of {self.world}: " \
                                 f"{type(error).__name__}: {error}", "failed", True
            if line:
                print(line, file=sys.stderr, flush=True)
            for peer in self.peers:
                if peer not in dead:
                    self._tell(peer, how)
            self._reported.set()
            return own

    def _resume(self):
        latest = checkpoints.latest_checkpoint(self.run_dir) if self.run_dir else None
        if latest is None:
            return "no checkpoint was written yet: start the run again"
        return f"resume with --resume latest from {latest}"

    # -- SIGTERM -----------------------------------------------------------------------------------
    def _watch_signals(self):
        """torchrun stops the other ranks with SIGTERM when one dies. Its default action would end this
        process before it could say anything, so: the training thread stops at its next safe point
        (``check_stop``) and reports; a thread woken by the signal itself reports instead when the
        training thread is stuck in a collective that never returns (NCCL), then ends the process."""
        receive, send = socket.socketpair()
        send.setblocking(False)
        signal.signal(signal.SIGTERM, lambda number, frame: self.stop_requested.set())
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        self._wakeup = (receive, send)

        def watch():
            while True:
                number = receive.recv(1)
                if not number:
                    return
                if number[0] != signal.SIGTERM:
                    continue
                if self._reported.wait(GRACE_SECONDS):
                    return  # the training thread reported and is ending the process
                self.report(RankStopped("stopped by SIGTERM"))
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)

        threading.Thread(target=watch, name="eligen-rank-signals", daemon=True).start()
