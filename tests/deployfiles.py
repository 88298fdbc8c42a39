"""Reading the files in ``deploy/`` the way their runtimes do, for the tests.

Each reader turns a deploy file into what its runtime would execute - an argv and an
environment - with only the substitutions the runtime itself makes (systemd specifiers and
environment files, compose variable interpolation and ``env_file``, Kubernetes
``envFrom``/``valueFrom`` and ``$(VAR)``). The tests then parse those with the programs'
own parsers and run them; nothing about the commands is copied into the tests.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

PROGRAMS = ("ps-server", "ps-worker", "ps-ping", "ps-launch")
"""The console scripts whose command lines the deploy files may contain."""


@dataclass
class Command:
    """One command line found in a deploy file: what runs, with which environment."""

    where: str  # file and place, for messages
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def program(self) -> str:
        """The console script's name (``ps-server`` ...), whatever directory it is in."""
        return Path(self.argv[0]).name


# ------------------------------------------------------------------ systemd
_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=([^\"'\\$`]*)$")
_COMMENTED = re.compile(r"^#\s?([A-Z_][A-Z0-9_]*)=")


def read_env_file(path: Path) -> dict[str, str]:
    """A systemd ``EnvironmentFile=`` (also a compose ``env_file``), restricted to plain lines.

    Only ``NAME=value`` lines without quotes, escapes or ``$`` are accepted, so the file means
    the same to systemd, compose and this reader; anything else fails the test.
    """
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = _ENV_LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: not a plain NAME=value line: {line!r}")
        env[m.group(1)] = m.group(2).strip()
    return env


def documented_env(path: Path) -> set[str]:
    """Every variable an env file sets or shows commented out (``#PS_X=default``)."""
    names = set(read_env_file(path))
    for line in path.read_text().splitlines():
        m = _COMMENTED.match(line.strip())
        if m:
            names.add(m.group(1))
    return names


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as ``{section: [(key, value), ...]}`` (keys may repeat, as in systemd)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for line in path.read_text().splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}: unexpected line {line!r}")
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def expand_specifiers(text: str, spec: Mapping[str, str]) -> str:
    """systemd's ``%X`` specifiers (``%%`` is a literal %); an unknown one fails."""
    def sub(m: re.Match[str]) -> str:
        c = m.group(1)
        if c == "%":
            return "%"
        if c not in spec:
            raise KeyError(f"specifier %{c} is not provided by the test")
        return spec[c]

    return re.sub(r"%(.)", sub, text)


@dataclass
class UnitHost:
    """What one machine provides to a unit: specifier values, files by path, program paths."""

    specifiers: dict[str, str]
    files: dict[str, Path]  # absolute path in the unit -> the file to read instead
    programs: Callable[[str], str]  # ExecStart's argv[0] -> the program to run


def unit_command(unit: Path, host: UnitHost, dropins: list[Path] = ()) -> Command:  # type: ignore[assignment]
    """What systemd would run for ``unit`` (plus drop-ins) on ``host``: ExecStart and its environment.

    Order as in systemd: every ``Environment=`` first, then each ``EnvironmentFile=`` in
    order (a leading ``-`` makes a missing file fine), later ones winning.
    """
    entries = [kv for f in [unit, *dropins] for kv in read_unit(f).get("Service", [])]
    env: dict[str, str] = {}
    for key, value in entries:
        if key == "Environment":
            for word in shlex.split(expand_specifiers(value, host.specifiers)):
                name, _, val = word.partition("=")
                env[name] = val
    for key, value in entries:
        if key == "EnvironmentFile":
            optional = value.startswith("-")
            path = expand_specifiers(value.lstrip("-"), host.specifiers)
            local = host.files.get(path)
            if local is None or not local.exists():
                if optional:
                    continue
                raise FileNotFoundError(f"{unit.name}: EnvironmentFile={path} is not provided")
            env.update(read_env_file(local))
    starts = [v for k, v in entries if k == "ExecStart"]
    if len(starts) != 1:
        raise ValueError(f"{unit.name}: expected one ExecStart=, got {len(starts)}")
    argv = shlex.split(expand_specifiers(starts[0].lstrip("-@:+!"), host.specifiers))
    argv = [re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), a) for a in argv]
    where = "+".join([unit.name, *(f"{d.parent.parent.name}/{d.parent.name}/{d.name}" for d in dropins)])
    return Command(f"{where} ExecStart", [host.programs(argv[0]), *argv[1:]], env)


# ------------------------------------------------------------------ compose
_INTERP = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose variable interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = environ.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            if op.endswith("?"):
                raise ValueError(f"required variable {name} is not set: {arg}")
            return arg
        return value or ""

    return _INTERP.sub(sub, text)


