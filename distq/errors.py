"""The one exception type users see as a clean, single-line error."""

_WORKER_MARKER = "Original Traceback"


class DistqError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The CLI prints ``distq: error: <message>`` and exits non-zero without a traceback.
    When the error is raised inside a DataLoader worker, PyTorch re-raises it in the
    main process with the worker's traceback pasted into the message; we keep only
    the original message so the user still sees one line.
    """

    def __init__(self, message: str):
        if _WORKER_MARKER in message:
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class SaidByRankZero(DistqError):
    """An error every rank of the job stops with, that rank 0 reports: the CLI prints it there
    only, and exits with ``exit_code`` like rank 0."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
