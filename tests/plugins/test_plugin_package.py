"""Adding a method, a model, a crawl source or an embedding backend is one file plus one entry point each
(issue 22): the throwaway package ``kd3toy`` (conftest.py) is found by name, its settings are config keys
validated when the config loads and listed by ``--help``, and a tiny distill, crawl and curate run through it."""
from __future__ import annotations

import shutil

import pytest
import torch

from kd3demo.fakeweb import FakeWeb, make_jpeg
from pipeline.app import cli
from pipeline.core import plugins
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.io import read_jsonl

torch.set_num_threads(1)


def test_the_package_plugins_are_found_by_name(toy_package):
    assert "toykd" in plugins.names("kd3.methods") and "toy_net" in plugins.names("kd3.models")
    assert "toy" in plugins.names("kd3.sources") and "toyemb" in plugins.names("kd3.embedders")
    from crawlers.source import source_names

    assert source_names() == plugins.names("kd3.sources")  # one list of source names: the registry's
    cfg = load_config(None, {"distill.method": "toykd", "distill.toykd.weight": 0.5, "distill.student": "toy_net",
                             "distill.student_settings": {"width": 4}, "crawl.sources": ["toy"],
                             "crawl.toy_count": 2, "crawl.toy_urls": {"cat": ["http://127.0.0.1:1/a.jpg"]}})
    assert cfg.distill.method_config() is cfg.distill.toykd and cfg.distill.toykd.weight == 0.5
    assert cfg.distill.kd3.tau == 0.95  # the built-ins keep their sections
    assert cfg.crawl.toy_count == 2 and cfg.crawl.target() == 200
    again = load_config(None, cfg.public_dict())  # a resolved config.yaml loads back
    assert again.distill.toykd == cfg.distill.toykd and again.crawl.toy_count == 2


@pytest.mark.parametrize("override, needle", [
    ({"distill.toykd.weight": 0}, "distill.toykd.weight: Input should be greater than 0"),
    ({"distill.toykd.wieght": 1}, "distill.toykd.wieght: unknown key"),
    ({"crawl.toy_count": 0}, "crawl.toy_count: Input should be greater than 0"),
    ({"curate.toy_side": 99}, "curate.toy_side: Input should be less than or equal to 32"),
    ({"curate.embed_backend": "toyem"}, "unknown embedding backend 'toyem'"),
    ({"distill.student": "toy_net", "distill.student_settings": {"width": 99}},
     "distill.student_settings.width: Input should be less than or equal to 64"),
    ({"distill.student": "cnn_tiny", "distill.student_settings": {"width": 4}},
     "distill.student_settings: student 'cnn_tiny' takes no settings"),
])
def test_plugin_settings_are_validated_when_the_config_loads(toy_package, override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, override)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_help_lists_the_plugin_settings_and_a_bad_flag_is_one_line(toy_package, capsys, tmp_path):
    for cmd, flags in ((["distill"], ("--distill.toykd.weight X", "--distill.toykd.temperature X")),
                       (["crawl"], ("--crawl.toy_count N", "--crawl.toy_urls YAML")),
                       (["curate"], ("--curate.toy_side N",))):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([*cmd, "--help"])
        out = capsys.readouterr().out
        for f in flags:
            assert f in out, f
    assert cli.main(["crawl", "--set", "name=x", "--set", f"runs_root={tmp_path}", "--classes", "cat",
                     "--crawl.sources", "toy", "--crawl.toy_urls", "{cat: [http://127.0.0.1:1/a.jpg]}",
                     "--crawl.toy_count", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd3: error:") and "crawl.toy_count" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert cli.main(["crawl", "--set", "name=x", "--set", f"runs_root={tmp_path}", "--classes", "cat",
                     "--crawl.sources", "toy"]) == 2  # the source's own check, before any work
    assert "source 'toy' needs crawl.toy_urls" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_tiny_distill_through_the_plugin_method_and_model(toy_package, digits_world, tmp_path):
    from distill.stage import distill
    from distill.teacher import load_teacher

    import kd3toy

    run = tmp_path / "runs" / "web"
    shutil.copytree(digits_world["run"], run)
    cfg = load_config(None, {"name": run.name, "runs_root": str(run.parent), "teacher": str(digits_world["teacher"]),
                             "distill": {"method": "toykd", "toykd": {"weight": 0.5, "temperature": 3.0},
                                         "student": "toy_net", "student_settings": {"width": 6}, "epochs": 2,
                                         "batch_size": 32, "workers": 0, "device": "cpu", "val_fraction": 0.1,
                                         "eval_dir": str(digits_world["eval_dir"])}})
    m = distill(cfg, out_id="toy")
    assert kd3toy.ToyKD.seen[-1] == kd3toy.ToyKDSettings(weight=0.5, temperature=3.0)
    assert m["method"] == "toykd" and m["student"] == "toy_net" and m["final"]["done"]
    assert [set(e["losses"]) for e in m["epochs"]] == [{"toy_kd", "total"}] * 2
    assert m["config"]["toykd"] == {"weight": 0.5, "temperature": 3.0}
    student, meta = load_teacher(str(run / "distill" / "toykd-toy" / "student.pt"), "cpu")
    assert isinstance(student, kd3toy.ToyNet) and student.feature_dim == 6  # rebuilt with its settings
    assert meta["arch"] == "toy_net" and meta["arch_kwargs"] == {"width": 6}


def test_a_tiny_crawl_and_curate_through_the_plugin_source_and_embedder(toy_package, tmp_path):
    from crawlers.stage import crawl
    from pipeline.curate import curate

    import kd3toy

    with FakeWeb() as web:
        urls = {c: [web.add_image(f"{c}{i}.jpg", make_jpeg(seed=i + 10 * k)) for i in range(4)]
                for k, c in enumerate(("cat", "dog"))}
        cfg = load_config(None, {"name": "toy", "runs_root": str(tmp_path / "runs"), "classes": ["cat", "dog"],
                                 "crawl.sources": ["toy"], "crawl.toy_urls": urls, "crawl.toy_count": 3,
                                 "crawl.per_class": 2, "crawl.allow_private_hosts": True,
                                 "crawl.rate_limit_per_domain": 1000.0, "crawl.threads": 2,
                                 "curate.embed_backend": "toyemb", "curate.toy_side": 12, "curate.device": "cpu",
                                 "curate.workers": 1})
        summary = crawl(cfg)
    assert {c: s["downloaded"] for c, s in summary["classes"].items()} == {"cat": 2, "dog": 2}
    rows = read_jsonl(tmp_path / "runs" / "toy" / "crawl" / "records.jsonl")
    assert rows and {r["engine"] for r in rows} == {"toy"}
    assert {r["query"] for r in rows} == {"toy:cat", "toy:dog"}
    assert all((tmp_path / "runs" / "toy" / r["path"]).is_file() for r in rows if r["status"] == "ok")
    manifest = curate(cfg)
    assert kd3toy.ToyEmbedder.built_with == [12]
    assert manifest["embedding"]["backend"] == "toyemb" and manifest["embedding"]["dim"] == 3 * 12 * 12
    assert sum(manifest["class_counts"].values()) == 4
