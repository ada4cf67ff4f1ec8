"""The ``compress`` command: validate a recipe first, then launch it through Accelerate.

    compress RECIPE.yaml [key=value ...] [--launch "ACCELERATE LAUNCH OPTIONS"]

Under ``accelerate launch`` a bad recipe prints our one line and then the launcher's own traceback of the failed
child; here the recipe and its inputs are checked in this process first (one line, exit code 2), and only a
valid recipe starts ``accelerate launch compress/run.py ...`` (as torchtune's ``tune run`` wraps torchrun), with
the launcher options given, e.g. ``--launch "--multi_gpu --num_processes 8"``. The exit code is the run's.
``accelerate launch compress/run.py RECIPE.yaml`` stays the documented headline and works as before.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launch: list[str] = []
    if '--launch' in argv:
        at = argv.index('--launch')
        if at + 1 >= len(argv):
            print('error: --launch: give the accelerate launch options as one string, e.g. --launch '
                  '"--num_processes 2"', file=sys.stderr)
            return 2
        launch = shlex.split(argv[at + 1])
        del argv[at:at + 2]
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv else 2
    from compress.run import check
    error = check(argv[0], argv[1:])
    if error is not None:
        print(f'error: {error}', file=sys.stderr)
        return 2
    run_py = Path(__file__).resolve().parent / 'run.py'
    command = [sys.executable, '-m', 'accelerate.commands.launch', *launch, str(run_py), *argv]
    return subprocess.run(command, stdin=subprocess.DEVNULL).returncode


if __name__ == '__main__':
    sys.exit(main())
