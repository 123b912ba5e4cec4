import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.app import cli
from pipeline.core.config import RunConfig, load_config, save_resolved
from pipeline.core.errors import ConfigError


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"name": "r1", "classes": ["cat", "dog"], "crawl": {"per_class": 7}}))
    cfg = load_config(p, {"crawl.per_class": 9, "curate.near_dup_threshold": 0.9})
    assert cfg.crawl.per_class == 9
    assert cfg.curate.near_dup_threshold == 0.9
    assert cfg.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"crawl": {"bogus": 1}}, "crawl.bogus: unknown key"),
        ({"crawl": {"per_class": -3}}, "crawl.per_class"),
        ({"crawl": {"per_class": "many"}}, "crawl.per_class"),
        ({"classes": ["a", "a"]}, "listed twice"),
        ({"classes": ["ok", "bad\x00name"]}, "NUL"),
        ({"classes": ["x" * 500]}, "longer than"),
        ({"crawl": {"query_templates": ["no placeholder"]}}, "placeholder"),
        ({"name": "../evil"}, "plain folder name"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, data, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert needle in msg
    assert "\n" not in msg
    assert str(p) in msg


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("crawl: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_has_no_secrets(tmp_path):
    cfg = load_config(None, {"name": "s", "runs_root": str(tmp_path), "classes": ["cat"],
                             "crawl.flickr_api_key": "SECRET-KEY-123", "crawl.proxy": "http://u:pw@proxy:3128"})
    assert cfg.crawl.flickr_key() == "SECRET-KEY-123"
    out = save_resolved(cfg)
    text = out.read_text()
    assert "SECRET-KEY-123" not in text and "pw@proxy" not in text
    again = load_config(out)  # the snapshot is itself a valid config
    assert again.crawl.per_class == cfg.crawl.per_class
    assert again.config_hash() == load_config(None, {"classes": ["cat"]}).config_hash()


def test_classes_from_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# digits\nzero\none\n\ntwo\n")
    cfg = load_config(None, {"classes_file": str(f)})
    assert cfg.resolved_classes() == ["zero", "one", "two"]
    f.write_text("zero\nzero\n")
    with pytest.raises(ConfigError, match="listed twice"):
        cfg.resolved_classes()
    with pytest.raises(ConfigError, match="no classes"):
        RunConfig().resolved_classes()


def test_cli_flags_and_set_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"classes": ["cat"]}))
    parser = cli.build_parser()
    args = parser.parse_args([
        "crawl", "--config", str(p), "--crawl.per_class", "12", "--classes", "cat,dog",
        "--crawl.sources", "bing,urls", "--no-crawl.respect_x_robots_tag",
        "--set", "crawl.retries=1", "--crawl.user_agent", "123",
    ])
    cfg = cli.config_from_args(args)
    assert cfg.crawl.per_class == 12
    assert cfg.classes == ["cat", "dog"]
    assert cfg.crawl.sources == ["bing", "urls"]
    assert cfg.crawl.respect_x_robots_tag is False
    assert cfg.crawl.retries == 1
    assert cfg.crawl.user_agent == "123"  # text fields stay text


def test_cli_run_dir_sets_name(tmp_path):
    run = tmp_path / "runs" / "myrun"
    cfg = load_config(None, {"name": "myrun", "runs_root": str(tmp_path / "runs"), "classes": ["a"]})
    save_resolved(cfg)
    args = cli.build_parser().parse_args(["curate", "--run", str(run), "--curate.min_side", "8"])
    got = cli.config_from_args(args)
    assert got.run_dir == run and got.classes == ["a"] and got.curate.min_side == 8


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "crawl", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"kd3: error: config file {tmp_path / 'missing.yaml'} does not exist"]


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    for cmd in ["crawl", "curate", "distill", "inspect", "run", "serve", "teacher", "demo"]:
        with pytest.raises(SystemExit) as ei:
            parser.parse_args([cmd, "--help"])
        assert ei.value.code == 0


@pytest.mark.parametrize(
    "distill, needle",
    [
        ({"method": "kd4"}, "unknown distillation method 'kd4'"),
        ({"student": "resnet181"}, "unknown student architecture 'resnet181'"),
        ({"tau": 0.9}, "distill.tau is now distill.kd3.tau"),
        ({"dfnd_keep": 0.3}, "distill.dfnd_keep is now distill.dfnd.keep"),
        ({"kd_temperature": 2}, "distill.kd_temperature is now distill.kd.temperature"),
        ({"kd3": {"taux": 1}}, "distill.kd3.taux: unknown key"),
    ],
)
def test_distill_names_and_moved_keys_fail_when_the_config_loads(tmp_path, distill, needle):
    """A method/student typo or a flat key of old stops at load, in one line, before any crawl."""
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"classes": ["cat"], "distill": distill}))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_per_method_sections_and_plugin_names():
    cfg = load_config(None, {"distill.method": "dfnd", "distill.dfnd.keep": 0.25, "distill.student": "timm:resnet18"})
    assert cfg.distill.method_config() is cfg.distill.dfnd and cfg.distill.dfnd.keep == 0.25
    assert load_config(None, {"distill.kd3.selection": False}).distill.kd3.selection is False
    from distill.methods._registry import METHODS
    from distill.models import list_models
    from pipeline.core import plugins

    assert plugins.names("kd3.methods") == METHODS.names() == ["dfnd", "kd", "kd3"]
    registered = [m for m in list_models() if ":" not in m]  # timm:<name>, torchvision:<name> pass through
    assert plugins.names("kd3.models") == registered  # every registered model is declared, and only those


