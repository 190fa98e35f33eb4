"""`CLUSTER=1 make compose-smoke`: every JetStream stream on the cluster keeps 3 copies.

Runs in a client container on the stack's network (stdin of `python -`).
"""

import json
import sys
import urllib.request

data = json.load(urllib.request.urlopen("http://nats-1:8222/jsz?streams=true&config=true"))
streams = [s for a in data.get("account_details", []) for s in a.get("stream_detail", [])]
if not streams:
    sys.exit("no streams on the cluster")
bad = []
for s in streams:
    replicas = s.get("config", {}).get("num_replicas")
    copies = 1 + len((s.get("cluster") or {}).get("replicas") or [])
    print(f"{s['name']}: num_replicas={replicas}, copies={copies}")
    if replicas != 3 or copies != 3:
        bad.append(s["name"])
if bad:
    sys.exit(f"not replicated 3 times: {bad}")
