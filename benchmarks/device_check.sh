#!/usr/bin/env bash
# The GPU machine's one prepared run: DeepSpeed ZeRO-2/3 with rl-lenbalance, then gpu_regimes.py. Results to $OUT.
# Carried: .whl (trl, transformers, datasets, deepspeed, gguf, scipy wheels for py3.12; the GPU image lacks them) and .gpu/smollm2 (tokenizer).
set -u
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers, trl, deepspeed, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'deepspeed', deepspeed.__version__, 'accelerate', accelerate.__version__)"; } > $OUT/env.txt 2>&1
python3 benchmarks/random_model.py --tokenizer .gpu/smollm2 --out /tmp/rand > /dev/null 2>&1
for stage in ${STAGES-2 3}; do  # STAGES="" skips DeepSpeed
  timeout ${DS_TIMEOUT:-150} python3 -m accelerate.commands.launch --config_file recipes/accelerate/deepspeed_zero$stage.yaml \
    --num_processes 1 -m rl_lenbalance.train --config recipes/random_model_check.yaml \
    --set model.name_or_path=/tmp/rand output_dir=/tmp/ds$stage > /tmp/ds$stage.log 2>&1
  echo "zero$stage exit $?" >> $OUT/env.txt
  tail -n 60 /tmp/ds$stage.log > $OUT/zero${stage}.log
  cp /tmp/ds$stage/lenbalance_summary.json $OUT/zero${stage}_summary.json 2>/dev/null
done
timeout ${REGIMES_TIMEOUT:-300} python3 benchmarks/gpu_regimes.py --out $OUT/gpu_regimes.jsonl --sections ${SECTIONS:-loss,waves,one_call}
echo "regimes exit $?" >> $OUT/env.txt
timeout ${CB_TIMEOUT:-100} python3 benchmarks/gpu_regimes.py --out $OUT/gpu_regimes.jsonl --sections continuous_batching 2>&1 | tail -n 30 > $OUT/cb.log
echo "continuous batching exit $?" >> $OUT/env.txt
# Re-bucketing in the real trainer on the embedded SmolLM2 (built from the repo's GGUF; needs the `gguf` wheel in .whl):
#   REBUCKET_ARGS="--steps 3 --batch 16 --grad-acc 2 --generations 8 --max-length 512 --wave-size 8" STAGES=""
if [ -n "${REBUCKET_ARGS-}" ]; then
  timeout ${REBUCKET_TIMEOUT:-300} python3 benchmarks/rebucket.py $REBUCKET_ARGS --variants one_call waves waves_rebucket \
    --out $OUT/rebucket_gpu.json 2>&1 | grep '^{' > $OUT/rebucket.log
  echo "rebucket exit $?" >> $OUT/env.txt
fi
