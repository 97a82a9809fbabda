"""Stopping with one line: the errors a command line turns into `error: <message>` and exit 2.

    StopRun          the base: the run cannot go on, and one line says why
    InputError       bad input from the user: a file or an argument, named in the message
    TrainingFailed   training cannot go on: the loss is not finite, the classifier has died

`run_cli` is every script's entry: it runs `main(args)` and turns a StopRun into that line (with
--debug the traceback is kept).
"""
import logging
import sys


class StopRun(Exception):
    """The run stops; the message is one line that names the file, flag or step and the problem."""


class InputError(StopRun):
    """Bad input from the user: a file or an argument."""


class TrainingFailed(StopRun):
    """Training cannot go on (a non-finite loss, a dead classifier); the message says what to change."""


def run_cli(main, args):
    """Run `main(args)`; turn a StopRun into one line on stderr and exit status 2."""
    try:
        return main(args)
    except StopRun as e:
        if getattr(args, 'debug', False):
            raise
        logging.shutdown()  # what the run logged reaches its file before the exit
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)


def one_line(error):
    """The message of a StopRun. One raised in a DataLoader worker comes back as a new exception
    of its class ('Caught InputError in DataLoader worker process N. Original Traceback ...'):
    its last line, '<module>.InputError: <message>', holds the worker's message."""
    message = str(error)
    if message.startswith('Caught ') and '\nOriginal Traceback' in message:
        message = message.rstrip().splitlines()[-1].split(': ', 1)[-1]
    return message