def test_moved_key_as_a_flag_is_one_line(tmp_path, capsys):
    assert cli.main(["distill", "--set", "name=x", "--set", f"runs_root={tmp_path}", "--classes", "cat",
                     "--no-distill.selection"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd3: error:") and "distill.kd3.selection" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


# ---- command-line parsing (issue 13, item 8)

def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd3: error: "), err
    return lines[0]


def test_flag_prefixes_are_not_abbreviations(capsys):
    """argparse would read --crawl.per_clas as --crawl.per_class; kd3 refuses it and names the flag."""
    line = _parse_error(capsys, ["crawl", "--classes", "cat", "--crawl.per_clas", "7"])
    assert "--crawl.per_clas" in line and "did you mean --crawl.per_class?" in line
    line = _parse_error(capsys, ["distill", "--epoch", "3"])
    assert "did you mean --epochs?" in line


@pytest.mark.parametrize("argv, hint", [
    (["crawl", "--crawl.per_klass", "7"], "--crawl.per_class"),
    (["curate", "--curate.near_dup_treshold", "0.9"], "--curate.near_dup_threshold"),
    (["distill", "--distill.kd3.taux", "0.9"], "--distill.kd3.tau"),
    (["teacher", "train", "--data", "d", "--out", "o", "--epoch", "3"], "--epochs"),
    (["crawll"], "crawl"),
])
def test_unknown_flag_or_command_names_the_closest_in_one_line(capsys, argv, hint):
    assert f"did you mean {hint}?" in _parse_error(capsys, argv)


def test_help_shows_readable_metavars(capsys):
    parser = cli.build_parser()
    for cmd in (["crawl"], ["curate"], ["distill"], ["run"], ["serve"], ["inspect"], ["teacher", "train"], ["demo"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*cmd, "--help"])
        out = capsys.readouterr().out
        assert "OV__" not in out and " VALUE" not in out, (cmd, out)
        assert "-v, --verbose" in out, cmd
    parser.parse_args(["distill", "--epochs", "3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--help"])
    out = capsys.readouterr().out
    for shown in ("--epochs N", "--student ARCH", "--distill.lr X", "--distill.augment {rrc_flip,crop,flip,none}"):
        assert shown in out, shown


@pytest.mark.parametrize("argv, blamed", [
    (["--student", "resnet99"], "--student: Value error, unknown student architecture 'resnet99'"),
    (["--rdzv", "nohost"], "--rdzv: Value error, 'nohost' is not HOST:PORT"),
    (["--distill.epochs", "0"], "--distill.epochs: "),
    (["--set", "distill.epochs=-1"], "--set distill.epochs: "),
])
def test_a_bad_flag_is_blamed_not_the_run_config(tmp_path, capsys, argv, blamed):
    """`kd3 distill --run R --student resnet99`: the flag was wrong, not R/config.yaml (which is fine)."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"classes": ["cat", "dog"]}))
    assert cli.main(["distill", "--run", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd3: error: " + blamed), err
    assert "config.yaml" not in err[0]
    (run / "config.yaml").write_text(yaml.safe_dump({"classes": ["cat", "dog"], "distill": {"epochs": 0}}))
    assert cli.main(["distill", "--run", str(run)]) == 2  # ... and a bad value in the file names the file
    assert f"{run / 'config.yaml'}: distill.epochs" in capsys.readouterr().err


def test_config_yaml_is_written_once_per_run(tmp_path):
    """Every stage and per-class task saves the resolved config; the file is written the first time and left
    alone while it says the same (same inode, same bytes), rewritten when the config changes."""
    from pipeline.core.config import save_resolved

    cfg = load_config(None, {"name": "once", "runs_root": str(tmp_path), "classes": ["a", "b"]})
    path = save_resolved(cfg)
    ino = path.stat().st_ino
    for _ in range(3):
        assert save_resolved(cfg) == path and path.stat().st_ino == ino
    cfg2 = load_config(path, {"crawl.per_class": 7})
    save_resolved(cfg2)
    assert path.stat().st_ino != ino and load_config(path).crawl.per_class == 7
