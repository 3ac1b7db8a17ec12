"""Trains an experiment's SentencePiece tokenizer on a split's reports.

    python -m input_pipeline.train_tokenizer --config experiments/tiny_synthetic.py \
        [--config.data.vocab_size=1024] [--split train] [--out path/to/spm.model]

Builds (or opens) `config.data`'s dataset, trains a `data.tokenizer_type` model of at
most `data.vocab_size` pieces on each study's report in `--split`, and writes it to
`--out`, by default where `pipeline.prepare` looks for it (beside the records), replacing
the model there. Prints the path and the vocabulary size.

A command-line entry point like `input_pipeline.build`: `jaxmedclip.config_lib` (the
experiment files) is imported in `main` only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.train_tokenizer", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment file, path/to/experiment.py[:arg]")
    parser.add_argument("--split", default="train", help="split whose reports to train on")
    parser.add_argument("--out", default=None,
                        help="where to write the .model (default: beside the records)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from input_pipeline import pipeline, tokenizer
    from jaxmedclip import config_lib

    overrides = config_lib.override_flags(parser, rest)

    try:
        config = config_lib.config_from_flags(args.config, overrides, required=False)
        builder = pipeline.build_dataset(config.data)
        if args.split.split("[")[0] not in builder.info.splits:
            raise ValueError(f"split {args.split!r} not in {sorted(builder.info.splits)}")
        path = tokenizer.train_tokenizer(config.data, builder, args.split, args.out)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise SystemExit(f"error: {e}") from None
    vocab = tokenizer.Tokenizer(path, config.data.max_text_len).vocab_size
    print(f"tokenizer: {path}")
    print(f"vocab_size: {vocab}")


if __name__ == "__main__":
    main()
