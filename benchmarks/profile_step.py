"""Where the train step's device time goes, by category, for any experiment config.

  python benchmarks/profile_step.py --config experiments/tiny_synthetic.py \
      [--config.global_batch_size=64 ...] [--steps 3] [--warmup 2] [--cpu_devices 8] \
      [--out DIR] [--top 15]

Builds the mesh, model, optimizer and jitted train step exactly as `jaxmedclip.train`
does (random batches of the config's shapes on the mesh, as benchmarks/train_step.py),
compiles, runs `--warmup` steps, then traces `--steps` steps with `jax.profiler`. Each op
event of the step's compiled program(s) (GPU: the kernels on the device streams; CPU:
XLA's ops on the host threads) is matched by its `hlo_op` to its instruction in the
compiled HLO and counted in one category:

  matmul       dot / convolution ops and fusions, cuBLAS / cuDNN gemm custom-calls
  attention    ops in the `dot_product_attention` name scope, cuDNN fused attention
  optimizer    ops in the `optimizer` name scope (the optax update)
  copies       copy, dynamic-(update-)slice, data-movement-only fusions, memcpy / memset
  collectives  all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
  elementwise  other fusions and elementwise ops: norms, GELU, bias, residuals, reductions
  other        control flow, unknown custom-calls, ops not found in the compiled HLO

(the name scopes first, then matmul, collectives, copies, elementwise). It prints the
device time per step (the ops' self-times summed, mean over devices), each category's ms
per step and share, and the `--top` largest ops holding a matmul: calls per step, ms per
step, FLOPs per call (2 x output elements x contracted size, of one device's shard) and
achieved TFLOP/s. Everything, with the environment and the config overrides, goes to
`<out>/profile.json`, the trace to `<out>/trace/` (open its `perfetto_trace.json.gz` in
ui.perfetto.dev); `--out` defaults to $OUT when set, else a fresh folder under
./profiles/. Events of other programs (e.g. the batch's transfer) are left out.

On CPU the ops of a device may run concurrently on XLA's thread pool and fake devices
share the cores, so op times include waiting for a core and the device time can exceed
the step's wall time; the shares still say where the step's work goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import gzip
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CATEGORIES = ("matmul", "attention", "optimizer", "copies", "collectives", "elementwise",
              "other")
ATTENTION_SCOPE = "dot_product_attention"  # jaxmedclip/models/layers.py's named scope.
OPTIMIZER_SCOPE = "optimizer"  # jaxmedclip/training/step.py's named scope.
MATMUL_OPS = {"dot", "convolution", "ragged-dot"}
GEMM_TARGET = re.compile(r"gemm|matmul|conv", re.IGNORECASE)  # cuBLAS, cuDNN, oneDNN.
FMHA_TARGET = "__cudnn$fmha"
COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                  "all-to-all", "ragged-all-to-all", "collective-broadcast"}
MOVEMENT_OPS = {"copy", "transpose", "dynamic-slice", "dynamic-update-slice", "slice",
                "concatenate", "pad", "reverse", "reshape", "bitcast"}
NO_DATA_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
ELEMENTWISE_OPS = {
    "abs", "add", "and", "atan2", "broadcast", "cbrt", "ceil", "clamp", "clz", "compare",
    "complex", "convert", "cosine", "divide", "erf", "exponential", "exponential-minus-one",
    "floor", "imag", "iota", "is-finite", "log", "log-plus-one", "logistic", "map",
    "maximum", "minimum", "multiply", "negate", "not", "or", "popcnt", "power", "real",
    "reduce", "reduce-precision", "reduce-window", "remainder", "round-nearest-afz",
    "round-nearest-even", "rsqrt", "select", "select-and-scatter", "shift-left",
    "shift-right-arithmetic", "shift-right-logical", "sign", "sine", "sqrt", "subtract",
    "tan", "tanh", "xor",
}
TRACE_EVENT_LIMIT = 1_000_000  # The trace viewer's JSON drops events past this many.
# Lines the profiler derives from a device's op events: they would count the ops twice.
DERIVED_LINES = {"XLA Modules", "XLA Ops", "Async XLA Ops", "Steps", "TensorFlow Ops",
                 "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope",
                 "Source code", "XLA TraceMe", "Launch Stats"}


# -- the compiled HLO ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction line. `operands` hold names, or the operand's own text where it
    is written with its shape; `calls` are the computations a fusion or async op runs."""

    name: str
    opcode: str
    shape: str
    operands: tuple[str, ...] = ()
    attributes: str = ""
    op_name: str = ""
    kind: str = ""
    calls: tuple[str, ...] = ()
    target: str = ""


