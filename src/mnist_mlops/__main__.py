"""The command line: `python -m mnist_mlops STAGE` (or `mnist-mlops STAGE`).

Each DVC stage runs one of these. The config is read from params.yaml and
validated before any stage code (and TensorFlow) loads.
"""

import argparse
import importlib
import sys
from pathlib import Path

from mnist_mlops.config import ConfigError, load_params
from mnist_mlops.paths import PARAMS_FILE

STAGES = {
    "fetch": "download MNIST into data/raw and verify it",
    "preprocess": "validate data/raw and split it into data/processed",
    "train": "train the model and log the run to MLflow",
    "evaluate": "score the model on the test set and log it to the same run",
}


def run_stage(stage: str, params_file: Path) -> None:
    config = load_params(params_file)
    module = importlib.import_module(f"mnist_mlops.{stage}")
    if stage == "fetch":
        module.fetch(config.data)
    else:
        getattr(module, stage)(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-mlops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, help_text in STAGES.items():
        command = commands.add_parser(stage, help=help_text, description=help_text)
        command.add_argument(
            "--params",
            type=Path,
            default=PARAMS_FILE,
            help="composed config (default: %(default)s)",
        )
    arguments = parser.parse_args(argv)

    # Errors a user can fix get one line; anything else keeps its traceback.
    from mnist_mlops.fetch import FetchError
    from mnist_mlops.preprocess import DataError

    try:
        run_stage(arguments.command, arguments.params)
    except ConfigError as error:
        print(f"mnist-mlops {arguments.command}: invalid config: {error}", file=sys.stderr)
        return 2
    except (FetchError, DataError, FileNotFoundError) as error:
        print(f"mnist-mlops {arguments.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"mnist-mlops {arguments.command}: interrupted {interruption}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
