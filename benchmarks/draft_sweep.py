"""Report drafting's settings swept on a split: macro / micro label F1 per (k, cosine
threshold, same-finding rule), against the two baselines.

    python benchmarks/draft_sweep.py --config experiments/tiny_synthetic.py \
        --workdir /tmp/jaxmedclip_tiny [--checkpoint STEP] [--split validation] [--top 15]

Embeds the split's images once and builds (or reuses) the checkpoint's sentence index
(`<workdir>/draft_index/<step>/`), then drafts with every setting of the grid and scores
the drafts' labeler findings against the reference reports as `python -m
jaxmedclip.evaluate` does (`evaluation.drafting`). Choose settings on `validation`; the
test split's figure is `evaluate`'s. Last lines: the best settings, by macro F1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KS = (1, 2, 3, 4, 5, 6, 8)
SIMILARITIES = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "experiments",
                                                         "tiny_synthetic.py"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", type=int, default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--top", type=int, default=15)
    args, overrides = parser.parse_known_args(argv)

    from jaxmedclip import config_lib, draft_report, evaluation, predict, training
    from jaxmedclip.evaluation import drafting, embed

    config = config_lib.config_from_flags(args.config, [o.removeprefix("--config.")
                                                        for o in overrides])
    cfg = evaluation.eval_config(config)
    builder, _ = training.prepare_data(config.data)
    model = predict.load_model(config, args.workdir, args.checkpoint)
    setup, params, step, tokenizer = model.setup, model.params, model.step, model.tokenizer
    embedder = embed.Embedder(setup.model, setup.mesh, setup.rules)
    index = draft_report.model_index(config, builder, tokenizer, embedder, params,
                                     args.workdir, step)
    from input_pipeline import pipeline

    dataset = pipeline.make_dataset(config.data, builder, tokenizer, args.split,
                                    global_batch_size=cfg.batch_size, train=False,
                                    seed=cfg.seed)
    split = embedder.embed_batches(params, dataset.as_numpy_iterator(), with_text=False)
    reference = drafting.label_texts([t.decode("utf-8") for t in split.texts])
    findings = list(cfg.zero_shot_findings)
    print(f"step {step}, {args.split}: {split.num_examples} images; index: "
          f"{index.num_sentences} sentences of {index.num_studies} studies")
    for name, labels in drafting.baseline_labels(index, split.num_examples, cfg.seed).items():
        scores = drafting.label_agreement(labels, reference, findings)
        print(f"baseline {name:18s} macro F1 {scores['macro']['f1']:.3f} "
              f"micro F1 {scores['micro']['f1']:.3f}")
    rows = []
    for k, similarity, distinct in itertools.product(KS, SIMILARITIES, (False, True)):
        rule = drafting.DraftRule(k=k, max_similarity=similarity, distinct_findings=distinct,
                                  candidates=cfg.draft_candidates)
        drafts = drafting.draft(split.image_emb, index, rule)
        scores = drafting.label_agreement(drafting.label_texts(drafts.texts), reference,
                                          findings)
        rows.append((scores["macro"]["f1"], scores["micro"]["f1"], k, similarity, distinct))
    for macro, micro, k, similarity, distinct in sorted(rows, reverse=True)[: args.top]:
        print(f"macro F1 {macro:.3f} micro F1 {micro:.3f}  k={k} max_similarity="
              f"{similarity:.2f} distinct_findings={distinct}")
    return rows


if __name__ == "__main__":
    main()