@dataclasses.dataclass(frozen=True)
class HloModule:
    name: str
    instructions: dict[str, Instruction]  # Names are unique in a module.
    computations: dict[str, tuple[str, ...]]
    roots: dict[str, str]


_COMPUTATION = re.compile(r"(?:ENTRY\s+)?%?([^\s(]+)")
_INSTRUCTION = re.compile(r"\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)")
_OPCODE = re.compile(r"([\w\-]+)\(")


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start` (any of (), [], {})."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_instruction(name: str, text: str) -> Instruction:
    """The instruction `name = <text>` of an HLO line."""
    if text.startswith("("):  # A tuple shape.
        end = _closing(text, 0)
        shape, rest = text[: end + 1], text[end + 1 :].lstrip()
    else:
        shape, _, rest = text.partition(" ")
    match = _OPCODE.match(rest)
    if match is None:
        return Instruction(name, "", shape, attributes=rest)
    end = _closing(rest, match.end() - 1)
    operands = tuple(part.lstrip("%") if " " not in part else part
                     for part in _top_level_split(rest[match.end() : end]))
    attributes = rest[end + 1 :]
    op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attributes)
    kind = re.search(r"\bkind=(k\w+)", attributes)
    calls = re.search(r"\bcalls=(\{[^}]*\}|%?[\w.\-]+)", attributes)
    target = re.search(r'custom_call_target="([^"]*)"', attributes)
    return Instruction(
        name=name, opcode=match.group(1), shape=shape, operands=operands,
        attributes=attributes,
        op_name=op_name.group(1) if op_name else "",
        kind=kind.group(1) if kind else "",
        calls=tuple(c.strip().lstrip("%") for c in calls.group(1).strip("{}").split(",")
                    if c.strip()) if calls else (),
        target=target.group(1) if target else "",
    )


def parse_hlo(text: str) -> HloModule:
    """The instructions of a compiled module's text (`Compiled.as_text()`)."""
    name, current = "", None
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[str]] = {}
    roots: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("HloModule "):
            name = line.split()[1].rstrip(",")
        elif line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = _COMPUTATION.match(line).group(1)
            computations[current] = []
        elif current is not None and (match := _INSTRUCTION.fullmatch(line)):
            instruction = parse_instruction(match.group(2), match.group(3))
            instructions[instruction.name] = instruction
            computations[current].append(instruction.name)
            if match.group(1):
                roots[current] = instruction.name
    return HloModule(name, instructions,
                     {k: tuple(v) for k, v in computations.items()}, roots)


def fused_body(module: HloModule, instruction: Instruction) -> list[Instruction]:
    """The instructions of the computations `instruction` calls (fusions, async ops),
    nested calls included; not reducers' `to_apply` nor while bodies (timed apart)."""
    body, pending, seen = [], list(instruction.calls), set()
    while pending:
        computation = pending.pop()
        if computation in seen:
            continue
        seen.add(computation)
        for name in module.computations.get(computation, ()):
            inner = module.instructions[name]
            body.append(inner)
            pending.extend(inner.calls)
    return body


def _base_opcode(opcode: str) -> str:
    """all-reduce-start -> all-reduce: async halves count as their operation."""
    return re.sub(r"-(start|done|update)$", "", opcode)


def _is_matmul(instruction: Instruction) -> bool:
    return instruction.opcode in MATMUL_OPS or (
        instruction.opcode == "custom-call" and bool(GEMM_TARGET.search(instruction.target)))


def _in_scope(op_name: str, scope: str) -> bool:
    return re.search(rf"(?<![\w.]){scope}(?!\w)", op_name) is not None


def classify(module: HloModule | None, op: str, event_name: str = "") -> str:
    """The category (one of CATEGORIES) of op `op` of `module`; `event_name` (the
    trace event's name) marks memcpy / memset events. Unknown ops are `other`."""
    instruction = module.instructions.get(op) if module is not None else None
    memory = re.match(r"mem(cpy|set)", event_name, re.IGNORECASE) is not None
    if instruction is None:
        return "copies" if memory else "other"
    body = fused_body(module, instruction)
    everything = [instruction, *body]
    matmuls = [i for i in everything if _is_matmul(i)]
    # A fusion holding a matmul belongs where its matmul does; else where its result does.
    if matmuls:
        scopes = [i.op_name for i in matmuls]
    else:
        scopes = [instruction.op_name] + [
            module.instructions[module.roots[c]].op_name
            for c in instruction.calls if c in module.roots]
    if any(_in_scope(s, ATTENTION_SCOPE) for s in scopes) or any(
            i.target.startswith(FMHA_TARGET) for i in everything):
        return "attention"
    if any(_in_scope(s, OPTIMIZER_SCOPE) for s in scopes):
        return "optimizer"
    if matmuls:
        return "matmul"
    if any(_base_opcode(i.opcode) in COLLECTIVE_OPS for i in everything):
        return "collectives"
    if memory:
        return "copies"
    if body:
        kinds = {_base_opcode(i.opcode) for i in body} - NO_DATA_OPS
        return "copies" if "dynamic-update-slice" in kinds or kinds <= MOVEMENT_OPS \
            else "elementwise"
    opcode = _base_opcode(instruction.opcode)
    if opcode in MOVEMENT_OPS:
        return "copies"
    return "elementwise" if opcode in ELEMENTWISE_OPS else "other"


def describe(module: HloModule | None, op: str) -> str:
    """Where op `op` comes from: the op_name of its matmul (else its own) without the
    jit / jvp / transpose wrappers; "bwd " marks the backward pass."""
    instruction = module.instructions.get(op) if module is not None else None
    if instruction is None:
        return ""
    matmuls = [i for i in [instruction, *fused_body(module, instruction)]
               if _is_matmul(i) and i.op_name]
    op_name = matmuls[0].op_name if matmuls else instruction.op_name
    parts = [part for part in op_name.split("/")
             if not re.fullmatch(r"(jit|jvp|transpose|vmap|pjit)\(.*\)", part)]
    return ("bwd " if "transpose(" in op_name else "") + "/".join(parts)


def _dims(shape: str) -> list[int]:
    """Dimensions of a shape's (first) array: `f32[8,<=16]{1,0}` -> [8, 16]."""
    match = re.search(r"\[([^\]]*)\]", shape)
    if match is None or not match.group(1).strip():
        return []
    return [int(d.strip().lstrip("<=")) for d in match.group(1).split(",")]


def _operand_dims(module: HloModule, operand: str) -> list[int]:
    if "[" in operand:
        return _dims(operand)
    producer = module.instructions.get(operand)
    return _dims(producer.shape) if producer else []


def _int_list(attributes: str, key: str) -> list[int]:
    match = re.search(rf"\b{key}=\{{([^}}]*)\}}", attributes)
    return [int(x) for x in match.group(1).split(",") if x.strip()] if match else []


def _own_flops(module: HloModule, instruction: Instruction) -> float:
    output = math.prod(_dims(instruction.shape))  # A gemm custom-call's first result.
    attributes = instruction.attributes
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", attributes)
    if labels and (instruction.opcode == "convolution" or _is_matmul(instruction)):
        kernel = _operand_dims(module, instruction.operands[1])
        # Per output element: the kernel's window times its input features (per group).
        return 2.0 * output * math.prod(kernel) / kernel[labels.group(1).index("o")]
    if instruction.opcode == "dot":
        lhs, contracting = (_operand_dims(module, instruction.operands[0]),
                            _int_list(attributes, "lhs_contracting_dims"))
    elif _is_matmul(instruction):  # cuBLAS: the dimension numbers are in backend_config.
        match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attributes)
        if match is None:
            return 0.0
        lhs = _operand_dims(module, instruction.operands[0])
        contracting = [int(x.strip().strip('"')) for x in match.group(1).split(",")
                       if x.strip()]
    else:
        return 0.0
    return 2.0 * output * math.prod(lhs[d] for d in contracting)


def matmul_flops(module: HloModule | None, op: str) -> float:
    """FLOPs of one call of op `op` (a dot / convolution / gemm, or a fusion holding
    some): 2 x output elements x contracted size, batch dims included; 0 otherwise."""
    instruction = module.instructions.get(op) if module is not None else None
    if instruction is None:
        return 0.0
    total = 0.0
    for inner in [instruction, *fused_body(module, instruction)]:
        try:
            total += _own_flops(module, inner)
        except (IndexError, ValueError, ZeroDivisionError):  # Unreadable shapes: no FLOPs.
            continue
    return total


# -- the trace -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One op's run in the trace; `self_us`: its duration less that of the op events
    nested in it on the same line (a while loop's body)."""

    device: str
    line: tuple
    module: str
    op: str
    name: str
    start_us: float
    self_us: float


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _self_times(events: list[dict]) -> list[float]:
    """Each event's duration less its directly nested events' (events of one line)."""
    order = sorted(range(len(events)), key=lambda i: (events[i]["ts"], -events[i]["dur"]))
    own = [float(e["dur"]) for e in events]
    stack: list[int] = []
    for i in order:
        start = events[i]["ts"]
        while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= start:
            stack.pop()
        if stack:
            own[stack[-1]] -= events[i]["dur"]
        stack.append(i)
    return [max(t, 0.0) for t in own]


def op_events(trace: Mapping) -> list[OpEvent]:
    """The op events (those with an `hlo_op` arg) of a trace-viewer JSON trace.

    Device lines ("/device:GPU:0" streams) are used when any device line has op events
    (GPU, TPU); else the host threads (CPU, where `device_ordinal` names the device).
    Lines the profiler derives from the op events ("XLA Ops", ...) are used only when
    nothing else has op events."""
    processes, threads = {}, {}
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "M" and event.get("name") == "process_name":
            processes[event.get("pid")] = event.get("args", {}).get("name", "")
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event.get("pid"), event.get("tid"))] = event.get("args", {}).get("name", "")
        elif (event.get("ph") == "X" and "hlo_op" in event.get("args", {})
              and isinstance(event.get("dur"), int | float)):
            lines[(event.get("pid"), event.get("tid"))].append(event)
    candidates = {k: v for k, v in lines.items() if threads.get(k) not in DERIVED_LINES} \
        or lines
    on_device = {k: v for k, v in candidates.items()
                 if str(processes.get(k[0], "")).startswith("/device:")}
    chosen = on_device or candidates
    out = []
    for line, events in chosen.items():
        process = str(processes.get(line[0], line[0]))
        for event, own in zip(events, _self_times(events), strict=True):
            args = event["args"]
            device = process if on_device else f"{process}:{args.get('device_ordinal', 0)}"
            out.append(OpEvent(device, line, str(args.get("hlo_module", "")),
                               str(args["hlo_op"]), str(event.get("name", "")),
                               float(event["ts"]), own))
    return out


# -- the profile -----------------------------------------------------------------------


def _module_of(event: OpEvent, modules: Mapping[str, HloModule]) -> str | None:
    """The name in `modules` of the event's module: its `hlo_module` (a "(<program
    id>)" suffix dropped), or, when the event names none, the one module holding its op."""
    name = re.sub(r"\(\d+\)$", "", event.module)
    if name in modules:
        return name
    if not name:
        holders = [m for m, module in modules.items() if event.op in module.instructions]
        return holders[0] if len(holders) == 1 else None
    return None


def summarize(events: Iterable[OpEvent], modules: Mapping[str, HloModule],
              steps: int) -> dict:
    """Per-step device time of the events of `modules` (by module name): by category and
    by op, averaged over the devices in the events; events of other modules are only
    totalled (`other_modules_ms_per_step`)."""
    rows: dict[tuple, list] = {}
    other_modules: dict[str, float] = defaultdict(float)
    devices, previous = set(), {}
    for event in sorted(events, key=lambda e: (str(e.line), e.start_us)):
        name = _module_of(event, modules)
        if name is None:
            other_modules[event.module or "(none)"] += event.self_us
            continue
        devices.add(event.device)
        category = classify(modules[name], event.op, event.name)
        row = rows.setdefault((name, event.op, category), [0.0, 0])
        row[0] += event.self_us
        # One op can run as several kernels in a row (a split-K gemm): one call.
        line = (event.device, event.line)  # CPU devices share the host threads.
        if previous.get(line) != (name, event.op):
            row[1] += 1
        previous[line] = (name, event.op)
    per_step = max(len(devices), 1) * steps
    ops = []
    for (module_name, op, category), (us, calls) in rows.items():
        ms, flops = us / per_step / 1e3, matmul_flops(modules[module_name], op)
        ops.append({
            "op": op, "module": module_name, "category": category,
            "source": describe(modules[module_name], op), "ms_per_step": ms,
            "calls_per_step": calls / per_step, "flops_per_call": flops,
            "tflops_per_s": flops * calls / per_step / (ms / 1e3) / 1e12 if ms > 0 else 0.0,
            "in_hlo": op in modules[module_name].instructions,
        })
    ops.sort(key=lambda row: -row["ms_per_step"])
    categories = {c: sum(r["ms_per_step"] for r in ops if r["category"] == c)
                  for c in CATEGORIES}
    total = sum(categories.values())
    matmul_ms = categories["matmul"]
    matmul_flops_per_step = sum(r["flops_per_call"] * r["calls_per_step"] for r in ops
                                if r["category"] == "matmul")
    return {
        "devices_in_trace": len(devices),
        "device_ms_per_step": total,
        "categories": {c: {"ms_per_step": ms, "fraction": ms / total if total else 0.0}
                       for c, ms in categories.items()},
        "matmul_tflops_per_s": (matmul_flops_per_step / (matmul_ms / 1e3) / 1e12
                                if matmul_ms else 0.0),
        "unmatched_ms_per_step": sum(r["ms_per_step"] for r in ops if not r["in_hlo"]),
        "other_modules_ms_per_step": {m: us / per_step / 1e3
                                      for m, us in sorted(other_modules.items())},
        "ops": ops,
    }


def format_report(profile: Mapping, top: int) -> str:
    """The printed profile: totals, categories, the largest matmul ops."""
    env = profile["environment"]
    lines = [
        f"devices: {env['devices']} x {env['device_kind']} ({env['backend']}), "
        f"mesh {env['mesh']}, global batch {profile['global_batch_size']}, "
        f"{profile['steps']} traced steps",
        f"wall time per traced step: {profile['wall_ms_per_step']:.3f} ms",
        f"device time per step: {profile['device_ms_per_step']:.3f} ms "
        f"(ops' self-times, mean over {profile['devices_in_trace']} devices)",
        "",
        f"{'category':<12} {'ms/step':>10} {'share':>7}",
    ]
    for category, row in profile["categories"].items():
        lines.append(f"{category:<12} {row['ms_per_step']:>10.3f} {row['fraction']:>7.1%}")
    lines.append(f"{'total':<12} {profile['device_ms_per_step']:>10.3f} {1:>7.1%}")
    lines.append(f"matmul category: {profile['matmul_tflops_per_s']:.4g} TFLOP/s per device")
    if not profile["devices_in_trace"]:
        lines.append(f"no op events of {', '.join(profile['modules'])} in the trace; "
                     f"programs seen: {', '.join(profile['other_modules_ms_per_step'])}")
    if profile["unmatched_ms_per_step"] > 0:
        lines.append(f"not found in the compiled HLO (counted as other): "
                     f"{profile['unmatched_ms_per_step']:.3f} ms/step")
    matmuls = [r for r in profile["ops"] if r["flops_per_call"] > 0][:top]
    lines += ["", f"top {len(matmuls)} matmul ops by time",
              f"{'op':<24} {'category':<10} {'calls/step':>10} {'ms/step':>9} "
              f"{'GFLOP/call':>11} {'TFLOP/s':>8}  source"]
    several = len(profile["modules"]) > 1  # Op names are only unique within a module.
    for r in matmuls:
        op = f"{r['module'].removeprefix('jit_')}/{r['op']}" if several else r["op"]
        source = r["source"]
        marker = "bwd " if source.startswith("bwd ") else ""
        source = source[len(marker):]
        source = marker + (source if len(source) <= 56 else "..." + source[-53:])
        lines.append(f"{op[:24]:<24} {r['category']:<10} {r['calls_per_step']:>10.3g} "
                     f"{r['ms_per_step']:>9.3f} {r['flops_per_call'] / 1e9:>11.4g} "
                     f"{r['tflops_per_s']:>8.3g}  {source}")
    lines += ["", f"profile: {profile['files']['profile']}",
              f"trace: {profile['files']['trace']}"]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from jaxmedclip import config_lib  # Imports no jax: XLA_FLAGS can still be set after.

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment file, e.g. experiments/x.py")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2, help="untraced steps after compiling")
    parser.add_argument(
        "--cpu_devices", type=int, default=None, help="fake CPU devices (sets XLA_FLAGS)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: $OUT, else a new one under ./profiles/)")
    parser.add_argument("--top", type=int, default=15, help="matmul ops listed")
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.top < 0:
        parser.error("--steps must be >= 1, --warmup and --top >= 0")
    return args, config_lib.override_flags(parser, rest)


def output_dir(out: str | None, config_path: str) -> str:
    """`out`, else $OUT, else a new folder ./profiles/<time>-<config name>."""
    path = out or os.environ.get("OUT")
    if not path:
        stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
        base = os.path.join("profiles",
                            f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{stem}")
        path, n = base, 1
        while os.path.exists(path):
            path, n = f"{base}-{n}", n + 1
    os.makedirs(path, exist_ok=True)
    return path


def _train_step_benchmark():
    spec = importlib.util.spec_from_file_location(
        "train_step_benchmark", os.path.join(REPO, "benchmarks", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_modules(setup, config) -> dict[str, HloModule]:
    """The step's compiled programs (one, or the streamed step's pieces) by module name,
    compiled ahead of time for the mesh as `training.compile_report` does."""
    import flax.linen as nn
    import jax

    from jaxmedclip import training

    pieces = setup.train_step.abstract_pieces(setup.abstract_state,
                                              training.abstract_batch(config))
    modules = {}
    for jitted, args in pieces.values():
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            module = parse_hlo(jitted.lower(*args).compile().as_text())
        modules[module.name] = module
    return modules


def trace_file(trace_dir: str) -> str:
    """The trace-viewer JSON `jax.profiler` wrote last under `trace_dir`."""
    runs = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*"))
    files = glob.glob(os.path.join(max(runs, key=os.path.getmtime), "*.trace.json.gz")) \
        if runs else []
    if not files:
        raise FileNotFoundError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    return files[0]


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, REPO)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    from jaxmedclip import config_lib  # Imports no jax.

    if args.cpu_devices:
        config_lib.add_cpu_devices(args.cpu_devices)
    import jax
    import jaxlib

    from jaxmedclip import training

    config = config_lib.config_from_flags(args.config, overrides)
    out = output_dir(args.out, args.config)
    setup = training.build(config)
    state = training.initial_state(setup, config)
    batch = _train_step_benchmark().random_batch(config, setup.mesh)
    modules = compiled_modules(setup, config)

    state, metrics = setup.train_step(state, batch)  # Compiles.
    for _ in range(args.warmup):
        state, metrics = setup.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    trace_dir = os.path.join(out, "trace")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames are not measured here; they slow steps.
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = setup.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        wall_s = (time.perf_counter() - start) / args.steps
    trace = trace_file(trace_dir)
    trace_events = load_trace(trace)
    if len(trace_events.get("traceEvents", [])) >= TRACE_EVENT_LIMIT:
        print(f"warning: the trace holds {TRACE_EVENT_LIMIT:,} events, the profiler's "
              "limit: later events were dropped and the times are too low; trace fewer "
              "--steps", file=sys.stderr)
    summary = summarize(op_events(trace_events), modules, args.steps)

    profile = {
        "config": args.config,
        "overrides": overrides,
        "global_batch_size": config.global_batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "environment": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "devices": setup.mesh.size,
            "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "modules": sorted(modules),
        "wall_ms_per_step": wall_s * 1e3,
        **summary,
        "files": {"profile": os.path.join(out, "profile.json"), "trace": trace,
                  "perfetto": os.path.join(os.path.dirname(trace), "perfetto_trace.json.gz")},
    }
    with open(profile["files"]["profile"], "w") as f:
        json.dump(profile, f, indent=1)
    print(format_report(profile, args.top))
    return profile


if __name__ == "__main__":
    main()
