"""Summarise the ViT runs of docs/results/vit.md: mean ± std test accuracy over seeds, params, img/s.

Usage: python docs/results/vit_aggregate.py runs/vit
(reads <root>/<model>/s<seed>/summary.json as written by `pnnh train`).
"""

import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vit")
rows = {}
for f in sorted(root.glob("*/s*/summary.json")):
    s = json.loads(f.read_text())
    if s.get("status") != "complete":
        continue
    rows.setdefault(f.parent.parent.name, []).append(s)
print("| model | seeds | test acc % (mean ± std) | per seed | last train loss (mean) | params | train img/s (mean, shared machine) |")
print("|---|---|---|---|---|---|---|")
for name, runs in sorted(rows.items(), key=lambda kv: (int(kv[1][0]["model"].rsplit("_d", 1)[1]), kv[0])):
    accs = [100 * r["test_acc"] for r in sorted(runs, key=lambda r: r["seed"])]
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    ips = statistics.mean(r["train_img_per_s"] for r in runs)
    last = statistics.mean(r["curve"][-1][1] for r in runs)  # loss of the last logged step (label-smoothed)
    print(f"| {name} | {len(runs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} "
          f"| {last:.3f} | {runs[0]['params']:,} | {ips:.0f} |")
