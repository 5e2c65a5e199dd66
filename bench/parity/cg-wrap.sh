#!/bin/bash
# Passed to connectord-bench as --daemon: runs the daemon ($CG_BIN) under callgrind.
# Not `exec`: the bench ends its daemon with kill -9, which would lose every count since the
# last dump. Here the kill ends only this shell; valgrind lives on as an orphan, and cg-run.sh
# (which reads "$CG_OUT.pids") dumps its last counts and then ends it.
set -u
: "${CG_BIN:?daemon binary}" "${CG_OUT:?callgrind output prefix}"
valgrind --tool=callgrind --callgrind-out-file="$CG_OUT.%p" "$CG_BIN" "$@" &
vg=$!
echo "$$ $vg" >> "$CG_OUT.pids"
wait "$vg"
