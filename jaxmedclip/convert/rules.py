"""Name-pattern tables with a tensor hook per kind, applied in both directions.

A `Rule` pairs one of our parameter names with a Hugging Face tensor name, both written as
templates whose `{i}` matches a layer index, and names the `Hook` that turns our array into
theirs (`to_hf`) and back (`from_hf`, told the shape our tree expects). A Hugging Face name
ending in `#k` is part k of a tensor fused along axis 0 (PyTorch's `in_proj_weight` holds
q, k and v); `fuse` and `split` join and part them.

Our names are `/`-joined paths of the unboxed Flax param tree, one entry per layer
(`encoder/block_3/...`); `unstack_layers`/`stack_layers` convert scanned trees
(`encoder/blocks/...` with a leading layer axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Hook:
    """How one kind of tensor changes layout between our tree and PyTorch."""

    name: str
    to_hf: Callable[[Array], Array]
    from_hf: Callable[[Array, tuple[int, ...]], Array]


def _reshape_back(y: Array, shape: tuple[int, ...]) -> Array:
    return y.reshape(shape)


SAME = Hook("same", lambda x: x, _reshape_back)
# Dense kernels are [in, out]; torch Linear weights are [out, in].
DENSE = Hook("dense", lambda x: x.T, lambda y, shape: y.T.reshape(shape))
# Flax convs are HWIO; torch Conv2d weights are OIHW.
CONV = Hook("conv", lambda x: x.transpose(3, 2, 0, 1), lambda y, shape: y.transpose(2, 3, 1, 0))
# Our q/k/v kernels are [embed, heads, head_dim]; torch's are [heads * head_dim, embed].
QKV_KERNEL = Hook(
    "qkv_kernel", lambda x: x.reshape(x.shape[0], -1).T, lambda y, shape: y.T.reshape(shape)
)
# Our out kernel is [heads, head_dim, embed]; torch's is [embed, heads * head_dim].
OUT_KERNEL = Hook(
    "out_kernel", lambda x: x.reshape(-1, x.shape[-1]).T, lambda y, shape: y.T.reshape(shape)
)
# [heads, head_dim] biases, (1, n, d) position tables, (1, 1, d) class tokens, () scalars:
# the same numbers in another shape.
FLATTEN = Hook("flatten", lambda x: x.reshape(-1), _reshape_back)
DROP_LEAD = Hook("drop_lead", lambda x: x.reshape(x.shape[1:]), _reshape_back)
SCALAR_1 = Hook("scalar_1", lambda x: np.reshape(x, (1,)), _reshape_back)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str
    hook: Hook = SAME

    def _regex(self, template: str) -> re.Pattern:
        escaped = re.escape(template).replace(r"\{i\}", "{i}")
        return re.compile(escaped.replace("{i}", r"(?P<i>\d+)") + r"\Z")

    def match_ours(self, name: str) -> str | None:
        m = self._regex(self.ours).match(name)
        return self.theirs.format(**m.groupdict()) if m else None

    def match_theirs(self, name: str) -> str | None:
        m = self._regex(self.theirs).match(name)
        return self.ours.format(**m.groupdict()) if m else None


class ConversionError(ValueError):
    """Tensors that do not convert, all listed at once."""

    def __init__(self, what: str, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__(
            f"{what}: {len(self.problems)} tensor(s) do not match:\n  " + "\n  ".join(self.problems)
        )


def prefixed(rules: Iterable[Rule], ours: str, theirs: str) -> list[Rule]:
    """`rules` with both names under a prefix (a tower inside a full model)."""
    return [Rule(ours + r.ours, theirs + r.theirs, r.hook) for r in rules]


def to_hf(flat: Mapping[str, Array], rules: list[Rule]) -> dict[str, Array]:
    """Our flat params -> Hugging Face tensors; every one of ours must match a rule."""
    out, problems = {}, []
    for name, value in flat.items():
        for rule in rules:
            theirs = rule.match_ours(name)
            if theirs is not None:
                out[theirs] = np.array(rule.hook.to_hf(np.asarray(value)), order="C")
                break
        else:
            problems.append(f"{name} {tuple(np.shape(value))}: no rule maps it")
    if problems:
        raise ConversionError("export", problems)
    return fuse(out)


def from_hf(
    tensors: Mapping[str, Array],
    rules: list[Rule],
    expected: Mapping[str, tuple[int, ...]],
    what: str = "import",
) -> dict[str, Array]:
    """Hugging Face tensors -> our flat params with the `expected` names and shapes.

    Every expected name must be produced, and every given tensor must be used; all
    mismatches (unknown, missing, wrong shape) are reported in one error.
    """
    tensors = split(tensors, rules)
    out, problems, reported = {}, [], set()
    for name, value in tensors.items():
        for rule in rules:
            ours = rule.match_theirs(name)
            if ours is not None:
                break
        else:
            problems.append(f"{name} {tuple(value.shape)}: no rule maps it to our model")
            continue
        if ours not in expected:
            problems.append(f"{name} {tuple(value.shape)} -> {ours}: not in our model")
            continue
        shape = tuple(expected[ours])
        try:
            converted = rule.hook.from_hf(np.asarray(value), shape)
        except ValueError:
            converted = None
        if converted is None or converted.shape != shape:
            reported.add(ours)
            problems.append(
                f"{name} {tuple(value.shape)} -> {ours}: expected {shape} ({rule.hook.name})"
            )
            continue
        out[ours] = converted
    problems += [
        f"{ours} {tuple(shape)}: missing"
        for ours, shape in expected.items()
        if ours not in out and ours not in reported
    ]
    if problems:
        raise ConversionError(what, problems)
    return out


def _fused_parts(rules: Iterable[Rule]) -> dict[str, int]:
    parts: dict[str, int] = {}
    for rule in rules:
        base, sep, index = rule.theirs.rpartition("#")
        if sep:
            parts[base] = max(parts.get(base, 0), int(index) + 1)
    return parts


def fuse(tensors: Mapping[str, Array]) -> dict[str, Array]:
    """Joins `name#0`, `name#1`, ... along axis 0 into `name`."""
    out: dict[str, Array] = {}
    pieces: dict[str, dict[int, Array]] = {}
    for name, value in tensors.items():
        base, sep, index = name.rpartition("#")
        if sep:
            pieces.setdefault(base, {})[int(index)] = value
        else:
            out[name] = value
    for base, parts in pieces.items():
        out[base] = np.concatenate([parts[k] for k in sorted(parts)], axis=0)
    return out


def split(tensors: Mapping[str, Array], rules: Iterable[Rule]) -> dict[str, Array]:
    """Parts fused tensors named by `rules` (`name#k`) along axis 0."""
    counts = _fused_parts(rules)
    out: dict[str, Array] = {}
    for name, value in tensors.items():
        # Fused names appear under any prefix; match on the suffix of the template.
        base = next((b for b in counts if re.fullmatch(_template_regex(b), name)), None)
        if base is None:
            out[name] = value
            continue
        for k, part in enumerate(np.split(np.asarray(value), counts[base], axis=0)):
            out[f"{name}#{k}"] = part
    return out


def _template_regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"\d+")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Array]:
    """Nested dicts -> {"a/b/c": array}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Array]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


