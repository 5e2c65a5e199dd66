#!/usr/bin/env python3
"""A state directory with N stored registrations, for timing a restart (issue 24).

    restart-db.py SRC_STATE_DIR DEST_STATE_DIR [N]

SRC_STATE_DIR is a state directory the daemon wrote with at least one registration (e.g. a
daemon on a temporary state dir and `connectord simulate --devices 1`, stopped with kill -9);
its first registration is repeated N times (1 000 000 by default) with other ids, names and
device addresses, deadlines 10 per millisecond as after a storm, into a copy of the
directory. Then time `connectord run -c <config with state.dir = DEST> --ready-file F` to F
(docs/PERFORMANCE.md, "Restart, after the merge").
"""
import json
import random
import shutil
import sqlite3
import sys

src, dest = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
shutil.rmtree(dest, ignore_errors=True)
shutil.copytree(src, dest)
c = sqlite3.connect(f"{dest}/connectord.db", isolation_level=None)
row = c.execute("SELECT data FROM registrations LIMIT 1").fetchone()
if row is None:
    sys.exit(f"{src}: no stored registration to repeat")
d = json.loads(row[0])
base = d["expires_at_ms"]


def rows():
    for i in range(n):
        d["registered_at_ms"] = base - 86_400_000 + i // 10
        # The daemon's id: 10 hex digits of the milliseconds, then 16 random (issue 24).
        d["id"] = "%010x%016x" % (d["registered_at_ms"] % (1 << 40), random.getrandbits(64))
        d["name"] = "big-%07d" % i
        d["expires_at_ms"] = base + i // 10
        d["peer"]["session"] = "127.0.%d.%d:%d" % (i // 65000 % 250, 1 + i % 250, 30000 + i % 30000)
        yield d["id"], d["domain"], d["name"], json.dumps(d, separators=(",", ":"))


c.execute("BEGIN")
c.execute("DELETE FROM registrations")
c.executemany("INSERT INTO registrations (id, domain, name, data) VALUES (?, ?, ?, ?)", rows())
c.execute("COMMIT")
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print(f"{dest}: {n} registrations")
