"""Builds (prepares) the dataset of an experiment config, without training anything.

    python -m input_pipeline.build --config experiments/vit_b16_mimic.py \\
        --config.data.manual_dir=/data/mimic-cxr-jpg/2.0.0 --config.data.data_dir=/data/tfds

Prepares the records of `config.data` (opening them if already there) and prints each
split's size and the build report's path. The tokenizer is trained later, by
`pipeline.prepare` (or `python -m input_pipeline.train_tokenizer`). Building a large
dataset once, before a multi-host launch, keeps every host from building it itself.

An error in the config or the data (a missing file, a malformed CSV, too many bad rows)
ends it with one line, `error: ...`, naming the file or row and, for a failed build, the
build report (`cli_errors`); exit status 1.

A command-line entry point: it joins the experiment files (`jaxmedclip.config_lib`,
imported in `main`) to the builders, as the training CLI does. The library modules of
input_pipeline import nothing of jaxmedclip beyond `vocabulary` and `batch_schema`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from input_pipeline import cli_errors, pipeline
    from jaxmedclip import config_lib

    parser = argparse.ArgumentParser(prog="python -m input_pipeline.build",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment file, e.g. experiments/x.py:arg")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = config_lib.override_flags(parser, rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with cli_errors.exit_on_user_error():
        config = config_lib.config_from_flags(args.config, overrides, required=False)
        builder = pipeline.build_dataset(config.data)
    print(f"{builder.name} {builder.builder_config.name} at {builder.data_dir}")
    for split, info in builder.info.splits.items():
        print(f"  {split}: {info.num_examples} records")
    report = getattr(builder, "build_report_path", None)
    if report:
        print(f"  build report: {report}")


if __name__ == "__main__":
    main()
