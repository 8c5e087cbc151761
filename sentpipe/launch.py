"""The `sentpipe` console script: the CLI is imported under the same Ctrl-C rule as it runs.

Importing it (aiohttp, confluent-kafka, rich) takes about half a second, and a Ctrl-C in that time ended in
a KeyboardInterrupt traceback; everywhere later it is the line "interrupted" and status 130.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from sentpipe.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli_main()
