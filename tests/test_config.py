"""Configuration: command line > PS_* environment > default; bad values fail at start."""

from __future__ import annotations

import pytest

from common.config import KNOWN_ENV, OPTIONS, LaunchConfig, ServerConfig, WorkerConfig, parse_config
from common.errors import ConfigError


def parse(cls, argv, env=None):
    return parse_config(cls, argv, prog="t", environ=env or {})


def test_precedence_cli_over_env_over_default() -> None:
    assert parse(ServerConfig, ["--workers", "2"]).lr == 0.01
    assert parse(ServerConfig, ["--workers", "2"], {"PS_LR": "0.5"}).lr == 0.5
    assert parse(ServerConfig, ["--workers", "2", "--lr", "0.25"], {"PS_LR": "0.5"}).lr == 0.25
    assert parse(ServerConfig, [], {"PS_WORKERS": "3"}).workers == 3


def test_boolean_flag_and_env() -> None:
    base = ["--rank", "0", "--world-size", "1"]
    assert parse(WorkerConfig, base).no_shuffle is False
    assert parse(WorkerConfig, [*base, "--no-shuffle"]).no_shuffle is True
    assert parse(WorkerConfig, base, {"PS_NO_SHUFFLE": "true"}).no_shuffle is True
    with pytest.raises(ConfigError, match="PS_NO_SHUFFLE"):
        parse(WorkerConfig, base, {"PS_NO_SHUFFLE": "maybe"})


@pytest.mark.parametrize("cls,argv,env,match", [
    (ServerConfig, [], {}, "--workers is required"),
    (ServerConfig, ["--workers", "0"], {}, "--workers must be positive"),
    (ServerConfig, ["--workers", "1", "--lr", "-1"], {}, "--lr must not be negative"),
    (ServerConfig, ["--workers", "1"], {"PS_LR": "fast"}, "PS_LR='fast'"),
    (ServerConfig, ["--workers", "1"], {"PS_OPTIMIZER": "lbfgs"}, "must be one of"),
    (ServerConfig, ["--workers", "1"], {"PS_LEARNING_RATE": "1"}, "unknown environment variable"),
    (WorkerConfig, ["--world-size", "2", "--mode", "pipeline"], {}, "--rank is required in pipeline mode"),
    (WorkerConfig, ["--world-size", "2", "--worker-id", ""], {}, "--worker-id must have 1 to 256"),
    (WorkerConfig, ["--rank", "2", "--world-size", "2"], {}, r"--rank must be in \[0, 2\)"),
    (WorkerConfig, ["--rank", "0", "--world-size", "2", "--device", "tpu"], {}, "--device must be"),
    (WorkerConfig, ["--rank", "0", "--world-size", "4", "--batch-size", "3"], {}, "smaller than the 4 workers"),
    (LaunchConfig, ["--workers", "0"], {}, "--workers must be positive"),
    (ServerConfig, ["--workers", "2", "--sync", "diloco", "--outer-delay", "2"], {}, "--outer-delay is 0 or 1"),
    (ServerConfig, ["--workers", "2", "--outer-delay", "1"], {}, "overlaps the rounds of --sync diloco, not of bsp"),
    (ServerConfig, ["--workers", "2", "--sync", "diloco-async", "--outer-delay", "1"], {}, "not of diloco-async"),
])
def test_bad_values_fail_with_the_option_named(cls, argv, env, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(cls, argv, env)


def test_bad_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(ServerConfig, ["--workers", "1", "--optimizer", "lbfgs"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_option_has_a_ps_variable_and_help() -> None:
    for name, opt in OPTIONS.items():
        assert opt.env == "PS_" + opt.flag[2:].upper().replace("-", "_")
        assert opt.env in KNOWN_ENV and opt.help


def test_cli_entry_points_reject_bad_config_with_status_2(capsys) -> None:
    from ps.cli import main as server_main
    from worker.cli import main as worker_main
    from worker.launch import main as launch_main

    assert server_main(["--workers", "0"]) == 2
    assert worker_main(["--rank", "5", "--world-size", "2"]) == 2
    assert launch_main(["--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "ps-server: error: --workers must be positive" in err
    assert "ps-worker: error: --rank must be in [0, 2)" in err
