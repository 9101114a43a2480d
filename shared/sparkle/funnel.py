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


def funnel_add(acc: dict, report: dict, sign: int = 1) -> dict:
    """Add one per-sample report to ``acc``, a JSON-serialisable tally (start from ``{}``); returns ``acc``.
    Bulk runs keep such a tally per dataset instead of re-reading every report. ``sign=-1`` takes a report
    added before back out (a failed sample re-driven by ``sparkle retry``)."""
    statuses, by_type = acc.setdefault("statuses", {}), acc.setdefault("by_edit_type", {})
    stages = acc.setdefault("stages", {})
    statuses[report["status"]] = statuses.get(report["status"], 0) + sign
    by_type[report["edit_type"]] = by_type.get(report["edit_type"], 0) + sign
    for d in report["stages"]:
        s = stages.setdefault(f"{d['stage']}:{d['name']}", {"stage": d["stage"], "name": d["name"], "in": 0,
                                                            "out": 0, "refused": {}})
        s["in"] += sign
        if d["accepted"]:
            s["out"] += sign
        else:
            kind = reason_kind(d["reason"])
            s["refused"][kind] = s["refused"].get(kind, 0) + sign
    return acc


def funnel_result(acc: dict) -> dict:
    """``{"samples", "accepted", "rejected", "failed", "cancelled", "by_edit_type", "stages": [{stage, name, in,
    out, refused: {reason_kind: count}}]}`` from a :func:`funnel_add` tally; stages in pipeline order."""
    statuses = Counter(acc.get("statuses", {}))
    stages = sorted(acc.get("stages", {}).values(), key=lambda s: (s["stage"], s["name"]))
    ordered = [dict(s, refused=dict(Counter(s["refused"]).most_common())) for s in stages]
    return {"samples": sum(statuses.values()), "accepted": statuses["accepted"], "rejected": statuses["rejected"],
            "failed": statuses["failed"], "cancelled": statuses["cancelled"],
            "by_edit_type": dict(acc.get("by_edit_type", {})), "stages": ordered}


def funnel_of(reports) -> dict:
    """:func:`funnel_result` over an iterable of per-sample reports."""
    acc: dict = {}
    for report in reports:
        funnel_add(acc, report)
    return funnel_result(acc)


def build_funnel(store: ArtifactStore) -> dict:
    """:func:`funnel_of` every report in ``store`` (``reports/{edit_type}/{id}.json``)."""
    keys = [k for k in store.list_keys("reports/") if k != FUNNEL_KEY and k.endswith(".json")]
    return funnel_of(store.get_json(k) for k in keys)


def write_funnel(store: ArtifactStore) -> dict:
    """Rebuild ``reports/funnel.json`` (under the store's lock) and return it."""
    with store.lock(FUNNEL_KEY):
        funnel = build_funnel(store)
        store.put_json(FUNNEL_KEY, funnel)
    return funnel
