"""Capacity plan of a dataset run (``sparkle capacity``): GPUs per model service for a target.

For a target (accepted pairs in a number of days) it walks a sample's journey (orchestrator/pipeline.py) with
the GPU-seconds of every model call and the share of samples that reach it (the acceptance rate of every
gate before it), and prints, per service, GPU-seconds per accepted pair and the GPUs needed. It does the same
sum with every gate moved to the end of the journey, to show what early rejection saves.

**Every GPU-second below is an assumption, not a measurement** (no checkpoint has run on a GPU in this
project yet; the tiny backends' CPU timings do not transfer to the real models). Sources are given per call.
The shape is 81 frames at 832x480 (the conformed maximum), on the suggested GPU of each service's README.
Replace them with measured values (``--seconds i2v.animate=75``, from the services' ``/metrics`` latency
histograms once they run) and the acceptance rates with a pilot run's funnel (``sparkle funnel``,
``--keep gate=rate``).

A call holds its replica longer than its GPU work: it fetches its inputs from the store, decodes them, encodes
and uploads its output (:data:`OVERHEAD_S`, seconds per call, also assumptions; ``--overhead i2v=4``). Replicas
are sized on GPU-seconds + overhead: the balanced bulk run (``benchmarks/distributed.py --part balanced``) showed
that a plan on GPU-seconds alone under-provisions the service whose overhead exceeds its rounding slack (i2v
there: +20 % per call, 19 replicas where 22 were needed, throughput 0.874 of the plan).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import typer

from sparkle.backends import SERVICES


@dataclass(frozen=True)
class Call:
    """One model call of the journey: the service, its GPU-seconds per sample, and the gate it comes after."""

    name: str       # service.operation
    seconds: float  # GPU-seconds per sample on the service's GPU (assumed; source in `source`)
    after: str      # the last gate before this call ("" = stage 1's coarse CPU filter only)
    source: str


GATES: list[tuple[str, float, str]] = [
    ("coarse", 0.40, "stage 1 coarse camera filter (CPU); assumption: 40 % of raw clips are static"),
    ("fine", 0.70, "stage 1 VLM fine check; assumption: keeps 70 % -> stage 1 keeps 28 % (the issue's figure)"),
    ("frame0", 0.75, "stage 2 EditScore overall >= 8 on the frame-0 edit; assumption"),
    ("round1", 0.95, "stage 3 grounding round 1 finds a foreground; assumption"),
    ("removal", 0.70, "stage 3 EditScore overall >= 8.5 on the clean plate (stricter gate); assumption"),
    ("bait", 0.95, "stage 4 BAIT: an anchor and a non-empty mask; assumption"),
    ("video", 0.60, "stage 5 mean O_score >= 8 on 4 frames of the edited video; assumption"),
]
"""Gates in journey order: (name, share of samples kept, source)."""

CALLS: list[Call] = [
    Call("grounding.camera_check", 2.0, "coarse",
         "Qwen3-VL-32B on vLLM, ~11 images (~3k prompt tokens), 1 H100 batching 16-32 questions: assumed"),
    Call("grounding.describe_scene", 1.0, "fine", "1 image, ~100 answer tokens on vLLM: assumed"),
    Call("grounding.write_instruction", 1.0, "fine", "1 image, ~60 answer tokens (only without a prompt): assumed"),
    Call("image_edit.edit_background", 3.0, "fine",
         "FLUX.2-klein-9B, 4 steps, no CFG, 832x480 + Qwen3-8B encoder: assumed 3 s on an L40S/H100"),
    Call("editscore.score_image", 16.0, "fine",
         "EditScore-7B (Qwen2.5-VL-7B, transformers generate), 4 passes (Sparkle's records are 4-pass averages) "
         "of SC+PQ, ~250 of 512 sampled tokens, batched across requests: assumed"),
    Call("grounding.ground_round1", 1.5, "frame0", "2 images, JSON boxes: assumed"),
    Call("image_edit.remove_foreground", 3.0, "round1", "as edit_background: assumed"),
    Call("editscore.score_image(removal)", 16.0, "round1", "as score_image: assumed"),
    Call("grounding.caption", 0.5, "removal", "text only, ~100 answer tokens (two captions): assumed"),
    Call("i2v.animate", 60.0, "removal",
         "Wan2.2-I2V-A14B + LightX2V, 4 steps, no CFG, 81x480x832: ~2e15 FLOP per DiT step (32.8k tokens) = "
         "~5 s per step on an H100, + VAE decode ~20 s + CPU-offload transfers on 80 GB: assumed 60 s"),
    Call("grounding.ground_round2", 5.0, "removal", "~6 frames at 2 FPS, one question each: assumed"),
    Call("tracking.track", 15.0, "removal",
         "SAM3 tracker, 81 frames at 1008 px, ~6 anchors forward+backward, cached features, 24 GB card: assumed"),
    Call("control.synthesize", 600.0, "bait",
         "Wan2.2-Fun-A14B-Control, 50 steps x CFG 6 = 100 DiT passes of ~5 s (as i2v) + VAE + diffsynth CPU "
         "offload on 80 GB: assumed 600 s on an H100 (about 480 s resident on an H200)"),
    Call("editscore.score_frames", 30.0, "bait", "EditScore-7B, 4 passes of 4 SC + 4 PQ prompts in one batch: "
         "assumed"),
]
"""Model calls in journey order."""

OVERHEAD_S: dict[str, tuple[float, str]] = {
    "grounding": (0.3, "fetch ~1-11 JPEG frames, vLLM request round trip: assumed"),
    "image_edit": (0.5, "fetch a frame, encode + upload a PNG at 832x480: assumed"),
    "i2v": (3.0, "encode 81 frames at 832x480 to H.264 on the CPU (~1.5 s) + upload ~10 MB: assumed"),
    "tracking": (2.0, "decode 81 frames, pack and upload the (T, H, W) mask: assumed"),
    "control": (5.0, "decode source + background video (81 frames each), Canny control video, encode + upload: "
                     "assumed"),
    "editscore": (0.5, "fetch 2-8 images or 4 frames of a video: assumed"),
}
"""Seconds a call holds its replica beyond its GPU work, per service: (seconds, source)."""

DEFAULT_ACCEPTED = 140_000
DEFAULT_DAYS = 7.0
DEFAULT_UTILISATION = 0.7


def _service(call: Call) -> str:
    return call.name.split(".", 1)[0]


def _reach(gates: list[tuple[str, float, str]]) -> dict[str, float]:
    """Share of raw clips past each gate ("" = none)."""
    reach, share = {"": 1.0}, 1.0
    for name, keep, _ in gates:
        share *= keep
        reach[name] = share
    return reach


WRITTEN_ONLY_WITHOUT_PROMPT = {"grounding.write_instruction"}
"""Calls made only for manifest entries without a prompt (the catalogue's instruction is written for them)."""


def plan(accepted: int = DEFAULT_ACCEPTED, days: float = DEFAULT_DAYS, utilisation: float = DEFAULT_UTILISATION,
         seconds: dict[str, float] | None = None, keep: dict[str, float] | None = None,
         prompts_given: float = 0.0, overhead: dict[str, float] | None = None) -> dict:
    """The capacity plan as data: per service GPU-seconds and replica-seconds (GPU + per-call overhead) per
    accepted pair and the replicas (GPUs) they need, early vs late rejection.

    ``seconds``: GPU-seconds per call name (replacing :data:`CALLS`' assumptions); ``keep``: share kept per gate
    name; ``overhead``: seconds per call per service name (replacing :data:`OVERHEAD_S`; 0 plans on GPU-seconds
    alone). ``prompts_given``: share (0..1) of manifest entries that bring their own prompt; those skip
    ``grounding.write_instruction`` (0, the default, is dataset generation: every instruction is written).
    Raises ValueError for unknown call, gate or service names, a share outside 0..1 or a negative overhead.
    """
    seconds, keep = seconds or {}, keep or {}
    per_call = {svc: s for svc, (s, _) in OVERHEAD_S.items()} | (overhead or {})
    if not 0.0 <= prompts_given <= 1.0:
        raise ValueError(f"prompts_given is a share in 0..1, got {prompts_given}")
    unknown = ((set(seconds) - {c.name for c in CALLS}) | (set(keep) - {g[0] for g in GATES})
               | (set(per_call) - set(SERVICES)))
    if unknown:
        raise ValueError(f"unknown call, gate or service names: {sorted(unknown)}")
    if any(v < 0 for v in per_call.values()):
        raise ValueError(f"an overhead is seconds >= 0, got {per_call}")
    gates = [(n, keep.get(n, k), src) for n, k, src in GATES]
    calls = [Call(c.name, seconds.get(c.name, c.seconds) * (1.0 - prompts_given if c.name in WRITTEN_ONLY_WITHOUT_PROMPT
                                                         else 1.0), c.after, c.source) for c in CALLS]
    reach = _reach(gates)
    acceptance = reach[gates[-1][0]]
    raw = accepted / acceptance
    wall = days * 86_400.0
    stage1 = reach["fine"]
    rows = {}
    for service in SERVICES:
        mine = [c for c in calls if _service(c) == service]
        # The share of a sample's calls that run: write_instruction only for entries without a prompt.
        runs = {c.name: (1.0 - prompts_given if c.name in WRITTEN_ONLY_WITHOUT_PROMPT else 1.0) for c in mine}
        early = sum(c.seconds * reach[c.after] for c in mine) / acceptance
        held = early + sum(per_call[service] * runs[c.name] * reach[c.after] for c in mine) / acceptance
        # All gates scored at the end: every call runs on every clip that the coarse CPU filter keeps
        # (the VLM camera check itself included: nothing is refused before the end).
        late = sum((c.seconds + per_call[service] * runs[c.name]) * reach["coarse"] for c in mine) / acceptance
        gpus = held * accepted / (wall * utilisation)
        # Of this service's GPU time, the share spent on samples that a later gate rejects.
        spent = sum(c.seconds * reach[c.after] for c in mine)
        wasted = sum(c.seconds * (reach[c.after] - acceptance) for c in mine) / spent if spent else 0.0
        rows[service] = {"gpu_s_per_accepted": early, "replica_s_per_accepted": held,
                         "overhead_s_per_call": per_call[service],
                         "share_on_rejected": wasted, "replica_s_per_accepted_gates_at_end": late,
                         "gpu_hours": early * accepted / 3600.0, "gpus": gpus, "gpus_rounded": math.ceil(gpus),
                         "gpus_gates_at_end": math.ceil(late * accepted / (wall * utilisation))}
    return {"accepted": accepted, "days": days, "utilisation": utilisation, "prompts_given": prompts_given,
            "acceptance_from_raw": acceptance, "stage1_keep": stage1, "raw_clips": raw,
            "accepted_per_hour": accepted / (wall / 3600.0),
            "gates": [{"gate": n, "keep": k, "reach_after": reach[n], "source": s} for n, k, s in gates],
            "calls": [{"call": c.name, "gpu_s": c.seconds, "runs_on_share_of_raw": reach[c.after],
                       "source": c.source} for c in calls],
            "services": rows,
            "overhead_sources": {svc: src for svc, (_, src) in OVERHEAD_S.items() if svc not in (overhead or {})},
            "total_gpus": sum(r["gpus_rounded"] for r in rows.values()),
            "total_gpus_gates_at_end": sum(r["gpus_gates_at_end"] for r in rows.values())}


def format_plan(p: dict) -> str:
    """The plan as Markdown tables (k8s/README.md carries this output verbatim)."""
    lines = [
        f"Target: {p['accepted']:,} accepted pairs in {p['days']:g} days "
        f"({p['accepted_per_hour']:,.0f} per hour), GPUs busy {p['utilisation']:.0%} of the time.",
        f"Acceptance: stage 1 keeps {p['stage1_keep']:.1%} of raw clips, all gates {p['acceptance_from_raw']:.2%}: "
        f"{p['raw_clips']:,.0f} raw clips in.",
        "",
        "| service | GPU-s per accepted pair | overhead s per call | replica-s per accepted pair | GPU-hours "
        "| of which on samples rejected later | GPUs | GPUs if every gate were at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for service, r in p["services"].items():
        lines.append(f"| {service} | {r['gpu_s_per_accepted']:,.0f} | {r['overhead_s_per_call']:g} "
                     f"| {r['replica_s_per_accepted']:,.0f} | {r['gpu_hours']:,.0f} | {r['share_on_rejected']:.0%} "
                     f"| {r['gpus_rounded']:,} | {r['gpus_gates_at_end']:,} |")
    total_gpu = sum(r["gpu_s_per_accepted"] for r in p["services"].values())
    total_early = sum(r["replica_s_per_accepted"] for r in p["services"].values())
    total_late = sum(r["replica_s_per_accepted_gates_at_end"] for r in p["services"].values())
    lines.append(f"| **total** | {total_gpu:,.0f} | | {total_early:,.0f} | {total_gpu * p['accepted'] / 3600:,.0f} | "
                 f"| **{p['total_gpus']:,}** | {p['total_gpus_gates_at_end']:,} |")
    lines.append(f"\nGPUs are sized on replica-seconds (GPU work + each call's overhead). Early rejection: "
                 f"{total_early:,.0f} replica-s per accepted pair instead of {total_late:,.0f} with every "
                 f"gate at the end ({1 - total_early / total_late:.0%} less).")
    lines += ["", "| gate | keeps | share of raw clips past it |", "|---|---:|---:|"]
    lines += [f"| {g['gate']} | {g['keep']:.0%} | {g['reach_after']:.2%} |" for g in p["gates"]]
    lines += ["", "| call (assumed GPU-s per sample) | GPU-s | runs on share of raw clips |", "|---|---:|---:|"]
    lines += [f"| {c['call']} | {c['gpu_s']:g} | {c['runs_on_share_of_raw']:.2%} |" for c in p["calls"]]
    lines += ["", "| service | overhead s per call | source |", "|---|---:|---|"]
    lines += [f"| {svc} | {p['services'][svc]['overhead_s_per_call']:g} | {p['overhead_sources'].get(svc, 'given')} |"
              for svc in p["services"]]
    return "\n".join(lines)


def _pairs(items: list[str], what: str) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"{what} expects NAME=NUMBER, got {item!r}")
    return out


def capacity_command(
    accepted: int = typer.Option(DEFAULT_ACCEPTED, "--accepted", help="accepted pairs to produce"),
    days: float = typer.Option(DEFAULT_DAYS, "--days", help="wall-clock days"),
    utilisation: float = typer.Option(DEFAULT_UTILISATION, "--utilisation",
                                      help="share of the time a GPU is busy (load, scale-up, queue gaps)"),
    seconds: list[str] = typer.Option([], "--seconds", help="GPU-seconds of a call, e.g. i2v.animate=75 "
                                      "(repeatable; names in `--json` output)"),
    keep: list[str] = typer.Option([], "--keep", help="share a gate keeps, e.g. video=0.5 (repeatable)"),
    overhead: list[str] = typer.Option([], "--overhead", help="seconds a call of a service holds its replica "
                                       "beyond its GPU work, e.g. i2v=4 (repeatable; measured: call latency minus "
                                       "GPU time)"),
    prompts_given: float = typer.Option(0.0, "--prompts-given", help="share of entries with their own prompt "
                                        "(they skip grounding.write_instruction); 0 = every instruction written"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON"),
) -> None:
    """GPUs per model service for a dataset target, from assumed per-call GPU-seconds and gate acceptance rates."""
    if accepted < 1 or days <= 0 or not 0 < utilisation <= 1:
        raise typer.BadParameter("--accepted >= 1, --days > 0 and 0 < --utilisation <= 1")
    try:
        p = plan(accepted, days, utilisation, _pairs(seconds, "--seconds"), _pairs(keep, "--keep"), prompts_given,
                 _pairs(overhead, "--overhead"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(p, indent=2) if as_json else format_plan(p))
