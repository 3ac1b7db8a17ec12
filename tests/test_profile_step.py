"""benchmarks/profile_step.py: HLO parsing, op categories and FLOPs on hand-written HLO,
trace events of CPU- and GPU-shaped traces, a real CPU trace of a small program, and
(slow) the script's whole run on a tiny config."""

# ruff: noqa: E501
# (The HLO lines below are as long as XLA writes them.)

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = importlib.util.spec_from_file_location(
    "profile_step", os.path.join(REPO, "benchmarks", "profile_step.py")
)
profile_step = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = profile_step  # Its dataclasses look their module up.
SPEC.loader.exec_module(profile_step)

HLO = r"""HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,16]{1,0})->f32[8,32]{1,0}}

%add_reducer (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused_dot (param_0: f32[8,16], param_1: f32[16,32]) -> f32[8,32] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,32]{1,0} parameter(1)
  %dot.1 = f32[8,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(TwoTower)/image_tower/encoder/block_0/mlp/fc1/dot_general" stack_frame_id=3}
  ROOT %tanh.1 = f32[8,32]{1,0} tanh(%dot.1), metadata={op_name="jit(step)/jvp(TwoTower)/image_tower/encoder/block_0/mlp/gelu/tanh"}
}

%fused_transpose (param_0.1: f32[8,32]) -> f32[32,8] {
  %param_0.1 = f32[8,32]{1,0} parameter(0)
  %transpose.1 = f32[32,8]{0,1} transpose(%param_0.1), dimensions={1,0}
  ROOT %copy.1 = f32[32,8]{1,0} copy(%transpose.1)
}

%fused_update (param_0.2: f32[4,8,32], param_1.2: f32[8,32], param_2.2: s32[]) -> f32[4,8,32] {
  %param_0.2 = f32[4,8,32]{2,1,0} parameter(0)
  %param_1.2 = f32[8,32]{1,0} parameter(1)
  %multiply.2 = f32[8,32]{1,0} multiply(%param_1.2, %param_1.2)
  %bitcast.2 = f32[1,8,32]{2,1,0} bitcast(%multiply.2)
  %param_2.2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.2 = f32[4,8,32]{2,1,0} dynamic-update-slice(%param_0.2, %bitcast.2, %param_2.2, %constant.2, %constant.2)
}

%fused_gelu (param_0.3: f32[8,32]) -> f32[8,32] {
  %param_0.3 = f32[8,32]{1,0} parameter(0)
  %multiply.3 = f32[8,32]{1,0} multiply(%param_0.3, %param_0.3)
  ROOT %tanh.3 = f32[8,32]{1,0} tanh(%multiply.3), metadata={op_name="jit(step)/jvp(TwoTower)/text_tower/encoder/block_0/mlp/gelu/tanh"}
}

%fused_softmax (param_0.4: f32[4,64,64]) -> f32[4,64,64] {
  %param_0.4 = f32[4,64,64]{2,1,0} parameter(0)
  ROOT %exponential.4 = f32[4,64,64]{2,1,0} exponential(%param_0.4), metadata={op_name="jit(step)/jvp(TwoTower)/image_tower/encoder/block_0/attn/dot_product_attention/exp"}
}

%fused_adam (param_0.5: f32[16,32], param_1.5: f32[16,32]) -> f32[16,32] {
  %param_0.5 = f32[16,32]{1,0} parameter(0)
  %param_1.5 = f32[16,32]{1,0} parameter(1)
  ROOT %add.5 = f32[16,32]{1,0} add(%param_0.5, %param_1.5), metadata={op_name="jit(step)/optimizer/add"}
}

ENTRY %main.1 (p0: f32[8,16], p1: f32[16,32], p2: f32[4,64,32], p3: f32[4,64,32], p4: f32[4,8,32], p5: s32[], p6: f32[2,8,8,3], /*index=7*/p7: f32[2,2,3,8]) -> f32[8,32] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  %p2 = f32[4,64,32]{2,1,0} parameter(2)
  %p3 = f32[4,64,32]{2,1,0} parameter(3)
  %p4 = f32[4,8,32]{2,1,0} parameter(4)
  %p5 = s32[] parameter(5)
  %p6 = f32[2,8,8,3]{3,2,1,0} parameter(6)
  %p7 = f32[2,2,3,8]{3,2,1,0} parameter(7)
  %dot.10 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(TwoTower)/text_proj/dot_general"}
  %mlp_fusion = f32[8,32]{1,0} fusion(%p0, %p1), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/jvp(TwoTower)/image_tower/encoder/block_0/mlp/gelu/tanh"}
  %cublas-gemm.1 = (f32[8,32]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %scores = f32[4,64,64]{2,1,0} dot(%p2, %p3), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/transpose(jvp(TwoTower))/image_tower/encoder/block_0/attn/dot_product_attention/dot_general"}
  %softmax_fusion = f32[4,64,64]{2,1,0} fusion(%scores), kind=kLoop, calls=%fused_softmax
  %cudnn-fmha.1 = (f32[4,64,1,32]{3,2,1,0}, u8[0]{0}) custom-call(%p2, %p3, %p3), custom_call_target="__cudnn$fmhaSoftmax"
  %transpose_fusion = f32[32,8]{1,0} fusion(%dot.10), kind=kLoop, calls=%fused_transpose
  %update_fusion = f32[4,8,32]{2,1,0} fusion(%p4, %dot.10, %p5), kind=kLoop, calls=%fused_update
  %bitcast.9 = f32[1,8,32]{2,1,0} bitcast(%dot.10)
  %c0 = s32[] constant(0)
  %dynamic-update-slice.9 = f32[4,8,32]{2,1,0} dynamic-update-slice(%p4, %bitcast.9, %p5, %c0, %c0)
  %all-reduce.1 = f32[8,32]{1,0} all-reduce(%dot.10), channel_id=1, replica_groups={{0,1}}, to_apply=%add_reducer
  %all-reduce-start.2 = f32[8,32]{1,0} all-reduce-start(%dot.10), channel_id=2, replica_groups={{0,1}}, to_apply=%add_reducer
  %adam_fusion = f32[16,32]{1,0} fusion(%p1, %p1), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/optimizer/add"}
  %add.11 = f32[16,32]{1,0} add(%p1, %p1), metadata={op_name="jit(step)/optimizer/add"}
  %gelu_fusion = f32[8,32]{1,0} fusion(%dot.10), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/jvp(TwoTower)/text_tower/encoder/block_0/mlp/gelu/tanh"}
  %patch_embed = f32[2,4,4,8]{3,2,1,0} convolution(%p6, %p7), window={size=2x2 stride=2x2}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/jvp(TwoTower)/image_tower/patch_embed/conv_general_dilated"}
  %custom-call.9 = f32[8,32]{1,0} custom-call(%dot.10), custom_call_target="my_kernel"
  ROOT %out = f32[8,32]{1,0} add(%mlp_fusion, %gelu_fusion)
}
"""


