"""Evaluation outputs: report.json, a console summary, ROC curves (PNG), TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmedclip.evaluation import drafting, grounding
from jaxmedclip.evaluation.prompts import slug


def report_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", str(step))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, report: Mapping[str, Any]) -> None:
    """Writes `report` as JSON (numpy values converted, NaN/inf written as null)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(report), f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def flat_metrics(report: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The headline numbers as flat scalars (for metrics.jsonl / TensorBoard).

    Undefined values (None, NaN) are left out.
    """
    out: dict[str, float | None] = {}
    zero_shot = report.get("zero_shot")
    if zero_shot:
        out["zero_shot_mean_auc"] = zero_shot["mean_auc"]
        out["zero_shot_mean_f1"] = zero_shot["mean_f1"]
        out["zero_shot_mean_mcc"] = zero_shot["mean_mcc"]
        for name, result in zero_shot["auc"].items():
            out[f"zero_shot_auc/{slug(name)}"] = result["value"]
    multiclass = report.get("multiclass")
    if multiclass:
        out["multiclass_accuracy"] = multiclass["accuracy"]
    retrieval = report.get("retrieval")
    if retrieval:
        for short, direction in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            for key, value in retrieval[direction].items():
                if key != "chance":
                    out[f"{short}_{key}"] = value
    probe = report.get("linear_probe")
    if probe:
        for label, result in probe["fractions"].items():
            out[f"probe_mean_auc@{label}"] = result["mean_auc"]
    if report.get("drafting"):
        out.update(drafting.flat_metrics(report["drafting"]))
    if report.get("grounding"):
        out.update(grounding.flat_metrics(report["grounding"]))
    return {prefix + k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text summary of `report` for the console."""
    lines = [
        f"evaluation of step {report.get('step')} on split {report.get('split')!r} "
        f"({report.get('num_examples')} examples)"
    ]
    zero_shot = report.get("zero_shot")
    if zero_shot:
        ci_pct = round(100 * zero_shot.get("confidence", 0.95))
        lines += [
            "",
            f"zero-shot (threshold for F1/MCC from {zero_shot['threshold_split']!r})",
            f"  {'finding':<28} {'AUC':>6}  {f'{ci_pct}% CI':<15} {'n+':>5} {'n-':>5} "
            f"{'F1':>6} {'MCC':>6}",
        ]
        for name, auc in zero_shot["auc"].items():
            ci = auc.get("ci")
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
            lines.append(
                f"  {name:<28} {_fmt(auc['value']):>6}  {ci_text:<15} {auc['n_positive']:>5} "
                f"{auc['n_negative']:>5} {_fmt(zero_shot['f1'][name]):>6} "
                f"{_fmt(zero_shot['mcc'][name]):>6}"
            )
        lines.append(
            f"  {'mean':<28} {_fmt(zero_shot['mean_auc']):>6}  {'':<15} {'':>5} {'':>5} "
            f"{_fmt(zero_shot['mean_f1']):>6} {_fmt(zero_shot['mean_mcc']):>6}"
        )
    multiclass = report.get("multiclass")
    if multiclass:
        lines += [
            "",
            f"multi-class prompts over {len(multiclass['classes'])} classes "
            f"({multiclass['n']} images): accuracy {_fmt(multiclass['accuracy'])} "
            f"(chance {_fmt(multiclass['chance'])})",
        ]
    retrieval = report.get("retrieval")
    if retrieval:
        ks = [k for k in retrieval["image_to_text"] if k.startswith("recall@")]
        lines += [
            "",
            f"retrieval over {retrieval['num_queries']} pairs "
            f"({retrieval['num_distinct_texts']} distinct reports); value (chance)",
            "  " + f"{'':<15}" + "".join(f"{k:>18}" for k in ks) + f"{'median rank':>14}",
        ]
        for direction in ("image_to_text", "text_to_image"):
            result = retrieval[direction]
            chance = result["chance"]
            cells = "".join(f"{f'{result[k]:.3f} ({chance[k]:.3f})':>18}" for k in ks)
            lines.append(f"  {direction:<15}{cells}{result['median_rank']:>14g}")
    probe = report.get("linear_probe")
    if probe:
        lines += [
            "",
            f"linear probe on {probe['train_split']!r} "
            f"({probe['n_train_total']} examples), test AUC",
        ]
        for label, result in probe["fractions"].items():
            lines.append(
                f"  {label:>5} ({result['n_train']:>6} train): mean AUC "
                f"{_fmt(result['mean_auc'])}"
                + (f"; {len(result['skipped'])} findings not fit" if result["skipped"] else "")
            )
    if report.get("drafting"):
        lines += ["", *drafting.summary_lines(report["drafting"])]
    if report.get("grounding"):
        lines += ["", *grounding.summary_lines(report["grounding"])]
    return "\n".join(lines)


def write_roc_curves(
    path: str, title: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> bool:
    """One PNG with a ROC curve per class (`name -> (y_true, y_score)`).

    Classes with a single class in `y_true` are left out; returns False (and writes
    nothing) when none is left.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn import metrics as skm

    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for name, (y_true, y_score) in curves.items():
        y_true = np.asarray(y_true, bool)
        if y_true.all() or not y_true.any():
            continue
        fpr, tpr, _ = skm.roc_curve(y_true, y_score)
        auc = skm.roc_auc_score(y_true, y_score)
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})")
        drawn += 1
    if not drawn:
        return False
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize="small", title="class (AUC)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


class TensorBoardWriter:
    """Scalars to TensorBoard event files in `logdir`, through one open event file.

    Written with `tf.summary.write` and the scalar plugin's metadata, which is what
    `tf.summary.scalar` writes, without needing the `tensorboard` package installed.
    """

    def __init__(self, logdir: str):
        import tensorflow as tf  # Only the entry points need TensorFlow.
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        self._writer = tf.summary.create_file_writer(logdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        tf = self._tf
        with self._writer.as_default():
            for name, value in scalars.items():
                tf.summary.write(
                    name, tf.constant(value, tf.float32), step=step, metadata=self._metadata
                )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_tensorboard(logdir: str, step: int, scalars: Mapping[str, float]) -> None:
    """Appends `scalars` at `step` to TensorBoard event files in `logdir` (one-off)."""
    writer = TensorBoardWriter(logdir)
    writer.write(step, scalars)
    writer.close()
