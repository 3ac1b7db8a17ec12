"""Input pipeline throughput on one CPU core: bare image decode vs the full pipeline.

    python benchmarks/input_pipeline.py [--config experiments/tiny_synthetic.py[:arg]]
        [--config.data.field=value ...] [--seconds 40] [--rounds 4] [--cpu N]

Pins the process to one core (`os.sched_setaffinity`) and gives TensorFlow one thread
(inter- and intra-op) and tf.data a private thread pool of one thread. Then measures

1. bare: PNG decode + resize (`stages.pixels.decode_and_resize`) of the train split's images,
   held in memory, batched, in images/s;
2. full: `make_dataset(train=True)`: order, ArrayRecord read, parse, PNG check, text
   choice, normalisation and tokenisation, decode, resize and augmentation (with
   rotation one warp from the source, augment.source_warps; the config's
   `data.augment`, else a typical one: crop, rotation, brightness/contrast/gamma),
   normalisation, batching; in images/s;

The two are measured alternately, `--rounds` times each (a shared machine's speed
drifts within a minute: docs/benchmarks.md), and the rates reported are the medians; the
last line is `pipeline_vs_decode=<median over rounds of full / bare>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPICAL_AUGMENT = dict(crop_scale=(0.6, 1.0), crop_aspect=(0.8, 1.25), rotation_degrees=10.0,
                       brightness=0.1, contrast=0.1, gamma=0.1)


def rate(dataset, batch_size: int, seconds: float) -> float:
    """Images per second over `seconds` from a fresh iterator, after a few warm-up batches
    (no other pipeline runs meanwhile: each iterator is gone before the next starts)."""
    iterator = dataset.as_numpy_iterator()
    for _ in range(3):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch_size
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "experiments",
                                                         "tiny_synthetic.py"))
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="per pipeline, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu", type=int, default=None,
                        help="core to pin to (default: the last one allowed)")
    parser.add_argument("--no_augment", action="store_true",
                        help="full pipeline without augmentation")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default: the config's global_batch_size")
    args, rest = parser.parse_known_args()
    overrides = [item[len("--config."):] for item in rest if item.startswith("--config.")]
    if len(overrides) != len(rest):
        parser.error(f"unrecognised arguments {rest}")

    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # Before TensorFlow starts its threads.
    sys.path.insert(0, REPO)
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from input_pipeline import pipeline
    from input_pipeline.stages.pixels import decode_and_resize
    from jaxmedclip import config_lib

    config = config_lib.config_from_flags(args.config, overrides)
    data = config.data
    if args.no_augment:
        data.augment = None
    elif not data.get("augment"):
        data.augment = TYPICAL_AUGMENT
    batch_size = args.batch_size or config.global_batch_size
    builder, tokenizer = pipeline.prepare(data)

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1

    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    count = min(len(source), 2048)
    pngs = np.array([source[i]["image"] for i in range(count)], dtype=object)
    size = data.image_size
    bare = (tf.data.Dataset.from_tensor_slices(pngs).repeat()
            .map(lambda png: decode_and_resize(png, size),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE).with_options(options))
    full = pipeline.make_dataset(data, builder, tokenizer, "train",
                                 global_batch_size=batch_size, train=True, seed=config.seed,
                                 process_index=0, process_count=1).with_options(options)

    print(f"cpu {cpu}, batch {batch_size}, {len(source)} train records, source "
          f"{pngs[0] and tf.io.decode_png(pngs[0]).shape.as_list()} -> {size}x{size}, "
          f"text={data.text}, augment={data.augment and dict(data.augment)}")
    datasets = {"bare": bare, "full": full}
    rates = {name: [] for name in datasets}
    for round_ in range(args.rounds):
        for name, dataset in datasets.items():
            rates[name].append(rate(dataset, batch_size, args.seconds / args.rounds))
        print(f"round {round_}: bare {rates['bare'][-1]:.0f}, full {rates['full'][-1]:.0f} "
              "images/s")
    ratios = [full / bare for full, bare in zip(rates["full"], rates["bare"], strict=True)]
    print(f"bare decode+resize: {np.median(rates['bare']):.0f} images/s (median)")
    print(f"full pipeline: {np.median(rates['full']):.0f} images/s (median)")
    print(f"pipeline_vs_decode={np.median(ratios):.3f}")


if __name__ == "__main__":
    main()
