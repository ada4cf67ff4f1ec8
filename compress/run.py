"""Run a recipe: ``accelerate launch compress/run.py RECIPE.yaml [key=value ...]``.

Validates the whole recipe and its inputs before any work, runs it, writes one JSON record and prints that
record's path as the last line. A problem with the recipe or its inputs is one line on stderr and exit code 2.
"""
import logging
import os
import sys

os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')  # NNCF's first-use build takes >60 s on 2 cores
# torch's CUDA build warns on every CPU-only import that it found no CUDA runtime: noise before our one line
logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv else 2
    from compress.config import RecipeError, check_inputs, load_recipe
    try:
        cfg = load_recipe(argv[0], argv[1:])
        check_inputs(cfg)
    except RecipeError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from compress.pipeline import run_recipe
    from compress.record import write_record
    accelerator = Accelerator()
    set_seed(cfg.seed)
    try:
        record = run_recipe(cfg, accelerator, recipe_path=argv[0])
    except RecipeError as error:
        print(f'error: {_message(error)}', file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        path = write_record(record, cfg.output.dir)
        print(path)
    accelerator.end_training()
    return 0


def check(recipe: str, overrides: list[str]) -> str | None:
    """The one-line problem with a recipe and its inputs, or None when it can run (the ``compress`` command)."""
    from compress.config import RecipeError, check_inputs, load_recipe
    try:
        check_inputs(load_recipe(recipe, overrides))
    except RecipeError as error:
        return str(error)
    return None


def _message(error: Exception) -> str:
    # a loader worker's error comes back wrapped ("Caught X in DataLoader worker 0. Original Traceback ..."):
    # its last line holds the message
    text = str(error)
    if 'Original Traceback' in text:
        text = text.strip().splitlines()[-1].split(': ', 1)[-1]
    return text


if __name__ == '__main__':
    sys.exit(main())
