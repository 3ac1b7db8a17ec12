"""Trains an experiment's SentencePiece tokenizer on a split's reports.

    python -m input_pipeline.train_tokenizer --config experiments/tiny_synthetic.py \
        [--config.data.vocab_size=1024] [--split train] [--out path/to/spm.model]

Builds (or opens) `config.data`'s dataset, trains a `data.tokenizer_type` model of at
most `data.vocab_size` pieces on each study's report in `--split`, and writes it to
`--out`, by default where `pipeline.prepare` looks for it (beside the records), replacing
the model there. Prints the path, the vocabulary size and the token lengths of the texts
the pipeline reads from `--split` (each study's `data.text`: findings and impression for
"report", "both" and "sentences"), BOS and EOS included as rows count them: percentiles
p50/p90/p95/p99, the maximum and the share of studies whose text is truncated at
`data.max_text_len`.

A command-line entry point like `input_pipeline.build`: `jaxmedclip.config_lib` (the
experiment files) is imported in `main` only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from input_pipeline import cli_errors

if TYPE_CHECKING:
    from input_pipeline.tokenizer import Tokenizer


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
    except cli_errors.user_errors() as e:
        raise SystemExit(cli_errors.error_line(e)) from None
    trained = tokenizer.Tokenizer(path, config.data.max_text_len)
    print(f"tokenizer: {path}")
    print(f"vocab_size: {trained.vocab_size}")
    for line in length_report(trained, builder, args.split, config.data.text):
        print(line)


def length_report(trained: Tokenizer, builder, split: str, text_source: str) -> list[str]:
    """Lines on the token lengths of the text the pipeline reads (`text_source`, i.e.
    data.text) of each study in `split`; studies without text are left out."""
    from input_pipeline import tokenizer
    from input_pipeline.stages import text as text_stage

    studies = list(tokenizer.split_study_texts(builder, split, ("findings", "impression")))
    texts = []
    if studies:
        tf = tokenizer.tensorflow_on_host()
        findings, impression = (tf.constant(column) for column in zip(*studies, strict=True))
        selected = text_stage.select_text(findings, impression, text_source).numpy()
        texts = [t.decode("utf-8") for t in selected if t]
    where = f"data.text={text_source!r}, split {split!r}"
    if not texts:
        return [f"text lengths ({where}): no texts"]
    lengths = tokenizer.text_lengths(trained, texts)
    shown = ", ".join(f"p{q} {n}" for q, n in lengths.percentiles.items())
    return [f"text lengths in tokens with BOS and EOS ({where}, {lengths.count} studies): "
            f"{shown}, max {lengths.max}",
            f"truncated at data.max_text_len={lengths.max_len}: "
            f"{lengths.truncated_fraction:.1%} ({lengths.truncated} of {lengths.count})"]


if __name__ == "__main__":
    main()