_SCANNED = re.compile(r"(?P<head>.*/)blocks/(?P<tail>.*)")


def unstack_layers(flat: Mapping[str, Array]) -> dict[str, Array]:
    """Scanned `.../blocks/x` [depth, ...] -> `.../block_{i}/x` per layer."""
    out = {}
    for name, value in flat.items():
        m = _SCANNED.fullmatch(name)
        if m is None:
            out[name] = value
            continue
        for i in range(value.shape[0]):
            out[f"{m['head']}block_{i}/{m['tail']}"] = value[i]
    return out


def unstacked_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The per-layer names and shapes of a (possibly scanned) tree's shapes."""
    out = {}
    for name, shape in shapes.items():
        m = _SCANNED.fullmatch(name)
        if m is None:
            out[name] = tuple(shape)
            continue
        for i in range(shape[0]):
            out[f"{m['head']}block_{i}/{m['tail']}"] = tuple(shape[1:])
    return out


def stack_layers(flat: Mapping[str, Array], target: Iterable[str]) -> dict[str, Array]:
    """Per-layer entries back into the scanned names of `target` where it has them."""
    out = dict(flat)
    for name in target:
        m = _SCANNED.fullmatch(name)
        if m is None:
            continue
        layer = re.compile(re.escape(m["head"]) + r"block_(\d+)/" + re.escape(m["tail"]) + r"\Z")
        found = sorted(
            ((int(lm[1]), key) for key in out if (lm := layer.match(key))), key=lambda t: t[0]
        )
        if found:
            out[name] = np.stack([out.pop(key) for _, key in found])
    return out
