#!/usr/bin/env python3
"""perf-summary.py OUT_DIR: the markdown table of a perf-compare.sh run.

Reads OUT_DIR/cg/*.totals + *.json (callgrind runs) and OUT_DIR/reg/*.json (plain runs).
Per read = (instructions at 15 000 reads - at 5 000) / (answered at 15 000 - at 5 000).
Per registration = (instructions at 5 000 devices - at 1 000) / 4 000.
Per notification: instructions/s inside the counting window over delivered/s (below), the
long-poll daemon (started first) and the webhook daemon (second) apart.
"""
import json, os, re, statistics, sys

out = sys.argv[1]
cg, reg = os.path.join(out, "cg"), os.path.join(out, "reg")
labels = {}
try:
    for line in open(os.path.join(out, "builds.txt")):
        k, v = line.rstrip("\n").split(" ", 1)
        labels[k] = v
except OSError:
    pass


def totals(prefix):
    """[(pid, instructions, dump files)] in daemon start order."""
    try:
        rows = [l.split() for l in open(prefix + ".totals") if l.strip()]
    except OSError:
        return []
    return [(r[0], int(r[1]), int(r[2])) for r in rows if len(r) >= 3 and r[1].isdigit()]


def results(path):
    try:
        return json.load(open(path))["results"]
    except (OSError, ValueError, KeyError):
        return []


def find(res, start):
    return next((r for r in res if r["scenario"].startswith(start)), None)


def fmt(x, d=0):
    if x is None:
        return "n/a"
    return f"{x:,.{d}f}".replace(",", " ")


def pct(a, b):
    if a is None or b is None or a == 0:
        return "n/a"
    return f"{(b - a) / a * 100:+.1f} %"


def spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return "n/a"
    m = statistics.mean(xs)
    return f"{(max(xs) - min(xs)) / m * 100:.1f} %"


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


builds = ["old", "new"]
lines = []
P = lines.append
P(f"Builds: old = {labels.get('old', '?')}, new = {labels.get('new', '?')}; "
  f"bench = {labels.get('bench', '?')}")
P("")

def rounds_of(kind):
    """The round numbers of the `kind` runs (reads, regs) found in the callgrind folder."""
    if not os.path.isdir(cg):
        return []
    return sorted({int(m.group(1)) for f in os.listdir(cg)
                   if (m := re.match(kind + r"-\w+-r(\d+)-n", f))})


def heading(title, columns):
    """A table's title and header rows."""
    P(f"### {title}")
    P("")
    P("| " + " | ".join(columns) + " |")
    P("|" + "---|" * len(columns))


# --- reads ---
per_read = {b: [] for b in builds}
heading("User-space instructions per proxied read (callgrind)",
        ["Round", "Build", "Instr. at 5 000", "Instr. at 15 000", "Answered 5k / 15k", "Per read"])
for r in rounds_of("reads"):
    for b in builds:
        t5, t15 = totals(f"{cg}/reads-{b}-r{r}-n5000"), totals(f"{cg}/reads-{b}-r{r}-n15000")
        a = []
        for n in (5000, 15000):
            row = find(results(f"{cg}/reads-{b}-r{r}-n{n}.json"), "proxied reads")
            m = row and re.search(r"(\d+) answered", row["detail"])
            a.append(int(m.group(1)) if m else None)
        v = None
        if t5 and t15 and None not in a and a[1] > a[0]:
            v = (t15[0][1] - t5[0][1]) / (a[1] - a[0])
        per_read[b].append(v)
        P(f"| {r} | {b} | {fmt(t5[0][1] if t5 else None)} | {fmt(t15[0][1] if t15 else None)} "
          f"| {a[0]} / {a[1]} | **{fmt(v)}** |")
P("")

# --- registrations under callgrind ---
per_reg = {b: [] for b in builds}
heading("User-space instructions per registration (callgrind)",
        ["Round", "Build", "Instr. at 1 000 devices", "Instr. at 5 000", "Per registration"])
for r in rounds_of("regs"):
    for b in builds:
        t1, t5 = totals(f"{cg}/regs-{b}-r{r}-n1000"), totals(f"{cg}/regs-{b}-r{r}-n5000")
        ok = all(find(results(f"{cg}/regs-{b}-r{r}-n{n}.json"), "registrations/s")
                 for n in (1000, 5000))
        v = (t5[0][1] - t1[0][1]) / 4000 if t1 and t5 and ok else None
        per_reg[b].append(v)
        P(f"| {r} | {b} | {fmt(t1[0][1] if t1 else None)} | {fmt(t5[0][1] if t5 else None)} | **{fmt(v)}** |")
P("")

