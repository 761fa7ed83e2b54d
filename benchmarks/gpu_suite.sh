#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the GPU tests, the kernel benchmarks and the end-to-end
# recorder throughput. Tables land in benchmarks/results/ (named after the GPU) for committing.
#   benchmarks/gpu_suite.sh            (after `make install`; uses .venv/bin/python unless PYTHON is set)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p build benchmarks/results
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stem="benchmarks/results/attention_${gpu}"

echo "== GPU tests on ${gpu}"
$PY -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "build/gpu_tests_${gpu}.txt"

echo "== kernel benchmarks"
for op in attention abmilp; do
  $PY -m pytest "benchmarks/bench_${op}.py" -q -p no:cacheprovider -m gpu \
      --benchmark-save-data --benchmark-json "build/bench_${op}_${gpu}.json"
  $PY benchmarks/report.py "build/bench_${op}_${gpu}.json" "benchmarks/results/${op}_${gpu}"
done

echo "== end to end: recorder vs plain inference"
{
  echo
  echo "## beyond-cls bench analyze (bf16 autocast, batch 256)"
  echo
  for model in vit_base_patch16_224 vit_large_patch16_224; do
    echo "- $($PY -m beyond_cls.cli bench analyze --model "$model" --batch-size 256 --steps 20 --warmup 5)"
  done
  echo
  echo "GPU tests: $(tail -n 1 "build/gpu_tests_${gpu}.txt")"
} | tee -a "${stem}.md"

echo "== end to end: probe parts vs the per-head baseline script"
{
  echo
  echo "## beyond-cls bench probe (vit_base_patch16_224, batch 256, Table 1 heads)"
  echo
  for decode in gpu cpu; do
    echo '```'
    $PY -m beyond_cls.cli bench probe --model vit_base_patch16_224 --batch-size 256 --steps 10 --warmup 3 \
        --num-workers "$(nproc)" --decode "$decode" $([ "$decode" = cpu ] && echo --no-baseline)
    echo '```'
  done
} | tee -a "${stem}.md"

if [ -n "${BEYOND_CLS_WEIGHTS:-}" ]; then
  echo "== encoder zoo with the official files in ${BEYOND_CLS_WEIGHTS}"
  {
    echo
    echo "## beyond-cls zoo --check"
    echo
    $PY -m beyond_cls.cli zoo --check | sed -n '/^|/p'
  } | tee -a "${stem}.md"
  if [ -n "${IMAGENET_ROOT:-}" ]; then  # Table 3: analyze 1,000 validation images (ROOT/val/<class>/) per encoder
    for m in mae_vit_base_patch16 simmim_vit_base_patch16 beitv2_vit_base_patch16 ijepa_vit_huge_patch14 \
             capi_vit_large_patch14 dino_vit_base_patch16; do
      $PY -m beyond_cls.cli analyze --model "$m" --data "$IMAGENET_ROOT" --split val --max-images 1000 \
          --batch-size 250 --out "build/table3/$m" --no-progress || echo "$m: not analyzed (file missing?)"
    done
    runs=$(for d in build/table3/*/; do [ -f "$d/attention_stats.json" ] && echo "$d"; done)
    [ -n "$runs" ] && $PY -m beyond_cls.cli compare $runs --out build/table3/compare
    sed -n '/Table 3/,/^$/p' build/table3/compare/report.md | tee -a "${stem}.md"
  fi
fi
