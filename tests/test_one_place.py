"""One new server setting touches one file: an OPTIONS entry and a ServerConfig field.

The test adds a server option the way common/config.py declares one (an :data:`OPTIONS` entry
and a field of a class built like :class:`ServerConfig`) and nothing else, then follows it to
ps-server's parser, ps-launch's parser (the launcher's class built by the same
:func:`launch_config` as :class:`LaunchConfig`), a config file, a ``PS_*`` variable, and the
command line the launcher gives the server it starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import (LAUNCHER_OMITS, OPTIONS, LaunchConfig, LaunchFields, Option, ServerConfig, build_parser,
                           launch_config, parse_config)
from common.errors import ConfigError
from worker.launch import server_argv


@pytest.fixture
def with_knob(monkeypatch: pytest.MonkeyPatch) -> tuple[type, type]:
    """A server with one more option, ``--knob``, and its launcher's configuration class."""
    monkeypatch.setitem(OPTIONS, "knob", Option("--knob", float, "a setting added in one place", group="server"))

    def check(self) -> None:
        ServerConfig.__post_init__(self)
        if self.knob < 0:
            raise ConfigError(f"--knob must not be negative, got {self.knob}")

    server = dataclasses.make_dataclass("ServerConfig", [("knob", "float", dataclasses.field(default=1.5))],
                                        bases=(ServerConfig,), frozen=True, namespace={"__post_init__": check})
    return server, launch_config(server)


def _help(cls: type, prog: str) -> str:
    return " ".join(build_parser(cls, prog, "").format_help().split())


def test_the_real_launch_config_is_built_from_the_server_config() -> None:
    assert LaunchConfig.SERVER is ServerConfig and issubclass(LaunchConfig, LaunchFields)
    assert [f.name for f in dataclasses.fields(LaunchConfig)] == \
        [f.name for f in dataclasses.fields(launch_config(ServerConfig))]
    launch = {f.name: f.default for f in dataclasses.fields(LaunchConfig)}
    own = {f.name for f in dataclasses.fields(LaunchFields)}
    for f in dataclasses.fields(ServerConfig):  # every server option is the launcher's, with its default
        if f.name in LAUNCHER_OMITS:
            assert f.name not in launch, f.name
        elif f.name not in own:
            assert launch[f.name] == f.default, f.name


def test_a_new_server_option_reaches_ps_server(with_knob) -> None:
    server, _ = with_knob
    assert "--knob KNOB a setting added in one place [PS_KNOB; default: 1.5]" in _help(server, "ps-server")
    assert parse_config(server, ["--workers", "1"], "ps-server", environ={}).knob == 1.5
    assert parse_config(server, ["--workers", "1", "--knob", "2.5"], "ps-server", environ={}).knob == 2.5
    assert parse_config(server, ["--workers", "1"], "ps-server", environ={"PS_KNOB": "3"}).knob == 3.0


def test_a_new_server_option_reaches_ps_launch_its_file_and_its_checks(with_knob, tmp_path: Path) -> None:
    server, launch = with_knob
    assert "--knob KNOB a setting added in one place [PS_KNOB; default: 1.5]" in _help(launch, "ps-launch")
    assert parse_config(launch, [], "ps-launch", environ={}).knob == 1.5
    assert parse_config(launch, ["--knob", "2.5"], "ps-launch", environ={}).knob == 2.5
    assert parse_config(launch, [], "ps-launch", environ={"PS_KNOB": "3"}).knob == 3.0
    (tmp_path / "job.toml").write_text("knob = 4\n")
    assert parse_config(launch, ["--config", str(tmp_path / "job.toml")], "ps-launch", environ={}).knob == 4.0
    with pytest.raises(ConfigError, match="--knob must not be negative"):  # the server's own check, at once
        parse_config(launch, ["--knob", "-1"], "ps-launch", environ={})


def test_a_new_server_option_reaches_the_launched_servers_command_line(with_knob, tmp_path: Path) -> None:
    server, launch = with_knob
    cfg = parse_config(launch, ["--knob", "2.5", "--lr", "0.5"], "ps-launch", environ={})
    argv = server_argv(cfg, tmp_path / "endpoint", str(tmp_path / "ck"))
    assert argv[1:3] == ["-m", "ps"] and argv[argv.index("--knob") + 1] == "2.5"
    got = parse_config(server, argv[3:], "ps-server", environ={})  # what ps-server makes of it
    assert got.knob == 2.5 and got.lr == 0.5 and got.workers == cfg.workers


def test_the_launched_server_gets_every_option_of_the_launcher_and_only_the_bound_endpoint(tmp_path: Path) -> None:
    argv = ["--workers", "3", "--optimizer", "adam", "--lr", "0.5", "--sync", "ssp", "--staleness", "2",
            "--metrics-port", "0", "--shm", "off", "--lease", "7", "--log-level", "debug"]
    cfg = parse_config(LaunchConfig, argv, "ps-launch", environ={})
    ckpt, ready = str(tmp_path / "ck"), tmp_path / "endpoint"
    got = parse_config(ServerConfig, server_argv(cfg, ready, ckpt)[3:], "ps-server", environ={})
    assert got == ServerConfig(bind="tcp://127.0.0.1:0", workers=3, optimizer="adam", lr=0.5, sync="ssp",
                               staleness=2, checkpoint_dir=ckpt, metrics_port=0, shm="off", lease=7.0,
                               log_level="debug", ready_file=str(ready),
                               metrics_log=str(tmp_path / "ck" / "metrics.jsonl"))
    flags = set(server_argv(cfg, ready, ckpt))
    assert not ({OPTIONS[n].flag for n in LAUNCHER_OMITS} - {"--bind", "--ready-file"}) & flags


def test_ps_launch_refuses_what_the_server_would_refuse_before_starting_anything() -> None:
    from worker.launch import main

    with pytest.raises(ConfigError, match="needs --sync bsp"):
        parse_config(LaunchConfig, ["--sync", "async", "--nonfinite", "skip"], "ps-launch", environ={})
    assert main(["--lr", "-1"]) == 2


def test_an_omitted_name_the_server_lacks_is_an_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Small:
        workers: int = 1

    with pytest.raises(TypeError, match="LAUNCHER_OMITS names"):
        launch_config(Small)