def _interpolate_tree(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [_interpolate_tree(x, environ) for x in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, environ) for k, v in node.items()}
    return node


def load_compose(*files: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Compose files merged (services' maps and lists combined as compose does for these keys),
    after interpolation with ``environ`` (the shell's environment; default: empty)."""
    merged: dict[str, Any] = {}
    for f in files:
        doc = _interpolate_tree(yaml.safe_load(f.read_text()), environ or {})
        for key, value in doc.items():
            if key == "services":
                services = merged.setdefault("services", {})
                for name, svc in value.items():
                    base = services.setdefault(name, {})
                    for k, v in svc.items():
                        if isinstance(v, dict) and isinstance(base.get(k), dict):
                            base[k] = {**base[k], **v}
                        elif isinstance(v, list) and isinstance(base.get(k), list) and k != "command":
                            base[k] = [*base[k], *v]
                        else:
                            base[k] = v
            elif isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def compose_env(service: Mapping[str, Any], env_files: Mapping[str, Path]) -> dict[str, str]:
    """A service's environment: its ``env_file`` entries (optional ones may be absent), then
    ``environment`` (which wins). ``env_files`` maps the path written in the file to a local file."""
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        local = env_files.get(path)
        if local is None or not local.exists():
            if required:
                raise FileNotFoundError(f"env_file {path} is not provided")
            continue
        env.update(read_env_file(local))
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    env.update({k: "" if v is None else str(v) for k, v in raw.items()})
    return env


def compose_commands(compose: Mapping[str, Any], where: str,
                     env_files: Mapping[str, Path] | None = None) -> Iterator[Command]:
    """Every service's ``command`` and exec-form healthcheck ``test``, with the service's environment."""
    for name, svc in compose.get("services", {}).items():
        env = compose_env(svc, env_files or {})
        command = svc.get("command")
        if command is not None:
            yield Command(f"{where} services.{name}.command",
                          command if isinstance(command, list) else shlex.split(command), env)
        test = svc.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
            argv = test[1:] if test[0] == "CMD" else shlex.split(test[1])
            yield Command(f"{where} services.{name}.healthcheck", argv, env)


# ------------------------------------------------------------------ kubernetes
def load_k8s(directory: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in ``directory``'s YAML files (not the kustomization)."""
    docs = []
    for f in sorted(directory.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _pod_spec(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if obj.get("kind") in ("StatefulSet", "Deployment", "Job", "DaemonSet", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if obj.get("kind") == "Pod":
        return obj["spec"]
    return None


def k8s_env(container: Mapping[str, Any], objects: list[dict[str, Any]],
            field_values: Mapping[str, str]) -> dict[str, str]:
    """A container's environment: ``envFrom`` ConfigMaps, then ``env`` (values, and
    ``valueFrom.fieldRef`` looked up in ``field_values`` by field path)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o.get("kind") == "ConfigMap"}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update({k: str(v) for k, v in maps[src["configMapRef"]["name"]].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _k8s_expand(str(item["value"]), env)
        else:
            ref = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = field_values[ref]
    return env


def _k8s_expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$`` escapes; an unknown variable stays as written)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def k8s_commands(objects: list[dict[str, Any]], field_values: Mapping[str, str],
                 override: Mapping[str, str] | None = None) -> Iterator[tuple[dict[str, Any], Command]]:
    """Every container's command + args, and its exec probes, with the container's environment.

    ``override`` is layered over the environment (a user's edits of the ConfigMap)."""
    for obj in objects:
        spec = _pod_spec(obj)
        if spec is None:
            continue
        for c in spec.get("containers", []):
            env = {**k8s_env(c, objects, field_values), **(override or {})}
            argv = [_k8s_expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]
            where = f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            yield obj, Command(where, argv, env)
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                exec_ = c.get(probe, {}).get("exec")
                if exec_:
                    yield obj, Command(f"{where} {probe}", [_k8s_expand(a, env) for a in exec_["command"]], env)


# ------------------------------------------------------------------ README
def readme_commands(path: Path) -> Iterator[Command]:
    """Command lines of our programs inside the README's ``sh`` code blocks (leading
    ``NAME=value`` words become the environment; anything before the program, such as
    ``kubectl exec POD --``, is dropped)."""
    in_block = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = stripped in ("```sh", "```bash", "```console")
            continue
        if not in_block:
            continue
        try:
            words = shlex.split(stripped, comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words):
            if Path(w).name in PROGRAMS:
                env = dict(x.split("=", 1) for x in words[:i] if re.match(r"^[A-Z_][A-Z0-9_]*=", x))
                yield Command(f"{path.name}:{n}", words[i:], env)
                break
