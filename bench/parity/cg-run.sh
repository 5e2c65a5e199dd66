#!/bin/bash
# cg-run.sh DAEMON BENCH OUT_PREFIX [bench args...]
# Runs BENCH once with DAEMON under callgrind (via cg-wrap.sh), dumps each daemon every
# second (callgrind_control -d PID, only our own valgrind processes), and when the bench has
# killed a daemon (its wrapper shell gone) dumps that daemon's last counts and kills it.
# Writes OUT_PREFIX.bench.txt (bench output), OUT_PREFIX.json (bench JSON) and
# OUT_PREFIX.totals ("pid instructions dumps" per daemon, in start order) and OUT_PREFIX.series
# (one line per dump), OUT_PREFIX.ends (when each daemon was seen killed), then removes the
# dumps.
set -u
here=$(cd "$(dirname "$0")" && pwd)
daemon=$(readlink -f "$1") bench=$(readlink -f "$2") out=$3; shift 3
mkdir -p "$(dirname "$out")"
rm -f "$out".pids "$out".ends "$out".totals "$out".series "$out".[0-9]*
export CG_BIN=$daemon CG_OUT=$out
: > "$out.pids"
# Bounded: the bench's own phase limit plus an outer one.
timeout -k 10 420 "$bench" --daemon "$here/cg-wrap.sh" --timeout-s 150 --json "$out.json" "$@" \
  > "$out.bench.txt" 2>&1 &
bp=$!
# tick: dump every live daemon; finish the orphans (wrapper gone). final: finish all.
declare -A finished
reap() {
  local w v
  while read -r w v; do
    [ -n "$v" ] && [ -z "${finished[$v]:-}" ] && kill -0 "$v" 2>/dev/null || continue
    if [ "$1" = final ] || ! kill -0 "$w" 2>/dev/null || \
       grep -q '^State:.*zombie' "/proc/$w/status" 2>/dev/null; then
      echo "$v $(date +%s.%N) $1" >> "$out.ends"   # when the bench's kill was seen
      timeout 20 callgrind_control -d "$v" >/dev/null 2>&1
      kill -KILL "$v" 2>/dev/null
      finished[$v]=1
    elif [ "$1" = tick ]; then
      timeout 20 callgrind_control -d "$v" >/dev/null 2>&1
    fi
  done < "$out.pids"
}
i=0
while kill -0 "$bp" 2>/dev/null; do
  if [ $((i % 4)) -eq 0 ]; then reap tick; else reap orphans; fi
  i=$((i + 1)); sleep 0.25
done
wait "$bp"; rc=$?
reap final
sleep 0.5
# Sum every dump's "summary:" (instructions, Ir) per daemon.
while read -r w v; do
  [ -n "$v" ] || continue
  n=$(ls "$out.$v" "$out.$v".* 2>/dev/null | wc -l)
  tot=$(cat "$out.$v" "$out.$v".* 2>/dev/null | awk '/^summary:/ {s += $2} END {printf "%.0f", s}')
  echo "$v $tot $n"
done < "$out.pids" > "$out.totals"
# The time series (one line per dump: pid, part, mtime, instructions since the previous dump).
while read -r w v; do
  [ -n "$v" ] || continue
  for f in "$out.$v" "$out.$v".*; do
    [ -e "$f" ] || continue
    part=${f#"$out.$v"}; part=${part#.}
    echo "$v ${part:-end} $(stat -c %.3Y "$f") $(awk '/^summary:/ {print $2}' "$f")"
  done | sort -k3,3n
done < "$out.pids" > "$out.series"
[ -n "${CG_KEEP:-}" ] || rm -f "$out".[0-9]*   # CG_KEEP=1 keeps the dumps for callgrind_annotate
echo "bench exit $rc" >> "$out.bench.txt"
exit "$rc"