@pytest.fixture(scope="module")
def module():
    return profile_step.parse_hlo(HLO)


def test_parse_hlo_reads_names_opcodes_fusions_and_metadata(module):
    assert module.name == "jit_step"
    fusion = module.instructions["mlp_fusion"]
    assert (fusion.opcode, fusion.kind, fusion.calls) == ("fusion", "kOutput", ("fused_dot",))
    assert fusion.operands == ("p0", "p1")
    gemm = module.instructions["cublas-gemm.1"]
    assert gemm.opcode == "custom-call" and gemm.target == "__cublas$gemm"
    assert gemm.shape == "(f32[8,32]{1,0}, s8[4194304]{0})"
    assert module.instructions["scores"].op_name.endswith("dot_product_attention/dot_general")
    assert module.roots["fused_softmax"] == "exponential.4"
    assert module.computations["fused_dot"] == ("param_0", "param_1", "dot.1", "tanh.1")
    assert [i.name for i in profile_step.fused_body(module, fusion)] == [
        "param_0", "param_1", "dot.1", "tanh.1"]


@pytest.mark.parametrize("op, category", [
    ("dot.10", "matmul"),
    ("mlp_fusion", "matmul"),  # A fusion whose body holds a dot.
    ("cublas-gemm.1", "matmul"),
    ("patch_embed", "matmul"),
    ("scores", "attention"),  # A dot in the dot_product_attention scope.
    ("softmax_fusion", "attention"),  # Its fused root is in the scope.
    ("cudnn-fmha.1", "attention"),  # cuDNN fused attention, whatever its scope.
    ("adam_fusion", "optimizer"),
    ("add.11", "optimizer"),  # The name scope wins over the op kind (elementwise).
    ("transpose_fusion", "copies"),
    ("update_fusion", "copies"),  # Holds a dynamic-update-slice.
    ("dynamic-update-slice.9", "copies"),
    ("all-reduce.1", "collectives"),
    ("all-reduce-start.2", "collectives"),
    ("gelu_fusion", "elementwise"),
    ("out", "elementwise"),
    ("custom-call.9", "other"),
    ("no_such_op.3", "other"),
])
def test_classify(module, op, category):
    assert profile_step.classify(module, op) == category


