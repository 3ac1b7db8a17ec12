"""SIGTERM / SIGINT: save at the next step boundary and stop (every process alike)."""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("jaxmedclip.train")


class PreemptionWatch:
    """SIGTERM / SIGINT ask the loop to save and stop at the next step boundary.

    With several processes the request is agreed on at logging steps (every process stops
    at the same step); a single process stops at the next step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.info("received signal %d", signum)
        self.requested = True

    def should_stop(self, sync: bool) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
