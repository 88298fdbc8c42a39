"""``--config FILE`` (TOML), its precedence, unknown keys, and the grouped ``--help``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from common.config import (ESSENTIALS, OPTIONS, START_HERE, LaunchConfig, ServerConfig, WorkerConfig, build_parser,
                           parse_config)
from common.errors import ConfigError
from tests.procs import ROOT, child_env


def server(argv, env=None, tmp=None, text=None, defaults=None):
    if text is not None:
        path = tmp / "job.toml"
        path.write_text(text)
        argv = [*argv, "--config", str(path)]
    return parse_config(ServerConfig, argv, prog="ps-server", environ=env or {}, defaults=defaults)


def test_precedence_is_command_line_then_environment_then_file_then_default(tmp_path):
    text = 'workers = 3\nlr = 0.5\nsync = "ssp"\nstaleness = 2\n'
    cfg = server([], tmp=tmp_path, text=text)
    assert (cfg.workers, cfg.lr, cfg.sync, cfg.staleness, cfg.optimizer) == (3, 0.5, "ssp", 2, "sgd")
    assert server([], {"PS_LR": "0.2"}, tmp_path, text).lr == 0.2
    assert server(["--lr", "0.1"], {"PS_LR": "0.2"}, tmp_path, text).lr == 0.1
    # presets (an example's) sit below the file
    assert server([], tmp=tmp_path, text=text, defaults={"lr": 9.0, "optimizer": "adam"}).lr == 0.5
    assert server([], tmp=tmp_path, text=text, defaults={"optimizer": "adam"}).optimizer == "adam"


def test_keys_may_use_dashes_and_the_file_may_come_from_ps_config(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('world-size = 4\nrank = 3\nbatch-size = 64\nno_shuffle = true\nworkers = 4\n')
    cfg = parse_config(WorkerConfig, [], prog="ps-worker", environ={"PS_CONFIG": str(path)})
    assert (cfg.world_size, cfg.rank, cfg.batch_size, cfg.no_shuffle) == (4, 3, 64, True)


@pytest.mark.parametrize("text, named", [
    ("workers = 2\nlerning_rate = 0.1\n", "'lerning_rate'"),
    ("workers = 2\nlr = 'fast'\n", "lr must be a number"),
    ("workers = 2\nsync = 'eventual'\n", "sync must be one of bsp, async, ssp"),
    ("workers = true\n", "workers must be an integer"),
    ("[train]\nworkers = 2\n", "'train'"),
    ("[server]\nworkers = 2\n", "server must be a string"),
    ("workers = \n", "not valid TOML"),
])
def test_a_bad_file_fails_at_start_naming_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        server([], tmp=tmp_path, text=text)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        server(["--config", str(tmp_path / "nope.toml"), "--workers", "1"])


@pytest.mark.parametrize("cls, prog", [(ServerConfig, "ps-server"), (WorkerConfig, "ps-worker"),
                                       (LaunchConfig, "ps-launch")])
def test_help_lists_every_option_of_the_role_under_its_group(cls, prog):
    text = build_parser(cls, prog, "").format_help()
    for f in dataclasses.fields(cls):
        opt = OPTIONS[f.name]
        assert opt.flag in text and opt.env in text, f.name
        group = START_HERE if f.name in ESSENTIALS[cls.__name__] else opt.group  # the first run's options first
        group_at = text.index(f"\n{group}:\n")
        next_group = text.find(":\n  --", group_at + len(group) + 3)
        at = re.search(rf"\n  {re.escape(opt.flag)}[ \n]", text)  # not a prefix of another flag (--model)
        assert at is not None and group_at < at.start() < (next_group if next_group > 0 else len(text)), f.name
    assert "--config FILE" in text and "config file > default" in " ".join(text.split())


def test_ps_server_refuses_an_unknown_key_before_starting(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("workers = 2\nstalenes = 3\n")
    proc = subprocess.run([sys.executable, "-m", "ps", "--config", str(path)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'stalenes'" in proc.stderr, proc.stderr
