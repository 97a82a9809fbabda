"""What a run says on the terminal: the `tool` loggers, to standard output as plain lines, from
the main process only (under torchrun the other ranks stay quiet).

    from tool.core.log import log
    log.info('wrote %d pseudo-masks', n)           # rank 0 prints it, the others do not

Metrics go to files (tool.core.runtime.MetricsLog); this is the human-readable side. Warnings
keep their 'warning: ' prefix in the message itself, so the terminal reads as before.
"""
import logging
import sys

from tool.core.distributed import is_main_process


class MainProcessOnly(logging.Filter):
    def filter(self, record):
        return is_main_process()


class CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever sys.stdout is when a record is emitted (a test's capture, a
    redirected stream), not the stream of the moment it was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


log = logging.getLogger('tool')
if not log.handlers:
    _handler = CurrentStdout()
    _handler.setFormatter(logging.Formatter('%(message)s'))
    _handler.addFilter(MainProcessOnly())
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
