#!/usr/bin/env bash
# Train-step speed of the reference recipe (experiments/vit_b16_mimic.py: ViT-B/16 224 px +
# 12-layer text tower, bf16, ring loss) on one accelerator, at a few batch sizes, with and
# without rematerialisation, with GradCache micro-batches, and with fused attention. Each variant runs in its own
# process (a failure or an out-of-memory stops only that line). Needs no tensorflow.
#   bash benchmarks/gpu_train_step.sh [steps] [all|cudnn|stream]   # figures in docs/benchmarks.md
# "stream": GradCache streamed from host memory (stream_microbatches) against the un-split
# step of the same batch, and without prefetch (prints stream_overhead, prefetch_saving).
set -u
steps=${1:-10}
only=${2:-all}  # "cudnn": only the baseline line and the fused-attention lines.
cfg=experiments/vit_b16_mimic.py
run() {
  echo "=== $*"
  timeout 150 python3 benchmarks/train_step.py --config $cfg --steps "$steps" --warmup 2 "$@" 2>&1 \
    | grep -E "^(devices|global_batch_size|compile_and_first_step_s|step_time_s|samples_per_s|tflops_per_device|mfu|peak_gib|loss|unsplit_|no_prefetch|stream_overhead|prefetch_saving|num_micro)|Error|error:" | tail -20
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if [ "$only" = stream ]; then
  run --config.global_batch_size=1024 --config.microbatch_size=256 --config.stream_microbatches=True
  run --config.global_batch_size=4096 --config.microbatch_size=256 --config.stream_microbatches=True
  exit 0
fi
run --config.global_batch_size=256
if [ "$only" = all ]; then
  run --config.global_batch_size=256 --config.model.remat=False
  run --config.global_batch_size=512
  run --config.global_batch_size=1024
  run --config.global_batch_size=1024 --config.microbatch_size=256
fi
# Fused attention (jax.nn.dot_product_attention implementation="cudnn").
python3 benchmarks/attention_impl_check.py 2>&1 | tail -3
run --config.global_batch_size=256 --config.model.attention_impl=cudnn
run --config.global_batch_size=512 --config.model.attention_impl=cudnn
run --config.global_batch_size=1024 --config.model.attention_impl=cudnn