# --- notifications ---
# One device of the bulk notifier, a notification every 10 ms: 100/s evenly spaced, each one
# through the daemon (commit, delivery) before the next arrives even under valgrind, so the
# batch sizes do not depend on timing (100 devices sending in bursts made them vary by 15 %).
# Per notification = the instructions of the dumps (one a second) that fall inside the
# counting window (it ends when the bench kills the daemon; its first and last second are
# left out), over the time they cover, divided by the delivered rate of the window.
# Start-up, registrations and the warm-up drop out.
def series(prefix):
    rows = {}
    try:
        for l in open(prefix + ".series"):
            f = l.split()
            if len(f) == 4 and f[1] != "end":
                rows.setdefault(f[0], []).append((float(f[2]), int(f[3])))
    except OSError:
        pass
    return rows


def ends(prefix):
    e = {}
    try:
        for l in open(prefix + ".ends"):
            f = l.split()
            e.setdefault(f[0], float(f[1]))
    except OSError:
        pass
    return e


rate_notif = {(b, k): [] for b in builds for k in ("long-poll", "webhook")}
P("### User-space instructions per delivered notification (callgrind)")
P("")
P("| Round | Build | Channel | Dumps used | Seconds covered | Instr./s | Delivered/s | Per notification |")
P("|---|---|---|---|---|---|---|---|")
runs = sorted({(int(m.group(1)), int(m.group(2))) for f in os.listdir(cg)
               if (m := re.match(r"notif-\w+-r(\d+)-w(\d+)\.totals", f))}) if os.path.isdir(cg) else []
for r, W in runs:
    for b in builds:
        pre = f"{cg}/notif-{b}-r{r}-w{W}"
        t, ser, en, res = totals(pre), series(pre), ends(pre), results(pre + ".json")
        for i, k in enumerate(("long-poll", "webhook")):
            v = ips = span = None
            used = 0
            row = find(res, f"notifications/s to {k}")
            if len(t) > i and t[i][0] in ser and t[i][0] in en and row:
                d = sorted(ser[t[i][0]])
                te = en[t[i][0]]
                idx = [j for j, (m, _) in enumerate(d) if te - W + 1 <= m <= te - 1]
                if idx and idx[0] > 0:
                    span = d[idx[-1]][0] - d[idx[0] - 1][0]
                    ins = sum(d[j][1] for j in idx)
                    used = len(idx)
                    ips = ins / span
                    v = ips / row["value"]
            rate_notif[(b, k)].append(v)
            P(f"| {r} | {b} | {k} | {used} | {fmt(span, 1)} | {fmt(ips)} | "
              f"{fmt(row and row['value'])} | **{fmt(v)}** |")
P("")

# --- registrations and RSS ---
regs = {b: [] for b in builds}
cpus = {b: [] for b in builds}
rss = {b: [] for b in builds}
P("### Registrations/s and RSS per endpoint (plain release daemon, 10 000 simulated devices)")
P("")
P("| Pair | Build | Registrations/s | Daemon CPU µs/registration | RSS per endpoint KiB |")
P("|---|---|---|---|---|")
pairs = sorted({int(m.group(1)) for f in os.listdir(reg)
                if (m := re.match(r"reg-\w+-p(\d+)\.json", f))}) if os.path.isdir(reg) else []
for p in pairs:
    for b in builds:
        res = results(f"{reg}/reg-{b}-p{p}.json")
        rr, rs = find(res, "registrations/s"), find(res, "RSS per endpoint")
        m = rr and re.search(r"daemon CPU ([\d.]+) µs", rr["detail"])
        regs[b].append(rr and rr["value"])
        cpus[b].append(float(m.group(1)) if m else None)
        rss[b].append(rs and rs["value"])
        P(f"| {p} | {b} | {fmt(rr and rr['value'])} | {fmt(cpus[b][-1], 1)} | {fmt(rs and rs['value'], 3)} |")
P("")

# --- summary ---
P("### Summary (mean of the runs; spread = (max - min) / mean over one build's runs)")
P("")
P("| Figure | Old | New | New vs old | Median old / new | Spread old | Spread new |")
P("|---|---|---|---|---|---|---|")
def srow(name, d, nd=0):
    o, n = mean(d["old"]), mean(d["new"])
    mo, mn = med(d["old"]), med(d["new"])
    P(f"| {name} | {fmt(o, nd)} | {fmt(n, nd)} | {pct(o, n)} | {fmt(mo, nd)} / {fmt(mn, nd)} "
      f"| {spread(d['old'])} | {spread(d['new'])} |")
srow("Instructions per proxied read", per_read)
srow("Instructions per notification, long-poll",
     {b: rate_notif[(b, "long-poll")] for b in builds})
srow("Instructions per notification, webhook",
     {b: rate_notif[(b, "webhook")] for b in builds})
srow("Instructions per registration", per_reg)
srow("Registrations/s", regs)
srow("Daemon CPU µs per registration", cpus, 1)
srow("RSS per endpoint, KiB", rss, 3)
print("\n".join(lines))
