"""The run record: one JSON file per run, the source of every table.

Written atomically (temporary file, then rename) under ``<output.dir>/<recipe name>/``, with a name made of the
UTC time and the git hash; an existing file is never overwritten.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
import time
from pathlib import Path

import torch

__all__ = ['environment', 'git_hash', 'write_record']

_PACKAGES = ('torch', 'torchvision', 'timm', 'torchao', 'torch-pruning', 'nncf', 'openvino', 'accelerate',
             'datasets', 'numpy')
_CPU_FLAGS_OF_INTEREST = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_int8', 'amx_bf16', 'avx_vnni')


def git_hash() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ('-dirty' if dirty else '') if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info() -> dict:
    """This machine's CPU: model name, the flags that decide int8 / bf16 speed, logical CPU count."""
    info = {'model': platform.processor() or platform.machine(), 'flags': [], 'logical_cpus': os.cpu_count()}
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith('model name') and info['model'] in ('', platform.machine(), platform.processor()):
            info['model'] = line.split(':', 1)[1].strip()
        if line.startswith('flags'):
            flags = set(line.split(':', 1)[1].split())
            info['flags'] = [f for f in _CPU_FLAGS_OF_INTEREST if f in flags]
            break
    return info


VNNI_ISAS = ('amx', 'avx512_vnni', 'avx_vnni')


def cpu_isa(env: dict | None = None) -> str:
    """The instruction set that decides int8 speed and rounding on a record's CPU (``env``), or on this one."""
    env = {'cpu': cpu_info()} if env is None else env
    flags = set(env.get('cpu', {}).get('flags', []))
    if env.get('cuda'):
        return 'cuda'
    for isa, needs in (('amx', 'amx_int8'), ('avx512_vnni', 'avx512_vnni'), ('avx_vnni', 'avx_vnni'),
                       ('avx512', 'avx512f'), ('avx2', 'avx2')):
        if needs in flags:
            return isa
    return 'other'


def environment() -> dict:
    """Library versions, CPU, threads, load and devices, as they were for this run."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        'python': platform.python_version(),
        'platform': platform.platform(),
        'versions': versions,
        'cpu': cpu_info(),
        'torch_threads_default': torch.get_num_threads(),
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
        'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_record(record: dict, output_dir: str | os.PathLike) -> Path:
    """Write a record as ``<output_dir>/<recipe>/<UTC time>-<git hash>.json`` atomically, never overwriting."""
    folder = Path(output_dir) / record['recipe']['name']
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    base = f"{stamp}-{record.get('git_hash') or 'nogit'}"
    text = json.dumps(record, indent=1, sort_keys=False, default=str)
    for stale in folder.glob('.record-*.tmp'):  # left by a writer killed between its write and its link
        if time.time() - stale.stat().st_mtime > 600:  # (a write takes milliseconds: a younger one is in flight)
            stale.unlink(missing_ok=True)
    temporary = folder / f'.record-{os.getpid()}-{secrets.token_hex(4)}.tmp'
    # os.open with 0o666 keeps the user's umask (tempfile's files are private, 0600, unlike every other output)
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), 'w') as handle:
        handle.write(text)
    for attempt in range(1000):
        target = folder / (f'{base}.json' if attempt == 0 else f'{base}-{attempt}.json')
        try:
            os.link(temporary, target)  # fails if the target exists: an earlier run is never overwritten
        except FileExistsError:
            continue
        temporary.unlink()
        return target
    temporary.unlink()
    raise FileExistsError(f'could not find a free record name in {folder}')
