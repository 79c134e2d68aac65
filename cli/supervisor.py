"""Keep a local stack serving while its workers come and go: `tandem up`'s supervisor.

A worker (prefill or decode) that exits is started again on the port it first bound, after a back-off,
while every other process keeps serving; the gateway polls each worker's Status and takes a worker
back at its next good poll. The gateway exiting is fatal (nothing can route), and so is a worker that
fails to start `max_restarts` times in a row.

    worker:  UP --exits--> WAITING --back-off over--> STARTING --ready file--> UP
                                ^                          |
                                +--exits / not ready-------+  (a failed start; the max_restarts-th is fatal)

Back-off: `backoff_s` after the first exit, doubling with each exit after it up to `max_backoff_s`;
back to `backoff_s` once a worker has stayed up `reset_after_s`.

`poll()` never blocks, and must be called from the thread that started the stack: the children die
with the thread that forked them (PR_SET_PDEATHSIG), so relaunches must come from that same thread.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from cli.launcher import Child, Stack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0
    max_restarts: int = 5  # failed starts in a row before giving up; 0: a worker exiting is fatal
    ready_timeout_s: float = 300.0  # a restart not ready by then is killed and counts as failed

    def __post_init__(self) -> None:
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"need 0 <= restart back-off ({self.backoff_s}) <= max back-off ({self.max_backoff_s})")
        if self.reset_after_s < 0 or self.max_restarts < 0 or self.ready_timeout_s <= 0:
            raise ValueError("reset-after and max-restarts must be >= 0 and the ready timeout > 0")

    def delay_s(self, exits: int) -> float:
        """The wait before restarting a worker that has exited `exits` (>= 1) times since it last stayed up."""
        return min(self.backoff_s * 2.0 ** min(exits - 1, 60), self.max_backoff_s)


class _State(enum.Enum):
    UP = "up"
    WAITING = "waiting"  # exited; restarts at `due`
    STARTING = "starting"  # relaunched at `since`; not ready yet


@dataclass(eq=False)
class _Watch:
    child: Child
    state: _State
    since: float  # when it became ready (UP) or was relaunched (STARTING)
    due: float = 0.0  # WAITING: when to relaunch
    exits: int = 0  # exits since it last stayed up reset_after_s: the back-off level
    failed_starts: int = 0  # relaunches in a row that never became ready


class Supervisor:
    """Watches a started `Stack`'s processes; restarts its workers under a `RestartPolicy`."""

    def __init__(self, stack: Stack, policy: RestartPolicy) -> None:
        now = time.monotonic()
        self.stack = stack
        self.policy = policy
        self._watches = [_Watch(c, _State.UP, now) for c in stack.workers]

    def poll(self) -> str | None:
        """Notice exits, relaunch workers whose back-off is over, notice those that are back.
        Returns None while the stack can serve; otherwise why not (the caller stops the stack)."""
        gateway = self.stack.gateway
        if gateway is not None and gateway.exit_code is not None:
            return (f"the gateway exited with code {gateway.exit_code} (log: {gateway.log_path}); "
                    "nothing can route without it")
        now = time.monotonic()
        for w in self._watches:
            reason = self._step(w, now)
            if reason is not None:
                return reason
        return None

    def _step(self, w: _Watch, now: float) -> str | None:
        c = w.child
        if w.state is _State.UP and c.exit_code is not None:
            logger.warning("%s (pid %s) exited with code %s; log: %s", c.name, c.pid, c.exit_code, c.log_path)
            if now - w.since >= self.policy.reset_after_s:
                w.exits = 0
            if self.policy.max_restarts == 0:
                return f"{c.name} exited with code {c.exit_code} and restarts are off (log: {c.log_path})"
            self._wait(w, now)
        elif w.state is _State.WAITING and now >= w.due:
            logger.info("restarting %s on %s (attempt %d)", c.name, c.info["address"], w.failed_starts + 1)
            self.stack.relaunch(c)
            w.state, w.since = _State.STARTING, now
        elif w.state is _State.STARTING:
            if c.ready():
                logger.info("%s is back on %s (pid %s)", c.name, c.info["address"], c.pid)
                w.state, w.since, w.failed_starts = _State.UP, now, 0
            elif c.exit_code is not None or now - w.since > self.policy.ready_timeout_s:
                why = (f"exited with code {c.exit_code}" if c.exit_code is not None
                       else f"was not ready after {self.policy.ready_timeout_s:.0f} s")
                c.kill()
                w.failed_starts += 1
                logger.warning("%s failed to start (%d in a row): it %s; log: %s", c.name, w.failed_starts, why,
                               c.log_path)
                if w.failed_starts >= self.policy.max_restarts:
                    return (f"{c.name} could not be restarted: {w.failed_starts} failed starts in a row, the last "
                            f"{why} (log: {c.log_path})")
                self._wait(w, now)
        return None

    def _wait(self, w: _Watch, now: float) -> None:
        w.exits += 1
        delay = self.policy.delay_s(w.exits)
        w.state, w.due = _State.WAITING, now + delay
        logger.info("%s restarts on %s in %.1f s", w.child.name, w.child.info["address"], delay)
