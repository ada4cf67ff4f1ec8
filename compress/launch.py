"""Run a recipe in a child process, the way its user would: the one place that starts ``compress/run.py``.

The study runs its cells this way and the gate its recipes. Everything the child prints goes to one log file,
headed by the command; the record is the path ``run.py`` prints last. A child that fails leaves its log and the
records of the stages it finished (a run resumes after its last finished stage), never a half-written record.
Stopping the caller (Ctrl-C, SIGTERM turned into an interrupt) stops the child too.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ['Launched', 'launch', 'launch_command', 'RUN_SCRIPT']

RUN_SCRIPT = Path(__file__).resolve().parent / 'run.py'
ROOT = RUN_SCRIPT.parent.parent


@dataclass
class Launched:
    code: int
    log: Path
    record: Path | None

    @property
    def error(self) -> str:
        """The child's own one-line error (``error: ...``, exit code 2), else the last line it printed."""
        lines = [line.strip() for line in self.log.read_text(errors='replace').splitlines()[1:] if line.strip()]
        errors = [line for line in lines if line.startswith('error:')]
        return (errors or lines or ['(no output)'])[-1][:300]


def launch_command(recipe: str, overrides: list[str], accelerate_args: list[str] | None = None) -> list[str]:
    """``python compress/run.py RECIPE key=value ...``; with ``accelerate_args`` (a list, possibly empty) the
    same through ``accelerate launch``."""
    launcher = [sys.executable, str(RUN_SCRIPT)] if accelerate_args is None else \
        [sys.executable, '-m', 'accelerate.commands.launch', *accelerate_args, str(RUN_SCRIPT)]
    return [*launcher, recipe, *overrides]


def launch(recipe: str, overrides: list[str], log: Path, accelerate_args: list[str] | None = None) -> Launched:
    """Run the recipe with its overrides to the end; its output goes to ``log``."""
    command = launch_command(recipe, overrides, accelerate_args)
    # this checkout's code runs, even when another one is installed (a worktree, a CI clone)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open('w') as handle:
        handle.write(f'$ {shlex.join(command)}\n')
        handle.flush()
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env)
        try:
            code = child.wait()
        except BaseException:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    return Launched(code, log, _printed_record(log) if code == 0 else None)


def _printed_record(log: Path) -> Path | None:
    # stderr shares the log, so a warning printed at exit may follow the record's path
    for line in reversed(log.read_text(errors='replace').splitlines()[1:]):
        line = line.strip()
        if line.endswith('.json') and Path(line).is_file():
            return Path(line)
    return None
