"""pipeline.core.records: small readers that several stages share."""
import json
from pathlib import Path

from pipeline.core.records import downloads_per_class, shard_path


def test_shard_path_resolves_like_a_wids_index(tmp_path):
    man = tmp_path / "run" / "manifest.json"
    assert shard_path(man, "shards/a-000000.tar") == tmp_path / "run" / "shards" / "a-000000.tar"
    assert shard_path(man, "/data/b.tar") == Path("/data/b.tar")
    assert shard_path(man, "file:///data/c.tar") == Path("/data/c.tar")
    assert shard_path(man, "s3://bucket/d.tar") is None
    assert shard_path(man, "https://host/e.tar") is None


def test_downloads_per_class_counts_ok_rows_only(tmp_path):
    rec = tmp_path / "records.jsonl"
    rows = [{"class": "cat", "status": "ok"}, {"class": "cat", "status": "ok"}, {"class": "cat", "status": "error"},
            {"class": "dog", "status": "duplicate"}, {"class": "dog", "status": "ok"}]
    rec.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert downloads_per_class(rec) == {"cat": 2, "dog": 1}
