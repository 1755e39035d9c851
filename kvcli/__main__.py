"""`kvcli` and `python -m kvcli`: the command line, with Ctrl-C handled from the first instruction.

Ctrl-C while kvcli starts (its imports, which take seconds once a command imports torch and
transformers) is one line and exit 130, as it is once a command runs (`cli.output.user_errors`).
"""

import signal
import sys

EXIT_INTERRUPTED = 130  # cli.output's, not imported: Ctrl-C may come before it is


def main() -> None:
    received = []

    def on_interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt  # as Python's own handler does

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        from .cli import main as run

        run()
    except KeyboardInterrupt:
        _interrupted()
    except (ImportError, RecursionError):
        # transformers' lazy modules turn a KeyboardInterrupt inside their imports into these
        if not received:
            raise
        _interrupted()


def _interrupted() -> None:
    sys.stdout.flush()
    sys.stderr.write("\nkvcli: interrupted\n")
    sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
