"""The `cnnops` command, also `python -m cnnops`.

A finished command leaves at once. Python's own teardown of torch, Lightning and MLflow, which
frees their modules object by object, costs one to two seconds that buy the user nothing. All
that matters at exit still happens first: Python joins the command's threads and runs every
exit handler registered after ours (MLflow's async logging, multiprocessing's children,
temporary folders, phase timings). Then `_leave` flushes logging and the standard streams and
ends the process with the command's exit status.
"""

from __future__ import annotations

import atexit

_status = 0


def main() -> None:
    global _status
    atexit.register(_leave)  # registered before the command imports anything: it runs last
    from cnnops.cli import app

    try:
        app(prog_name="cnnops")
    except SystemExit as e:
        _status = _exit_status(e.code)
        raise
    except KeyboardInterrupt:
        _status = 130
        raise
    except BaseException:
        _status = 1
        raise


def _exit_status(code: object) -> int:
    """The status Python gives `sys.exit(code)`: None is 0, an int itself, anything else 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _leave() -> None:
    from cnnops.runs import exit_now  # flushes logging too: its handler may precede ours

    exit_now(_status)


if __name__ == "__main__":
    main()
