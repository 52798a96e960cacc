r"""SIGTERM (preemption) from the first line of a run to its last.

``Preemption`` is installed before anything slow starts (``main`` before
``jax.distributed.initialize``, ``experiment.train`` before models, teachers and data load). During
start-up a SIGTERM raises ``Preempted`` at once: nothing has trained, so nothing is lost, and
``main`` exits with status 75 so that launchers run the command again. Once the loop calls
``start_training`` a SIGTERM only sets ``requested``; the loop finishes the step, saves a
checkpoint of it and returns (``train/loop.py``). Between ``defer`` and ``undefer`` a SIGTERM
is only recorded, and ``undefer`` raises it: code that must not be cut in two (taking the workdir
lock, then entering the block that releases it) runs there.
"""

from __future__ import annotations

import signal


class Preempted(BaseException):
    """A SIGTERM arrived before training started; nothing was trained, run again to resume.

    A BaseException so that no ``except Exception`` in the start-up code swallows it.
    """


class Preemption:
    """The SIGTERM handler of a run, as a context manager (the previous handler comes back on
    exit). ``requested``: a SIGTERM arrived; ``training``: the loop has started."""

    def __init__(self):
        self.requested = False
        self.training = False
        self.deferred = False
        self.previous = None

    def __enter__(self) -> Preemption:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, *_) -> None:
        self.requested = True
        if not (self.training or self.deferred):
            raise Preempted("SIGTERM during start-up: nothing was trained yet.")

    def defer(self) -> None:
        """Until ``undefer``, a SIGTERM during start-up is only recorded."""
        self.deferred = True

    def undefer(self) -> None:
        """Back to raising at once; raises ``Preempted`` for a SIGTERM recorded meanwhile."""
        self.deferred = False
        if self.requested and not self.training:
            raise Preempted("SIGTERM during start-up: nothing was trained yet.")

    def start_training(self) -> None:
        """From now on a SIGTERM lets the current step finish and be checkpointed."""
        self.training = True
