"""Publishing in constant time (per-sample record documents) and the layout materialised from them
(shared/sparkle/published.py, ArtifactStore.publish_sample).

The byte-identity fixtures were written by the code before this change (commit 2a880ca: ``store.publish`` with
per-file upserts, then ``sparkle export``) from :func:`sparkle.synthetic.synthetic_sample` records, published out
of id order, with prompts holding U+2028, U+2029, U+0085, CRLF, quotes, commas, newlines and non-ASCII, and a
NaN score: ``tests/fixtures/layout_v1`` is that export, ``tests/fixtures/legacy_store`` the store's own files.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest

from sparkle import layout
from sparkle.export import ExportError, export_dataset
from sparkle.published import (LayoutError, adopt_legacy, materialise_layout, published_documents, published_ids,
                               sample_document)
from sparkle.store import LocalStore, staging_prefix
from sparkle.synthetic import synthetic_sample

FIXTURES = Path(__file__).parent / "fixtures"
SPECIAL = {  # the prompts of the fixture's samples (see the module docstring)
    ("location", 3): "Replace the background with a beach\u2028at dusk, \"golden\" light",
    ("location", 1): "Replace the background with a market,\nbusy; commas, and \u2029 separators\u0085 and \r\n CRLF",
    ("openve3m", 0): "Change the background to a caf\u00e9 in Kyoto \u2014 \u96e8\u306e\u65e5 \U0001F327",
}
ORDER = [("location", 3), ("location", 0), ("openve3m", 1), ("location", 4), ("location", 1), ("openve3m", 0),
         ("location", 2)]


def publish_synthetic(store, et: str, index: int, prompt: str | None = None, nan: bool = False) -> str:
    """Stage a sample's two videos and publish it through ``publish_sample`` as orchestrator/pipeline.py does;
    returns its id."""
    s = synthetic_sample(et, index, prompt)
    if nan:
        s["records"]["edited_video_score"]["editscore"][0]["O_score"] = float("nan")
    sid = s["id"]
    moves = {}
    for key in (layout.source_video(et, sid), layout.edited_video(et, sid)):
        store.put_bytes(staging_prefix(sid) + key, f"{key}\n".encode())
        moves[staging_prefix(sid) + key] = key
    doc = sample_document(sid, et, s["prompt"], s["chosen_keyword"], s["original_scene"], s["records"])
    assert store.publish_sample(moves, layout.document(et, sid), doc)
    return sid


def publish_fixture_samples(store) -> None:
    for et, i in ORDER:
        publish_synthetic(store, et, i, SPECIAL.get((et, i)), nan=(et, i) == ("location", 4))


def text_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".jsonl"))


def assert_same_as_fixture(root: Path) -> None:
    fixture = FIXTURES / "layout_v1"
    assert text_files(root) == text_files(fixture)
    for rel in text_files(fixture):
        assert filecmp.cmp(fixture / rel, root / rel, shallow=False), rel


def test_publish_writes_one_document_and_touches_nothing_shared(tmp_path):
    store = LocalStore(tmp_path)
    sid = publish_synthetic(store, "location", 7)
    keys = store.list_keys("")
    assert keys == sorted([layout.document("location", sid), layout.source_video("location", sid),
                           layout.edited_video("location", sid)])
    doc = json.loads(store.get_bytes(layout.document("location", sid)))
    assert doc["row"]["task"] == sid and set(doc["records"]) == set(layout.RECORD_NAMES)
    assert b"\n" not in store.get_bytes(layout.document("location", sid))  # compact: one line
    # a re-delivered publish is a no-op, even when its staged files are gone
    assert not store.publish_sample({staging_prefix(sid) + "x.mp4": "x.mp4"}, layout.document("location", sid), doc)
    assert store.list_keys("") == keys


def test_a_publish_cut_short_is_completed_by_running_it_again(tmp_path):
    store = LocalStore(tmp_path)
    s = synthetic_sample("season", 2)
    sid = s["id"]
    moves = {}
    for key in (layout.source_video("season", sid), layout.edited_video("season", sid)):
        store.put_bytes(staging_prefix(sid) + key, b"v")
        moves[staging_prefix(sid) + key] = key
    first = next(iter(moves))
    store.move(first, moves[first])  # the crash: one move done, no document
    assert published_ids(store, "season") == []
    doc = sample_document(sid, "season", s["prompt"], s["chosen_keyword"], s["original_scene"], s["records"])
    assert store.publish_sample(moves, layout.document("season", sid), doc)
    assert published_ids(store, "season") == [sid]
    assert all(store.exists(dst) for dst in moves.values()) and store.list_keys("staging/") == []
    with pytest.raises(KeyError):  # a staged artifact that is nowhere is an error, not a silent skip
        store.publish_sample({"staging/x/y.mp4": "y.mp4"}, layout.document("season", "Sparkle_season_000009"), doc)


def test_export_of_documents_is_byte_identical_to_the_old_layout(tmp_path):
    store = LocalStore(tmp_path / "store")
    publish_fixture_samples(store)
    assert not (store.root / "prompts").exists()  # nothing shared was written by the publishes
    summary = export_dataset(store, tmp_path / "export")
    assert summary["layout"] == {"location": {"mode": "full", "documents_read": 5},
                                 "openve3m": {"mode": "full", "documents_read": 2}}
    assert_same_as_fixture(tmp_path / "export")


def test_materialising_in_place_after_each_publish_gives_the_same_bytes(tmp_path):
    """The embedded default materialises its folder after every sample: merged in out of id order, the files
    end byte-identical to the old layout, and each merge reads only the new documents."""
    store = CountingStore(tmp_path)
    modes = []
    for et, i in ORDER:
        publish_synthetic(store, et, i, SPECIAL.get((et, i)), nan=(et, i) == ("location", 4))
        store.reads.clear()
        modes.append(materialise_layout(store)[et]["mode"])
        assert store.reads == [layout.document(et, layout.sample_id(et, i))]  # the new document only
    assert modes == ["full", "incremental", "full", "incremental", "incremental", "incremental", "incremental"]
    assert_same_as_fixture(tmp_path)
    store.reads.clear()
    assert {r["mode"] for r in materialise_layout(store).values()} == {"unchanged"} and store.reads == []


class CountingStore(LocalStore):
    """A local store that records which record documents were read."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        if key.startswith(layout.PUBLISHED_PREFIX):
            self.reads.append(key)
        return super().get_bytes(key)


