#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each and reports executions and
# crashes. Usage: scripts/fuzz.sh [SECONDS=20] [TARGET...]
#   FUZZ_SANITIZER=address  build with ASan (default: none, plain coverage-guided, faster)
#   FUZZ_TARGET_DIR=DIR     cargo target dir for the (nightly) fuzz build
# New inputs found while fuzzing go to a scratch corpus; crashes go to fuzz/artifacts/TARGET/.
# Keep a crash as a regression test by copying it to fuzz/regressions/TARGET/ (replayed by
# `cargo test -p spa-server --test fuzz_regressions` on stable).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame tensor gguf side_weights tokenizer)
sanitizer=${FUZZ_SANITIZER:-none}

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
bash scripts/fetch-assets.sh model >/dev/null   # the tokenizer target reads the real GGUF
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}

t0=$(date +%s)
if ! cargo +nightly fuzz build -s "$sanitizer" >/tmp/spa-fuzz-build.log 2>&1; then
  tail -n 40 /tmp/spa-fuzz-build.log
  echo "fuzz build failed"
  exit 1
fi
echo "fuzz build: $(( $(date +%s) - t0 )) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
crashed=()
printf '%-14s %12s %10s %8s %s\n' target execs exec/s corpus result
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  set +e
  cargo +nightly fuzz run -s "$sanitizer" "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -artifact_prefix="fuzz/artifacts/$t/" >"$work/$t.log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
  units=$(find "$work/$t" -type f | wc -l)
  if [ $rc -eq 0 ]; then
    result=ok
  else
    result="CRASH (rc $rc): $(ls fuzz/artifacts/$t | tail -n 1)"
    crashed+=("$t")
    grep -m 5 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$work/$t.log" || true
  fi
  printf '%-14s %12s %10s %8s %s\n' "$t" "$execs" "$rate" "$units" "$result"
done
echo "fuzz total: $(( $(date +%s) - t0 )) s"
if [ ${#crashed[@]} -gt 0 ]; then
  echo "crashing targets: ${crashed[*]} (inputs in fuzz/artifacts/; copy them to fuzz/regressions/ once fixed)"
  exit 1
fi