def test_classify_memcpy_events_and_unknown_modules(module):
    assert profile_step.classify(module, "no_such_op.3", "MemcpyD2D") == "copies"
    assert profile_step.classify(module, "no_such_op.3", "Memset") == "copies"
    assert profile_step.classify(None, "dot.10") == "other"


def test_matmul_flops_from_shapes(module):
    flops = profile_step.matmul_flops
    assert flops(module, "dot.10") == 2 * 8 * 32 * 16
    assert flops(module, "mlp_fusion") == 2 * 8 * 32 * 16
    assert flops(module, "cublas-gemm.1") == 2 * 8 * 32 * 16  # The first tuple element.
    assert flops(module, "scores") == 2 * (4 * 64 * 64) * 32  # Batch dims in the output.
    assert flops(module, "patch_embed") == 2 * (2 * 4 * 4 * 8) * (2 * 2 * 3)
    assert flops(module, "gelu_fusion") == 0
    assert flops(module, "cudnn-fmha.1") == 0
    assert flops(module, "no_such_op.3") == 0
    # Operands written with their shapes (older HLO text).
    old = profile_step.parse_hlo(
        "HloModule m\n\nENTRY %e (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {\n"
        "  ROOT %dot.7 = f32[8,32]{1,0} dot(f32[8,16]{1,0} %a, f32[16,32]{1,0} %b), "
        "lhs_contracting_dims={1}, rhs_contracting_dims={0}\n}\n")
    assert flops(old, "dot.7") == 2 * 8 * 32 * 16


def test_describe_drops_transform_wrappers(module):
    assert profile_step.describe(module, "scores") == (
        "bwd image_tower/encoder/block_0/attn/dot_product_attention/dot_general")
    assert profile_step.describe(module, "mlp_fusion") == (
        "image_tower/encoder/block_0/mlp/fc1/dot_general")


def _op(name, ts, dur, *, pid=1, tid=10, device=0, module="jit_step", op=None):
    args = {"hlo_op": op or name, "hlo_module": module, "device_ordinal": str(device)}
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": args}


