"""Trains an experiment's SentencePiece tokenizer on a split's reports.

    python -m input_pipeline.train_tokenizer --config experiments/tiny_synthetic.py \
        [--config.data.vocab_size=1024] [--split train] [--out path/to/spm.model]

Builds (or opens) `config.data`'s dataset, trains a `data.tokenizer_type` model of at
most `data.vocab_size` pieces on each study's report in `--split`, and writes it to
`--out`, by default where `pipeline.prepare` looks for it (beside the records), replacing
the model there. Prints the path and the vocabulary size.
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
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; overrides look like "
                         "--config.field=value")
        overrides.append(item[len("--config."):])

    from input_pipeline import pipeline, tokenizer
    from jaxmedclip import config_lib

    try:
        config = config_lib.config_from_flags(args.config, overrides)
        build = pipeline.DATASET_BUILDERS.get(config.data.name)
        if build is None:
            raise ValueError(f"data.name={config.data.name!r} is not a known dataset; "
                             f"available: {', '.join(sorted(pipeline.DATASET_BUILDERS))}")
        builder = build(config.data)
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