def test_a_legacy_store_is_adopted_and_exports_the_same_bytes(tmp_path):
    store = LocalStore(tmp_path / "store")
    shutil.copytree(FIXTURES / "legacy_store", store.root)
    for et, i in ORDER:  # the old publish had moved the videos into the layout
        sid = layout.sample_id(et, i)
        store.put_bytes(layout.source_video(et, sid), b"s")
        store.put_bytes(layout.edited_video(et, sid), b"e")
    export_dataset(store, tmp_path / "export")
    assert_same_as_fixture(tmp_path / "export")
    assert published_ids(store, "location") == [layout.sample_id("location", i) for i in range(5)]
    assert adopt_legacy(store, "location") == 0  # once
    materialise_layout(store)  # the legacy files (publish order) are rebuilt in id order
    assert_same_as_fixture(store.root)


def test_a_folder_the_merge_cannot_trust_is_rebuilt(tmp_path):
    store = LocalStore(tmp_path / "store")
    out = tmp_path / "out"
    for i in range(3):
        publish_synthetic(store, "time", i)
    materialise_layout(store, out)
    reference = {p: (out / p).read_bytes() for p in text_files(out)}
    csv_path = out / layout.prompts_csv("time")
    header, *rows = csv_path.read_text().split("\n")[:-1]
    csv_path.write_text("\n".join([header, rows[1], rows[0], rows[2]]) + "\n")  # out of id order
    assert materialise_layout(store, out)["time"]["mode"] == "full"
    assert {p: (out / p).read_bytes() for p in text_files(out)} == reference
    (out / layout.record("time", "edited_video_score")).write_bytes(b"not json\n")  # a broken record file
    publish_synthetic(store, "time", 3)
    assert materialise_layout(store, out)["time"]["mode"] == "full"
    publish_synthetic(store, "time", 4)
    assert materialise_layout(store, out)["time"]["mode"] == "incremental"
    full = tmp_path / "full"
    materialise_layout(store, full, incremental=False)
    assert [(full / p).read_bytes() for p in text_files(full)] == [(out / p).read_bytes() for p in text_files(out)]


def test_ids_past_six_digits_keep_id_order(tmp_path):
    store = LocalStore(tmp_path)
    for i in (1_000_000, 999_999, 5):
        publish_synthetic(store, "style", i)
    assert published_ids(store, "style") == [layout.sample_id("style", i) for i in (5, 999_999, 1_000_000)]
    materialise_layout(store)
    tasks = [line.rsplit(",", 1)[1] for line in (tmp_path / layout.prompts_csv("style")).read_text().split("\n")[1:-1]]
    assert tasks == published_ids(store, "style")


def test_a_malformed_document_fails_the_export_before_anything_changes(tmp_path):
    store = LocalStore(tmp_path / "store")
    for i in range(2):
        publish_synthetic(store, "location", i)
    export_dataset(store, tmp_path / "export")
    before = {p: (tmp_path / "export" / p).read_bytes() for p in text_files(tmp_path / "export")}
    sid = publish_synthetic(store, "location", 2)
    doc = json.loads(store.get_bytes(layout.document("location", sid)))
    doc["row"]["src_video"] = "elsewhere.mp4"
    store.put_json(layout.document("location", sid), doc)
    with pytest.raises(ExportError, match=f"{sid}: its row names other videos"):
        export_dataset(store, tmp_path / "export")
    after = {p: (tmp_path / "export" / p).read_bytes() for p in text_files(tmp_path / "export")}
    assert after == before and not list((tmp_path / "export").rglob("*.part"))
    store.put_bytes(layout.document("location", sid), b"{")
    with pytest.raises(LayoutError, match="is not JSON"):
        list(published_documents(store, "location"))


def test_a_legacy_row_without_metadata_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(layout.prompts_csv("season"), b"prompt,src_video,tgt_video,task\np,season/source_video/"
                    b"Sparkle_season_000000.mp4,season/edited_video/Sparkle_season_000000.mp4,Sparkle_season_000000\n")
    with pytest.raises(LayoutError, match="Sparkle_season_000000: no record in prompts/season_train_metadata"):
        adopt_legacy(store, "season")
    assert published_ids(store, "season") == []
