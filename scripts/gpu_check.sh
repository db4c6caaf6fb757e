#!/usr/bin/env bash
# The GPU check: the whole pipeline on tiny models (the smoke profile) on a CUDA device, twice:
#   t4 path   - fp16 weights and autocast with its GradScaler, 4-bit nf4 generator and QLoRA target
#               (bitsandbytes' CUDA kernels), paged AdamW, gradient checkpointing;
#   a100 path - bf16 weights and autocast, no quantization.
# These are the code paths of the t4 / a100 / h100 profiles that CPU tests cannot reach.
# Usage: scripts/gpu_check.sh [WORKDIR]   (default: a temporary folder). Exit status: failed variants.
set -u
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cd "$(dirname "$0")/.."
python3 - <<'PY' || exit 1
import torch, transformers, peft, trl, lm_eval, bitsandbytes
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}, lm_eval {lm_eval.__version__}, bitsandbytes {bitsandbytes.__version__}")
PY
common=(--profile smoke --set hardware.device=cuda)
t4=(--set hardware.dtype=float16 --set hardware.generation_dtype=float16 --set hardware.load_in_4bit=true
    --set sft.optim=paged_adamw_32bit --set sft.gradient_checkpointing=true --set dpo.gradient_checkpointing=true)
a100=(--set hardware.dtype=bfloat16 --set hardware.generation_dtype=bfloat16)
failed=0
for variant in t4 a100; do
  declare -n extra=$variant
  start=$(date +%s)
  if python3 run_all.py "${common[@]}" "${extra[@]}" --run-dir "$work/$variant" > "$work/$variant.log" 2>&1; then
    status=ok
  else
    status="FAILED (log: $work/$variant.log)"; failed=$((failed + 1)); tail -n 5 "$work/$variant.log"
    last=$(ls -t "$work/$variant"/logs/*.log 2>/dev/null | head -n 1)
    [ -n "$last" ] && tail -n 30 "$last"
  fi
  echo "== $variant path: $status in $(( $(date +%s) - start )) s"
  python3 - "$work/$variant" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
ledger = run / "ledger.jsonl"
for row in (json.loads(l) for l in ledger.read_text().splitlines() if l.strip()) if ledger.exists() else []:
    print(f"  {row.get('step'):26} {row.get('status', ''):9} {row.get('seconds', 0):7.1f} s  "
          f"peak GPU {row.get('peak_gpu_mb')} MB  device {row.get('device')}")
summary = run / "eval" / "summary.json"
if summary.exists():
    metrics = json.loads(summary.read_text())["metrics"]
    for method, tasks in metrics.items():
        scores = {t: round(m.get("prompt_level_strict_acc", {}).get("value", float("nan")), 3) for t, m in tasks.items()}
        print(f"  eval {method:14} {scores}")
PY
done
exit $failed
