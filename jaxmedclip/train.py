"""Training entry point: flags -> config -> `jaxmedclip.training.train`.

  python -m jaxmedclip.train --config experiments/tiny_synthetic.py --workdir /tmp/tiny \
      [--config.total_steps=100 --config.optim.learning_rate=3e-4 ...]

The config is checked and the train step traced (`training.build`) before any data is
built; `training.train` completes the setup with the tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxmedclip import checkpointing, config_lib, parallel, training


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """`--config path.py[:arg]`, `--workdir DIR`, and any number of `--config.a.b=value`."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxmedclip.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="experiment file, e.g. experiments/x.py:arg"
    )
    parser.add_argument("--workdir", required=True, help="where logs and checkpoints go")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the train step for the configured mesh, print memory and FLOPs, exit",
    )
    parser.add_argument(
        "--allow_data_position_change",
        action="store_true",
        help="resume a checkpoint written with another seed or global_batch_size (the data "
        "order then differs from an uninterrupted run)",
    )
    cluster = parser.add_argument_group("multi-process (see launch/)")
    cluster.add_argument("--coordinator_address", help="host:port of process 0")
    cluster.add_argument("--num_processes", type=int)
    cluster.add_argument("--process_id", type=int)
    cluster.add_argument(
        "--multihost",
        action="store_true",
        help="discover the cluster automatically (TPU pod slices, SLURM)",
    )
    args, rest = parser.parse_known_args(argv)
    return args, config_lib.override_flags(parser, rest)


def main(argv: Sequence[str] | None = None) -> training.TrainResult | None:
    """Trains as the flags say; returns what `training.train` returns (None for
    `--compile_only`)."""
    training.console_logging(sys.stdout)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.config_from_flags(args.config, overrides)
        parallel.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id, args.multihost
        )
        setup = training.build(config)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.compile_only:
        report = training.compile_report(config, setup)
        for key, value in report.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        return
    try:
        return training.train(
            config,
            args.workdir,
            setup,
            allow_data_position_change=args.allow_data_position_change,
        )
    except (checkpointing.ResumeError, training.DataError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
