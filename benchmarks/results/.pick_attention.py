import json, sys
rows = json.load(open(sys.argv[1]))["attention"]
best = {}
for r in rows:
    if r["path"] == "default" or r["keys"] not in (256, 512):
        continue
    key = (r["block_m"], tuple(r["config"]))
    best[key] = best.get(key, 0) + r["us"]
(m, cfg), us = min(best.items(), key=lambda kv: kv[1])
print(*cfg, "--attention-block-m", m)