def test_cpu_trace_self_times_devices_and_other_modules(module):
    trace = {"traceEvents": [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name",
         "args": {"name": "tf_XLAEigen/1"}},
        {"ph": "X", "pid": 1, "tid": 11, "ts": 0, "dur": 400, "name": "PjitFunction(step)"},
        _op("while.1", 0, 100),  # A loop: its body's ops nest in it on the same thread.
        _op("dot.10", 10, 30),
        _op("gelu_fusion", 50, 20),
        # Not an op: inside an op, it is part of the op's time.
        {"ph": "X", "pid": 1, "tid": 10, "ts": 75, "dur": 10, "name": "Await"},
        _op("dot.10", 200, 40, device=1),
        _op("copy.3", 300, 5, module="jit_other"),
    ]}
    events = profile_step.op_events(trace)
    assert sorted((e.op, e.self_us, e.device) for e in events) == [
        ("copy.3", 5.0, "/host:CPU:0"), ("dot.10", 30.0, "/host:CPU:0"),
        ("dot.10", 40.0, "/host:CPU:1"), ("gelu_fusion", 20.0, "/host:CPU:0"),
        ("while.1", 50.0, "/host:CPU:0")]
    summary = profile_step.summarize(events, {"jit_step": module}, steps=1)
    assert summary["devices_in_trace"] == 2
    ms = {c: row["ms_per_step"] for c, row in summary["categories"].items()}
    assert ms["matmul"] == pytest.approx((30 + 40) / 2 / 1e3)  # Mean over the 2 devices.
    assert ms["elementwise"] == pytest.approx(20 / 2 / 1e3)
    assert ms["other"] == pytest.approx(50 / 2 / 1e3)  # while.1 is not in the HLO.
    assert summary["device_ms_per_step"] == pytest.approx(sum(ms.values()))
    assert summary["unmatched_ms_per_step"] == pytest.approx(50 / 2 / 1e3)
    assert summary["other_modules_ms_per_step"] == {"jit_other": pytest.approx(5 / 2 / 1e3)}
    dot = next(r for r in summary["ops"] if r["op"] == "dot.10")
    assert dot["calls_per_step"] == 1.0 and dot["flops_per_call"] == 8192
    assert dot["tflops_per_s"] == pytest.approx(8192 / 35e-6 / 1e12)


def test_gpu_trace_uses_device_streams_and_merges_kernels_of_one_op(module):
    trace = {"traceEvents": [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
         "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}},
        _op("cublas-gemm.1", 0, 500, pid=1, tid=5),  # A host-side annotation: not counted.
        _op("sm90_xmma_gemm_f32", 0, 10, pid=2, tid=7, op="cublas-gemm.1"),
        _op("splitKreduce_kernel", 10, 2, pid=2, tid=7, op="cublas-gemm.1"),
        _op("loop_tanh_fusion", 20, 3, pid=2, tid=7, op="gelu_fusion", module="jit_step(42)"),
        _op("MemcpyD2D", 30, 1, pid=2, tid=7, op="copy.77"),
        _op("transpose_kernel", 35, 2, pid=2, tid=7, op="transpose_fusion", module=""),
        _op("ncclDevKernel_AllReduce_Sum_f32", 40, 8, pid=2, tid=7, op="all-reduce-start.2"),
        _op("fusion_kernel", 50, 1, pid=2, tid=7, op="fusion.999"),
        _op("convert_kernel", 60, 4, pid=2, tid=7, op="convert.1", module="jit_convert"),
        _op("cublas-gemm.1", 0, 12, pid=2, tid=99),  # The derived line repeats the ops.
    ]}
    events = profile_step.op_events(trace)
    assert {e.device for e in events} == {"/device:GPU:0"}
    assert len(events) == 8
    summary = profile_step.summarize(events, {"jit_step": module}, steps=1)
    us = {c: row["ms_per_step"] * 1e3 for c, row in summary["categories"].items()}
    assert us == pytest.approx({"matmul": 12.0, "attention": 0.0, "optimizer": 0.0,
                                "copies": 3.0, "collectives": 8.0, "elementwise": 3.0,
                                "other": 1.0})
    gemm = next(r for r in summary["ops"] if r["op"] == "cublas-gemm.1")
    assert gemm["calls_per_step"] == 1.0  # Two kernels in a row: one call.
    assert gemm["tflops_per_s"] == pytest.approx(8192 / 12e-6 / 1e12)
    assert summary["unmatched_ms_per_step"] == pytest.approx((1.0 + 1.0) / 1e3)
    assert set(summary["other_modules_ms_per_step"]) == {"jit_convert"}


