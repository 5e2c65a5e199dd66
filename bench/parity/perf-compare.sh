#!/bin/bash
# perf-compare.sh OLD_DIR NEW_DIR OUT_DIR
# Issue 20's parity check: two built trees (each with target/release/connectord and
# connectord-bench), measured alternately in one run, driven by ONE bench binary (NEW's if
# it exists, else OLD's; BENCH=path overrides, e.g. the old bench when the new one passes
# the daemon a flag the old build lacks) so only the daemon differs:
#   1. callgrind, proxied reads: 2 rounds x (old, new) x (5 000, 15 000 reads)
#   2. callgrind, registrations: 2 rounds x (old, new) x (1 000, 5 000 simulated devices)
#   3. callgrind, notifications (1 device every 10 ms: 100/s evenly spaced, 25 s window): 3 rounds
#      x (old, new);
#      per notification = instructions/s inside the window / delivered/s (see perf-summary.py)
#   4. plain `--registrations --rss` (10 000 simulated devices): 5 pairs (old, new)
# then prints the markdown table (also OUT_DIR/summary.md). Loopback only; every bench run
# is bounded (--timeout-s and an outer timeout). About 11 minutes on the 2-core VM.
# PERF_NICE (default 5): niceness of the whole run; CG_ROUNDS (2), NOTIF_ROUNDS (3) and
# REG_PAIRS (5): repetitions.
set -u
[ $# -eq 3 ] || { echo "usage: $0 OLD_DIR NEW_DIR OUT_DIR" >&2; exit 2; }
tools=$(cd "$(dirname "$0")" && pwd)
old=$(readlink -f "$1") new=$(readlink -f "$2")
mkdir -p "$3/cg" "$3/reg"; out=$(readlink -f "$3")
renice -n "${PERF_NICE:-5}" $$ >/dev/null
ulimit -n 20000 2>/dev/null || true
for d in "$old" "$new"; do
  [ -x "$d/target/release/connectord" ] || { echo "no $d/target/release/connectord" >&2; exit 2; }
done
bench=${BENCH:-$new/target/release/connectord-bench}
[ -x "$bench" ] || bench=$old/target/release/connectord-bench
[ -x "$bench" ] || { echo "no connectord-bench in either tree" >&2; exit 2; }
declare -A dir=([old]=$old [new]=$new)
rev() { git -C "$1" rev-parse --short HEAD 2>/dev/null || echo '?'; }
{ echo "old $old ($(rev "$old"))"; echo "new $new ($(rev "$new"))"; echo "bench $bench"; } > "$out/builds.txt"
log=$out/run.log
t0=$(date +%s)
step() { echo "$(date -u +%T) [+$(( $(date +%s) - t0 ))s] $*" | tee -a "$log" >&2; }
step "start: $(tr '\n' ';' < "$out/builds.txt") load $(cut -d' ' -f1-3 /proc/loadavg)"
fails=0
cg() { # cg NAME BUILD bench-args...
  local name=$1 b=$2; shift 2
  step "callgrind $name (${dir[$b]})"
  "$tools/cg-run.sh" "${dir[$b]}/target/release/connectord" "$bench" "$out/cg/$name" "$@" \
    || { fails=$((fails + 1)); step "FAILED $name (see $out/cg/$name.bench.txt)"; }
  step "  totals: $(tr '\n' ';' < "$out/cg/$name.totals" 2>/dev/null)"
}
for r in $(seq "${CG_ROUNDS:-2}"); do
  for b in old new; do
    for n in 5000 15000; do cg "reads-$b-r$r-n$n" "$b" --reads --read-count "$n"; done
  done
done
for r in $(seq "${CG_ROUNDS:-2}"); do
  for b in old new; do
    for n in 1000 5000; do cg "regs-$b-r$r-n$n" "$b" --registrations --devices "$n"; done
  done
done
for r in $(seq "${NOTIF_ROUNDS:-3}"); do
  for b in old new; do
    cg "notif-$b-r$r-w25" "$b" --notifications --notify-devices 1 \
      --notify-interval-ms 10 --notify-window-s 25
  done
done
for p in $(seq "${REG_PAIRS:-5}"); do
  for b in old new; do
    step "registrations+rss pair $p $b"
    timeout -k 10 300 "$bench" --daemon "${dir[$b]}/target/release/connectord" \
      --registrations --rss --timeout-s 120 --json "$out/reg/reg-$b-p$p.json" \
      > "$out/reg/reg-$b-p$p.txt" 2>&1 \
      || { fails=$((fails + 1)); step "FAILED reg-$b-p$p (see $out/reg/reg-$b-p$p.txt)"; }
  done
done
step "done in $(( $(date +%s) - t0 )) s, $fails failed run(s); load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$tools/perf-summary.py" "$out" | tee "$out/summary.md"
echo "" | tee -a "$out/summary.md"
echo "Wall time $(( $(date +%s) - t0 )) s, $fails failed run(s)." | tee -a "$out/summary.md"
[ "$fails" -eq 0 ]
