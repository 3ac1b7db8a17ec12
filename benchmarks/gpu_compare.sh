#!/usr/bin/env bash
# The one prepared GPU comparison (issue #19): the ViT-B/16 recipe's train step with
# today's settings and with the fast ones, a profile of each, its PyTorch twin eager and
# compiled, and today's settings again (drift check), all on one H100/H200 in one call,
# with no network, in about 9 minutes.
#
#   bash benchmarks/gpu_compare.sh      # env: OUT (results folder), BATCH (256), STEPS (10),
#                                       # BUDGET_S (510), CONFIG (experiments/vit_b16_mimic.py)
#
# A rehearsal of the script's plumbing on CPU (ATTENTION=xla: cuDNN needs a GPU):
#   CONFIG=experiments/tiny_synthetic.py:runlocal BATCH=16 STEPS=2 OUT=/tmp/gc ATTENTION=xla \
#     bash benchmarks/gpu_compare.sh
#
# Results go to $OUT (default ./gpu_compare_out): results.jsonl (one JSON line per timed
# run: impl, samples_per_s, step_time_s (aggregate mean), step_time_median_s
# (per-step synchronised), mfu by jaxmedclip/flops.py's analytic count, peak memory),
# profile_today.json and profile_fast.json (time by category, benchmarks/profile_step.py),
# env.txt and summary.txt (the table, best JAX / torch.compile, drift). Each run is its
# own process under its own timeout: a failure or an out-of-memory ends only that line,
# and a run that would not fit in what is left of BUDGET_S is skipped, said so.
#
# The device image has jax, flax, optax, torch and transformers but not ml_collections:
# carry it as a wheel (here, in the repo root, once):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# and name `.whl` in the device call's `carry`.
set -u
OUT=${OUT:-gpu_compare_out}
mkdir -p "$OUT"
batch=${BATCH:-256}
steps=${STEPS:-10}
budget=${BUDGET_S:-510}
cfg=${CONFIG:-experiments/vit_b16_mimic.py}
attention=${ATTENTION:-cudnn}  # The fast settings' attention kernel.
results=$OUT/results.jsonl
: > "$results"
export PYTHONUNBUFFERED=1
if ! python3 -c "import ml_collections" 2>/dev/null; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is missing: carry its wheel in .whl (see the top of this file)"; exit 2
  fi
fi

# Today's settings (the recipe as it ran at 0.22-0.24 MFU): everything rematerialised,
# scanned layers, XLA attention, the patch convolution, float32 images.
today=(--config.model.remat_policy=full --config.model.scan_layers=True
       --config.model.attention_impl=None --config.model.image.patch_embed=conv
       --config.data.image_dtype=float32)
# The fast settings: cuDNN fused attention (lengths padded to even inside the call),
# matmul outputs saved (only the cheap element-wise work is recomputed), patches as one
# matmul, uint16 images normalised on the device.
fast=(--config.model.remat_policy=save_dots --config.model.scan_layers=True
      --config.model.attention_impl=$attention --config.model.image.patch_embed=dense
      --config.data.image_dtype=uint16)
# The same without rematerialisation or scan (every activation kept, layers unrolled).
fast_unrolled=(--config.model.remat_policy=none --config.model.scan_layers=False
               --config.model.attention_impl=$attention --config.model.image.patch_embed=dense
               --config.data.image_dtype=uint16)

left() { echo $((budget - SECONDS)); }
# run LABEL SECONDS_NEEDED command...: skipped when less than SECONDS_NEEDED are left.
run() {
  local label=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "=== $label: skipped, $(left) s of the budget left"; return; fi
  local limit=$(( $(left) < 200 ? $(left) : 200 ))
  echo "=== $label (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | grep -E "^(devices|global_batch_size|compile_and_first_step_s|step_time|samples_per_s|tflops_per_device|mfu|peak_gib|loss|num_params|total|matmul|attention|elementwise|copies|optimizer|collectives|other|category|device time|wall time)|Error|error:|Traceback" | tail -30
  echo "    (${SECONDS} s elapsed)"
}
jax_step() {
  local label=$1 need=$2; shift 2
  run "$label" "$need" python3 benchmarks/train_step.py --config $cfg --steps "$steps" --warmup 2 \
    --config.global_batch_size="$batch" --json "$results" --label "$label" "$@"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__)"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
  echo "batch $batch, steps $steps, budget $budget s"
} 2>&1 | tee "$OUT/env.txt"

jax_step jax_today 100 "${today[@]}"
jax_step jax_fast 100 "${fast[@]}"
profile() {  # profile LABEL overrides...: the table printed, profile.json kept in $OUT.
  local label=$1; shift
  run "$label" 80 python3 benchmarks/profile_step.py --config $cfg --steps 3 --warmup 2 \
    --config.global_batch_size="$batch" --out "/tmp/$label" "$@"
  cp "/tmp/$label/profile.json" "$OUT/$label.json" 2>/dev/null || echo "    ($label: no profile)"
}
profile profile_today "${today[@]}"
profile profile_fast "${fast[@]}"
# The twin at its best: no activation checkpointing (batch 256 fits without it).
run torch_compile 150 python3 benchmarks/torch_baseline.py --config $cfg --compile \
  --steps "$steps" --warmup 3 --config.global_batch_size="$batch" --config.model.remat=False \
  --json "$results"
run torch_eager 70 python3 benchmarks/torch_baseline.py --config $cfg \
  --steps "$steps" --warmup 3 --config.global_batch_size="$batch" --config.model.remat=False \
  --json "$results"
jax_step jax_fast_unrolled 130 "${fast_unrolled[@]}"
jax_step jax_today_again 90 "${today[@]}"

python3 - "$results" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {r["impl"]: r for r in rows}
fmt = lambda v, f: "na" if v is None else format(v, f)
print(f"{'impl':<20}{'samples/s':>11}{'mean s':>9}{'median s':>10}{'MFU':>7}{'peak GiB':>10}")
for r in rows:
    print(f"{r['impl']:<20}{r['samples_per_s']:>11.1f}{r['step_time_s']:>9.4f}"
          f"{fmt(r.get('step_time_median_s'), '.4f'):>10}{fmt(r.get('mfu'), '.3f'):>7}"
          f"{fmt(r.get('peak_gib_per_device', r.get('peak_gib')), '.1f'):>10}")
jax_rows = [r for r in rows if r["impl"].startswith("jax_") and r["impl"] != "jax_today_again"]
if jax_rows:
    best = max(jax_rows, key=lambda r: r["samples_per_s"])
    print(f"best JAX: {best['impl']} at {best['samples_per_s']:.1f} samples/s, "
          f"MFU {fmt(best.get('mfu'), '.3f')}")
    if "torch_compile" in by:
        print(f"best JAX / torch.compile: {best['samples_per_s'] / by['torch_compile']['samples_per_s']:.2f}x")
if "jax_today" in by and "jax_today_again" in by:
    drift = by["jax_today_again"]["samples_per_s"] / by["jax_today"]["samples_per_s"] - 1
    print(f"drift (today again vs today): {drift:+.1%}")
EOF
echo "done in ${SECONDS} s"
