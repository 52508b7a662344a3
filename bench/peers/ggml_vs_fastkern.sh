#!/usr/bin/env bash
# ggml's MUL_MAT against fastkern in one run window: for each ISA, ROUNDS rounds of
# (ggml_mulmat, fastkern-bench), each run under the exclusive CPU lock, then the table.
#
#   bench/peers/ggml_vs_fastkern.sh GGML_SRC AVX2_BUILD NATIVE_BUILD OUTDIR
#
# GGML_SRC: a ggml checkout; AVX2_BUILD / NATIVE_BUILD: its two build directories (built by
# run_ggml.sh on first use); OUTDIR: where the JSON/text of every run and table.md go.
# fastkern is whatever `import fastkern` finds (set PYTHONPATH to time a worktree).
# Environment (defaults):
#   ISAS="avx2 native"   ROUNDS=2
#   SHAPES=4096x4096,11008x4096,4096x11008,4096x14336   M=1,16
#   FK_BENCH=/work/venv/bin/fastkern-bench   FK_PEERS=fbgemm   FK_LOCK=/tmp/fk-cpu.lock
#   GGML_ARGS=""  (more ggml_mulmat options)
# For ISA avx2, fastkern and its peers are capped to AVX2 with FASTKERN_CPU_ISA=avx2
# ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2; ggml is capped by its build flags.
set -euo pipefail
if [[ $# -ne 4 ]]; then sed -n '2,19p' "$0"; exit 2; fi
src="$1"; avx2_build="$2"; native_build="$3"; outdir="$4"
here="$(cd "$(dirname "$0")" && pwd)"
ISAS="${ISAS:-avx2 native}"; ROUNDS="${ROUNDS:-2}"
SHAPES="${SHAPES:-4096x4096,11008x4096,4096x11008,4096x14336}"; M="${M:-1,16}"
GGML_ARGS="${GGML_ARGS:-}"
FK_BENCH="${FK_BENCH:-/work/venv/bin/fastkern-bench}"; FK_PEERS="${FK_PEERS:-fbgemm}"
export FK_LOCK="${FK_LOCK-/tmp/fk-cpu.lock}"
mkdir -p "$outdir"

excl() { if [[ -n "$FK_LOCK" ]]; then flock -x "$FK_LOCK" "$@"; else "$@"; fi; }

for isa in $ISAS; do
  if [[ "$isa" == avx2 ]]; then
    build="$avx2_build"
    caps=(FASTKERN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)
  else
    build="$native_build"; caps=()
  fi
  for r in $(seq 1 "$ROUNDS"); do
    echo "== $isa round $r: ggml ($(date -u +%H:%M:%S))"
    # shellcheck disable=SC2086
    "$here/run_ggml.sh" --isa "$isa" "$src" "$build" --shapes "$SHAPES" --m "$M" \
        --json "$outdir/ggml-$isa-$r.json" $GGML_ARGS | tee "$outdir/ggml-$isa-$r.txt"
    echo "== $isa round $r: fastkern ($(date -u +%H:%M:%S))"
    excl env "${caps[@]}" "$FK_BENCH" --ops w4a16,w4a8,w8a8,w8a16 --shapes "$SHAPES" --m "$M" --dtypes fp32 \
        --peers "$FK_PEERS" --plain --no-progress --json "$outdir/fk-$isa-$r.json" > "$outdir/fk-$isa-$r.txt"
    grep -E "^(4096|11008)x|read bandwidth" "$outdir/fk-$isa-$r.txt" | grep -E "fastkern|FBGEMM|bandwidth" || true
  done
done
python3 "$here/ggml_vs_fastkern.py" "$outdir" | tee "$outdir/table.md"
