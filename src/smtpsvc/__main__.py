"""`python -m smtpsvc` runs the command line, except an SMTP worker's start.

The main process starts each SMTP worker as `python -m smtpsvc serve --worker-fd N ...`
(`workers.worker_command`). That one goes to `workers.worker_main` before `cli` is imported: the command
line's imports (click, the admin and delivery stacks) would cost every worker's start about 0.3 s of CPU,
and the main process starts one per core at each start of the service.
"""

import sys

if sys.argv[1:2] == ["serve"] and any(a.partition("=")[0] == "--worker-fd" for a in sys.argv[2:]):
    import signal

    # As `cli.py`'s first lines do for `serve`: SIGHUP stays blocked until the worker's handler is in place,
    # so that a reload passed on while it starts is delivered then instead of ending it.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

    from smtpsvc.workers import worker_main

    sys.exit(worker_main(sys.argv[2:]))

from smtpsvc.cli import main

main()
