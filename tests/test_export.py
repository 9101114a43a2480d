"""``sparkle export`` (shared/sparkle/export.py): a store's published samples as a Sparkle dataset folder.

The stores are built with the store's own ``publish_sample`` (as orchestrator/pipeline.py does): tiny real MP4s,
PNGs and masks staged under ``staging/{id}/`` and moved into the layout with a record document, plus samples
that must *not* be exported (staged only, moved without a document, rejected with only a report) and keys
outside the layout. Byte identity with the old layout and legacy stores: tests/test_published.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from sparkle import layout
from sparkle.export import ExportError, export_command, export_dataset, parse_bytes, plan_shards
from sparkle.masks import pack_mask
from sparkle.media import write_png, write_video
from sparkle.published import published_ids, sample_document
from sparkle.store import ArtifactStore, LocalStore, staging_prefix
from sparkle.store_s3 import S3Store, open_store

PUBLISHED = {"location": [layout.sample_id("location", i) for i in range(6)],
             "season": [layout.sample_id("season", i) for i in range(2)]}
STAGED, HALF, REJECTED = (layout.sample_id("location", i) for i in (6, 7, 8))
BIG = layout.edited_video("location", layout.sample_id("location", 4))  # larger than SHARD_BYTES on its own
SHARD_BYTES = 20480
FOLDERS = ("source_frame0", "edited_frame0", "edited_frame0_foreground_removed", "edited_background_video",
           "source_video_mask", "edited_video_canny")


# --- building stores --------------------------------------------------------------------------------------------

def _noise_video(path: Path, rng: np.random.Generator, frames: int) -> Path:
    video = rng.integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8)
    video[0] = 0
    return write_video(path, video, 8)


def publish_sample(store: ArtifactStore, et: str, index: int, *, prompt: str = "", frames: int = 5,
                   edited_frames: int | None = None, commit: bool = True, stage_only: bool = False) -> str:
    """Stage a whole sample and publish it; ``commit=False`` stops before the record document (a publish cut
    short), ``stage_only`` before any move (a sample still running)."""
    sid = layout.sample_id(et, index)
    prompt = prompt or f"Replace the background with scene {index}"
    rng = np.random.default_rng(1000 * layout.EDIT_TYPES.index(et) + index)
    stage = staging_prefix(sid)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mask.npz").write_bytes(pack_mask(rng.random((frames, 32, 48)) < 0.3))
        files = {
            layout.source_video(et, sid): _noise_video(tmp / "src.mp4", rng, frames),
            layout.edited_video(et, sid): _noise_video(tmp / "edit.mp4", rng, edited_frames or frames),
            layout.source_frame0(et, sid): write_png(tmp / "f0.png", rng.integers(0, 256, (32, 48, 3))),
            layout.edited_frame0(et, sid): write_png(tmp / "e0.png", rng.integers(0, 256, (32, 48, 3))),
            layout.clean_plate(et, sid): write_png(tmp / "plate.png", np.zeros((32, 48, 3))),
            layout.background_video(et, sid): write_video(tmp / "bg.mp4", np.zeros((5, 32, 48, 3), np.uint8), 8),
            layout.canny_video(et, sid): write_video(tmp / "canny.mp4", np.zeros((5, 32, 48, 3), np.uint8), 8),
            layout.mask(et, sid): tmp / "mask.npz",
        }
        for key, path in files.items():
            store.put_file(stage + key, path)
    if stage_only:
        return sid
    records = {name: {"id": sid, "prompt": prompt, "record": name} for name in layout.RECORD_NAMES}
    doc = sample_document(sid, et, prompt, "urban: rooftop", f"scene {index}", records)
    moves = {stage + key: key for key in files}
    if commit:
        store.publish_sample(moves, layout.document(et, sid), doc)
    else:
        for src, dst in moves.items():
            store.move(src, dst)
    store.put_json(layout.report(et, sid), {"id": sid, "status": "accepted"})
    return sid


def build_store(store: ArtifactStore) -> ArtifactStore:
    """Published: location 0-5 (4's edited video is big), season 0-1; plus everything that must not be exported."""
    for i in range(6):
        publish_sample(store, "location", i, frames=5 + 2 * (i % 3), edited_frames=25 if i == 4 else None)
    publish_sample(store, "location", 2, prompt="second take")  # re-delivered: a no-op, the first publish stays
    for i in range(2):
        publish_sample(store, "season", i)
    publish_sample(store, "location", 6, stage_only=True)
    publish_sample(store, "location", 7, commit=False)
    store.put_json(layout.report("location", REJECTED), {"id": REJECTED, "status": "rejected"})
    for key in ("reports/funnel.json", "jobs/j1.json", "datasets/old/prompts/location_train.csv", "notes.txt",
                "intermediate_data/location/README.txt", "published/location/README.txt"):
        store.put_bytes(key, b"not part of the dataset\n")
    return store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(LocalStore(root))
    return root


@pytest.fixture
def store(store_dir) -> LocalStore:
    return LocalStore(store_dir)


# --- helpers --------------------------------------------------------------------------------------------------

def expected_files(intermediate: bool = True, loose_media: bool = True) -> set[str]:
    files = set()
    for et, ids in PUBLISHED.items():
        files |= {layout.prompts_csv(et), layout.prompts_metadata(et)}
        for sid in ids:
            if loose_media:
                files |= {layout.source_video(et, sid), layout.edited_video(et, sid)}
            if intermediate:
                files |= {layout.source_frame0(et, sid), layout.edited_frame0(et, sid), layout.clean_plate(et, sid),
                          layout.background_video(et, sid), layout.mask(et, sid), layout.canny_video(et, sid)}
        if intermediate:
            files |= {layout.record(et, name) for name in layout.RECORD_NAMES}
    return files


def tree(out: Path) -> dict[str, str]:
    """Every file under ``out`` (relative POSIX path) with its sha256."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tar"))


def member_names_of(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def tar_bytes(members: list[tarfile.TarInfo]) -> int:
    """The file size of a tar holding ``members`` (one 512-byte header each, data in 512-byte blocks, two end
    blocks, padded to 10240-byte records), computed independently of the code under test."""
    content = sum(512 + -(-m.size // 512) * 512 for m in members) + 1024
    return -(-content // 10240) * 10240


# --- which samples, which files ---------------------------------------------------------------------------------

def test_exports_every_published_sample_exactly_once(store, tmp_path):
    out = tmp_path / "out"
    summary = export_dataset(store, out)

    assert set(tree(out)) == expected_files()  # nothing from staging/, reports/, jobs/, datasets/, notes.txt
    assert summary["samples"] == {"location": 6, "season": 2} and summary["total_samples"] == 8
    assert summary["files_written"] == len(expected_files()) and summary["files_skipped"] == 0
    assert summary["bytes_written"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert summary["shards"] == []
    for et, ids in PUBLISHED.items():
        text = (out / layout.prompts_csv(et)).read_text()
        assert text.splitlines()[0] == "prompt,src_video,tgt_video,task"
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["task"] for r in rows] == ids
        for r in rows:
            assert (r["src_video"], r["tgt_video"]) == (layout.source_video(et, r["task"]),
                                                        layout.edited_video(et, r["task"]))
        assert [r["id"] for r in read_jsonl(out / layout.prompts_metadata(et))] == ids
        for name in layout.RECORD_NAMES:
            assert [r["id"] for r in read_jsonl(out / layout.record(et, name))] == ids, name
        for sid in ids:
            for key in (layout.source_video(et, sid), layout.edited_video(et, sid), layout.mask(et, sid)):
                assert (out / key).read_bytes() == store.get_bytes(key)
    # Exactly once: the re-delivered publish of sample 2 changed nothing.
    rows = {r["task"]: r for r in csv.DictReader(io.StringIO((out / layout.prompts_csv("location")).read_text()))}
    metadata = {r["id"]: r for r in read_jsonl(out / layout.prompts_metadata("location"))}
    sid2 = PUBLISHED["location"][2]
    assert rows[sid2]["prompt"] == metadata[sid2]["prompt"] == "Replace the background with scene 2"
    # The store does hold the samples that must not be exported (so the check above means something).
    assert store.list_keys(staging_prefix(STAGED)) and store.exists(layout.source_video("location", HALF))
    assert store.exists(layout.report("location", REJECTED))
    assert HALF not in published_ids(store, "location")
    for path in out.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for sid in (STAGED, HALF, REJECTED):
                assert sid not in path.name and sid.encode() not in content, (sid, path)


def test_theme_selection_and_no_intermediate(store, tmp_path):
    out = tmp_path / "out"
    summary = export_dataset(store, out, edit_types=["season"], intermediate=False)
    assert summary["samples"] == {"season": 2}
    assert set(tree(out)) == {k for k in expected_files(intermediate=False) if k.split("/")[0] != "location"
                              and not k.startswith("prompts/location")}
    with pytest.raises(ExportError, match="'time'"):
        export_dataset(store, tmp_path / "o2", edit_types=["time"])  # a theme without a CSV
    with pytest.raises(ValueError, match="unknown edit_type"):
        export_dataset(store, tmp_path / "o3", edit_types=["winter"])
    with pytest.raises(ValueError, match="shards"):
        export_dataset(store, tmp_path / "o4", loose_media=False)


def test_missing_media_or_metadata_of_a_published_sample_is_an_error(store_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    broken = LocalStore(root)
    sid = PUBLISHED["location"][3]
    broken.path(layout.edited_video("location", sid)).unlink()
    with pytest.raises(ExportError, match=f"published sample {sid}: location/edited_video/{sid}.mp4 is missing"):
        export_dataset(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written

    shutil.copy(store_dir / layout.edited_video("location", sid), root / layout.edited_video("location", sid))
    sid = PUBLISHED["season"][1]
    doc = broken.get_json(layout.document("season", sid))
    del doc["metadata"]
    broken.put_json(layout.document("season", sid), doc)
    with pytest.raises(ExportError, match=f"published sample {sid}: .* has no metadata record"):
        export_dataset(broken, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # still nothing written


def test_no_published_samples_is_an_error(tmp_path):
    empty = LocalStore(tmp_path / "store")
    publish_sample(empty, "location", 0, commit=False)
    with pytest.raises(ExportError, match="no published samples"):
        export_dataset(empty, tmp_path / "out")


# --- shards ---------------------------------------------------------------------------------------------------

def test_shards_are_self_contained_split_by_size_and_deterministic(store, tmp_path):
    out = tmp_path / "out"
    summary = export_dataset(store, out, shards=True, shard_bytes=SHARD_BYTES, loose_media=False)
    assert set(tree(out)) == expected_files(loose_media=False) | set(summary["shards"])
    assert summary["shards_written"] == len(summary["shards"]) == len(shard_names(out))

    for et, ids in PUBLISHED.items():
        for kind in ("source_video", "edited_video"):
            names = [n for n in shard_names(out) if n.startswith(f"{et}_{kind}_part")]
            assert names == [f"{et}_{kind}_part{i:02d}.tar" for i in range(len(names))]
            if et == "location":
                assert len(names) >= 3
            shards = []
            for name in names:
                with tarfile.open(out / name) as tar:
                    members = tar.getmembers()
                    for m in members:
                        assert m.isfile() and (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)
                        assert tar.extractfile(m).read() == store.get_bytes(m.name)
                shards.append(members)
                size = (out / name).stat().st_size
                assert size == tar_bytes(members)
                assert size <= SHARD_BYTES or len(members) == 1
            member_names = [m.name for members in shards for m in members]
            assert member_names == [f"{et}/{kind}/{sid}.mp4" for sid in ids]  # each once, in id order
            for members, following in zip(shards, shards[1:]):  # greedy: the next member did not fit
                assert tar_bytes(members + following[:1]) > SHARD_BYTES
    with tarfile.open(out / "location_edited_video_part00.tar") as tar:
        assert tar.getnames()  # self-contained: opens on its own
    big = [names for names in map(member_names_of, (out / n for n in shard_names(out))) if BIG in names]
    assert big == [[BIG]]  # larger than the limit on its own: alone in its shard
    assert (store_size := len(store.get_bytes(BIG))) > SHARD_BYTES, store_size

    again = tmp_path / "again"
    export_dataset(store, again, shards=True, shard_bytes=SHARD_BYTES)
    shard_hashes = {n: h for n, h in tree(out).items() if n.endswith(".tar")}
    assert shard_hashes == {n: h for n, h in tree(again).items() if n.endswith(".tar")}  # byte-identical
    assert set(tree(again)) == expected_files() | set(shard_hashes)  # loose media too, by default


def test_plan_shards():
    members = [("a", 100), ("b", 50_000), ("c", 100), ("d", 100)]
    assert [[n for n, _ in g] for g in plan_shards(members, 10240)] == [["a"], ["b"], ["c", "d"]]
    assert [[n for n, _ in g] for g in plan_shards(members, 10**9)] == [["a", "b", "c", "d"]]
    assert plan_shards([], 10240) == []
    # The limit is on the tar file: headers, data blocks, the two end blocks and the 10240-byte record padding.
    assert len(plan_shards([("a", 4096), ("b", 4096)], 10240)) == 1  # 2 * (512 + 4096) + 1024 == 10240
    assert len(plan_shards([("a", 4097), ("b", 4096)], 10240)) == 2  # 512 + 4608 + 512 + 4096 + 1024 > 10240
    assert len(plan_shards([("a", 4096), ("b", 4096)], 10239)) == 2  # a tar is at least one 10240-byte record


def test_more_than_100_shards_get_three_digits(tmp_path):
    small = LocalStore(tmp_path / "store")
    et = "time"
    for i in range(101):
        sid = layout.sample_id(et, i)
        for key in (layout.source_video(et, sid), layout.edited_video(et, sid)):
            small.put_bytes(key, bytes([i]) * 20)
        small.publish_sample({}, layout.document(et, sid), sample_document(sid, et, "p", None, None, {}))
    out = tmp_path / "out"
    export_dataset(small, out, shards=True, shard_bytes=1, loose_media=False)
    names = [n for n in shard_names(out) if n.startswith("time_source_video")]
    assert names == [f"time_source_video_part{i:03d}.tar" for i in range(101)]
    # Fewer shards on a re-export: the stale parts of the first one are removed.
    export_dataset(small, out, shards=True, shard_bytes=10**6, loose_media=False)
    assert shard_names(out) == ["time_edited_video_part00.tar", "time_source_video_part00.tar"]
    with tarfile.open(out / "time_source_video_part00.tar") as tar:
        assert len(tar.getnames()) == 101


# --- re-runs ----------------------------------------------------------------------------------------------------

def test_reexport_is_idempotent_and_resumes(store, tmp_path):
    out = tmp_path / "out"
    first = export_dataset(store, out, shards=True, shard_bytes=SHARD_BYTES)
    before = tree(out)
    media = out / layout.source_video("location", PUBLISHED["location"][0])
    stamp = media.stat().st_mtime_ns, media.stat().st_ino

    second = export_dataset(store, out, shards=True, shard_bytes=SHARD_BYTES)
    assert tree(out) == before
    assert (media.stat().st_mtime_ns, media.stat().st_ino) == stamp  # not rewritten
    assert second["files_written"] == 0  # nothing new: the CSV and JSONL files are left as they are too
    assert second["files_skipped"] == first["files_written"]
    assert second["layout"] == {et: {"mode": "unchanged", "documents_read": 0} for et in PUBLISHED}
    assert second["shards_written"] == 0 and second["shards_skipped"] == len(first["shards"])
    assert second["shards"] == first["shards"] and second["samples"] == first["samples"]

    # An interrupted export: some files and a shard missing, a leftover temp file; running again completes it.
    deleted = [layout.edited_video("season", PUBLISHED["season"][1]), layout.mask("location", PUBLISHED["location"][5]),
               layout.prompts_csv("season")]
    for key in deleted:
        (out / key).unlink()
    (out / first["shards"][1]).unlink()
    (out / first["shards"][2]).write_bytes(b"truncated")
    third = export_dataset(store, out, shards=True, shard_bytes=SHARD_BYTES)
    assert tree(out) == before
    season_text = len(layout.layout_files("season"))  # the season CSV is gone: its files are rebuilt in full
    assert third["files_written"] == season_text + 2 and third["shards_written"] == 2
    assert third["layout"]["season"] == {"mode": "full", "documents_read": 2}
    assert third["layout"]["location"]["mode"] == "unchanged"

    # A new sample: only its document is read, its lines are merged in, in id order.
    new_root = tmp_path / "store"
    shutil.copytree(store.root, new_root)
    grown = LocalStore(new_root)
    publish_sample(grown, "location", 9)
    fourth = export_dataset(grown, out, shards=True, shard_bytes=SHARD_BYTES)
    assert fourth["layout"]["location"] == {"mode": "incremental", "documents_read": 1}
    ids = PUBLISHED["location"] + [layout.sample_id("location", 9)]
    assert [r["id"] for r in read_jsonl(out / layout.prompts_metadata("location"))] == ids
    full = tmp_path / "full"
    export_dataset(grown, full, shards=True, shard_bytes=SHARD_BYTES)
    assert tree(full) == tree(out)

    forced = export_dataset(grown, full, shards=True, shard_bytes=SHARD_BYTES, force=True)
    assert forced["files_written"] == len(tree(full)) - len(forced["shards"])
    assert forced["shards_written"] == len(forced["shards"])
    assert forced["layout"]["location"] == {"mode": "full", "documents_read": 7}
    assert tree(full) == tree(out)
    assert not list(out.rglob("*.part")) and not list(out.glob(".export-*"))  # no temporaries left


def test_parse_bytes():
    assert parse_bytes("5GB") == 5 * 10**9
    assert parse_bytes("500mb") == 500 * 10**6
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("1048576") == 1048576
    assert parse_bytes(" 64 KiB ") == 65536
    for bad in ("", "5 parsecs", "GB", "-1", "0", "1e9", "0.1B"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# --- the command ------------------------------------------------------------------------------------------------

def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("export")(export_command)
    return app


def test_cli(store_dir, tmp_path):
    runner, app, out = CliRunner(), _app(), tmp_path / "out"
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "--shard-size" in res.stdout and "s3://BUCKET/PREFIX" in res.stdout, res.output
    res = runner.invoke(app, ["export", str(out), "--store", str(store_dir), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == {"location": 6, "season": 2} and summary["total_samples"] == 8
    assert set(tree(out)) == expected_files()

    res = runner.invoke(app, ["export", str(tmp_path / "o2"), "--store", f"local:{store_dir}", "--theme", "season",
                              "--shards", "--shard-size", "20KB", "--no-loose-media", "--no-intermediate", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == {"season": 2}
    assert sorted(summary["shards"]) == shard_names(tmp_path / "o2") != []

    res = runner.invoke(app, ["export", str(tmp_path / "o3")], env={"SPARKLE_STORE_URL": f"local:{store_dir}"})
    assert res.exit_code == 0, res.output
    assert "8 samples exported" in " ".join(res.stdout.split()) and "location" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--store", "{tmp}/nowhere"], "no such store folder"),
    (["--store", "{tmp}"], "no published samples"),
    (["--store", "{store}", "--shard-size", "lots"], "not a size"),
    (["--store", "{store}", "--theme", "winter"], "unknown edit_type 'winter'"),
    (["--store", "ftp://host/x"], "unsupported store URL"),
    (["--store", "{store}", "--no-loose-media"], "needs shards"),
])
def test_cli_errors(store_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, store=store_dir) for a in args]
    res = CliRunner().invoke(_app(), ["export", str(tmp_path / "out"), *args])
    assert res.exit_code == 1, res.output
    assert "error:" in res.stderr and message in " ".join(res.stderr.split())
    assert res.stdout == ""


# --- from S3 ----------------------------------------------------------------------------------------------------

def test_export_from_s3_matches_local(store, settings, bucket, tmp_path):
    s3 = open_store(f"s3://{bucket}/export-{uuid.uuid4().hex[:12]}", settings)
    assert isinstance(s3, S3Store)
    for key in store.list_keys(""):  # the same store, staging/, reports/ and the rest included
        s3.put_file(key, store.path(key))
    local_out, s3_out = tmp_path / "local", tmp_path / "s3"
    local = export_dataset(store, local_out, shards=True, shard_bytes=SHARD_BYTES)
    remote = export_dataset(s3, s3_out, shards=True, shard_bytes=SHARD_BYTES)
    assert tree(s3_out) == tree(local_out)
    assert set(tree(s3_out)) == expected_files() | set(local["shards"])
    assert {k: v for k, v in remote.items() if k != "out"} == {k: v for k, v in local.items() if k != "out"}
    again = export_dataset(s3, s3_out, shards=True, shard_bytes=SHARD_BYTES)
    assert again["shards_written"] == 0 and again["files_written"] == 0
    assert again["files_skipped"] == remote["files_written"]
