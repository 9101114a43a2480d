"""The stage funnel of a dataset folder: how many samples entered and left every stage, and why they left.

Built from the per-sample reports (``reports/{edit_type}/{id}.json``), so it covers accepted and rejected
samples alike and can be rebuilt at any time. Written to ``reports/funnel.json``; printed as a table by
``sparkle funnel``.
"""

from __future__ import annotations

from collections import Counter

from .algorithms.gates import reason_kind
from .store import ArtifactStore

FUNNEL_KEY = "reports/funnel.json"


def build_funnel(store: ArtifactStore) -> dict:
    """``{"samples", "accepted", "rejected", "by_edit_type", "stages": [{stage, name, in, out, refused:
    {reason_kind: count}}]}`` from every report in ``store``; stages in pipeline order."""
    stages: dict[tuple[int, str], dict] = {}
    statuses: Counter = Counter()
    by_type: Counter = Counter()
    for key in store.list_keys("reports/"):
        if key == FUNNEL_KEY or not key.endswith(".json"):
            continue
        report = store.get_json(key)
        statuses[report["status"]] += 1
        by_type[report["edit_type"]] += 1
        for d in report["stages"]:
            s = stages.setdefault((d["stage"], d["name"]), {"stage": d["stage"], "name": d["name"], "in": 0,
                                                            "out": 0, "refused": Counter()})
            s["in"] += 1
            if d["accepted"]:
                s["out"] += 1
            else:
                s["refused"][reason_kind(d["reason"])] += 1
    ordered = [dict(s, refused=dict(s["refused"].most_common())) for _, s in sorted(stages.items())]
    return {"samples": sum(statuses.values()), "accepted": statuses["accepted"], "rejected": statuses["rejected"],
            "by_edit_type": dict(by_type), "stages": ordered}


def write_funnel(store: ArtifactStore) -> dict:
    """Rebuild ``reports/funnel.json`` (under the store's lock) and return it."""
    with store.lock(FUNNEL_KEY):
        funnel = build_funnel(store)
        store.put_json(FUNNEL_KEY, funnel)
    return funnel