@pytest.mark.slow  # 20 s; a small program's real trace (below) stays in the default run.
def test_profile_of_a_tiny_config_on_cpu(tmp_path, capsys):
    import jax

    from jaxmedclip import config_lib, flops

    out = tmp_path / "profile"
    experiment = "experiments/tiny_synthetic.py:runlocal"
    overrides = ["global_batch_size=16", "model.image.depth=1", "model.text.depth=1"]
    profile = profile_step.main(
        ["--config", experiment, *[f"--config.{o}" for o in overrides],
         "--steps", "1", "--warmup", "0", "--out", str(out), "--top", "5"])
    printed = capsys.readouterr().out

    categories = profile["categories"]
    assert list(categories) == list(profile_step.CATEGORIES)
    total = profile["device_ms_per_step"]
    assert total > 0
    assert sum(c["ms_per_step"] for c in categories.values()) == pytest.approx(total)
    assert sum(c["fraction"] for c in categories.values()) == pytest.approx(1.0)
    for category in ("matmul", "attention", "optimizer", "elementwise") + (
            ("collectives",) if len(jax.devices()) > 1 else ()):
        assert categories[category]["ms_per_step"] > 0, category
    assert profile["unmatched_ms_per_step"] == 0  # Every op event found in the HLO.
    assert profile["devices_in_trace"] == len(jax.devices())
    assert profile["modules"] == ["jit_train_step"]
    # No loops in this model: every op ran once per step on every device.
    assert {r["calls_per_step"] for r in profile["ops"]} == {1.0}
    # The matmul FLOPs read off the compiled HLO agree with the analytic count.
    config = config_lib.config_from_flags(experiment, overrides)
    measured = sum(r["flops_per_call"] * r["calls_per_step"] for r in profile["ops"])
    assert measured * len(jax.devices()) == pytest.approx(
        flops.train_flops_per_step(config), rel=0.1)
    matmuls = [r for r in profile["ops"] if r["flops_per_call"] > 0]
    assert {r["category"] for r in matmuls} == {"matmul", "attention"}
    assert all(r["tflops_per_s"] > 0 for r in matmuls)

    with open(out / "profile.json") as f:
        assert json.load(f) == json.loads(json.dumps(profile))
    assert profile["environment"]["jax"] == jax.__version__
    assert profile["overrides"] == overrides
    assert os.path.exists(profile["files"]["perfetto"])
    for category in profile_step.CATEGORIES:
        assert f"\n{category} " in printed
    assert "top 5 matmul ops by time" in printed
    assert max(matmuls, key=lambda r: r["ms_per_step"])["op"][:24] in printed


def test_output_dir_is_out_then_env_then_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "env_out"))
    assert profile_step.output_dir(str(tmp_path / "given"), "x.py") == str(tmp_path / "given")
    assert profile_step.output_dir(None, "x.py") == str(tmp_path / "env_out")
    monkeypatch.delenv("OUT")
    first = profile_step.output_dir(None, "experiments/tiny_synthetic.py:runlocal")
    second = profile_step.output_dir(None, "experiments/tiny_synthetic.py:runlocal")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert os.path.dirname(first) == "profiles" and first.endswith("-tiny_synthetic")


def test_real_cpu_trace_of_a_small_program(tmp_path):
    """A real jax.profiler trace of a small jitted program with the model's two name
    scopes: every op event is found in its compiled HLO and lands in its category."""
    import jax
    import jax.numpy as jnp

    def step(w, x):
        with jax.named_scope(profile_step.ATTENTION_SCOPE):
            attention = jax.nn.softmax(x @ x.T, axis=-1) @ x
        y = jnp.tanh(attention @ w)
        with jax.named_scope(profile_step.OPTIMIZER_SCOPE):
            w = w - 0.01 * jnp.sign(w) * jnp.sum(y)
        return w, y

    jitted = jax.jit(step)
    w, x = jnp.ones((64, 64)), jnp.ones((128, 64)) / 8
    module = profile_step.parse_hlo(jitted.lower(w, x).compile().as_text())
    jax.block_until_ready(jitted(w, x))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(jitted(w, x))
    events = profile_step.op_events(profile_step.load_trace(
        profile_step.trace_file(str(tmp_path))))
    summary = profile_step.summarize(events, {module.name: module}, steps=2)
    assert summary["devices_in_trace"] == 1
    assert summary["unmatched_ms_per_step"] == 0
    categories = summary["categories"]
    for category in ("matmul", "attention", "optimizer"):
        assert categories[category]["ms_per_step"] > 0, (category, summary["ops"])
    assert sum(c["fraction"] for c in categories.values()) == pytest.approx(1.0)
    matmuls = {r["category"] for r in summary["ops"] if r["flops_per_call"] > 0}
    assert matmuls == {"matmul", "attention"}
