"""Each kind of name is declared once (common/names.py); options and implementations follow it.

The options' choices and help come from the declaration; every implementation registry holds
exactly the declared names, and a registry that does not fails when its module is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch.nn.functional as F

from common.config import OPTIONS, JobFields, LaunchConfig, ServerConfig, WorkerConfig, build_parser
from common.names import Choice, Loss, Optimizer, PipelineSchedule, SyncModel, implementations
from tests.procs import ROOT, child_env

# kind -> (option, the module implementing it, its registry)
KINDS = {Optimizer: ("optimizer", "common.optimizers", "OPTIMIZERS"), SyncModel: ("sync", "ps.engine", "BUILTIN_RULES"),
         PipelineSchedule: ("schedule", "worker.pipeline.schedule", "MAKERS"),
         Loss: ("loss", "worker.losses", "LOSSES")}


def opt_name(kind: type[Choice]) -> str:
    return KINDS[kind][0]


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_every_registry_implements_exactly_the_declared_names(kind: type[Choice]) -> None:
    _, module, registry = KINDS[kind]
    impls = getattr(importlib.import_module(module), registry)
    assert tuple(impls) == kind.names()


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_the_option_takes_its_choices_and_help_from_the_declaration(kind: type[Choice]) -> None:
    opt = OPTIONS[opt_name(kind)]
    assert opt.names is kind and opt.choices == kind.names()
    for member in kind:
        assert member.description and "\n" not in member.description
        assert f"{member.value} {member.description}" in opt.text
    for cls in (ServerConfig, WorkerConfig, LaunchConfig):
        if any(f.name == opt_name(kind) for f in dataclasses.fields(cls)):
            help_text = " ".join(build_parser(cls, "prog", "").format_help().split())
            assert all(m.description in help_text for m in kind), cls.__name__


def test_defaults_are_declared_names_and_members_are_strings() -> None:
    assert ServerConfig.optimizer in Optimizer.names() and ServerConfig.sync in SyncModel.names()
    assert JobFields.loss in Loss.names() and JobFields.schedule in PipelineSchedule.names()
    assert SyncModel.BSP == "bsp" and f"{SyncModel.BSP}" == str(SyncModel.BSP) == "bsp"
    assert {"bsp": 1}[SyncModel.BSP] == 1 and SyncModel("ssp") is SyncModel.SSP


def test_worker_runtime_losses_is_the_registry() -> None:
    from worker.losses import LOSSES
    from worker.runtime import LOSSES as alias

    assert alias is LOSSES and LOSSES["mse"] is F.mse_loss and LOSSES["cross_entropy"] is F.cross_entropy


def test_implementations_names_a_missing_and_an_undeclared_name() -> None:
    both = {"sgd": 1, "momentum": 2, "adam": 3, "adamw": 4}
    assert implementations(Optimizer, {"adamw": 4, "adam": 3, "sgd": 1, "momentum": 2}, "m") == both  # declared order
    with pytest.raises(ImportError, match=r"^m: adam declared in common.names.Optimizer but not implemented$"):
        implementations(Optimizer, {"sgd": 1, "momentum": 2, "adamw": 4}, "m")
    with pytest.raises(ImportError, match=r"lbfgs implemented but not declared in common.names.Optimizer"):
        implementations(Optimizer, {**both, "lbfgs": 4}, "m")


# In a fresh interpreter: replace each declared kind by one with a name more, then by one with a
# name less, and import the module that implements it.
_PROBE = """
import importlib, json, sys
import common.config, common.names as names

kinds = json.loads(sys.argv[1])
out = {}
for kind, module in kinds.items():
    real = getattr(names, kind)
    members = {m.name: (m.value, m.description) for m in real}
    fakes = {"more": {**members, "EXTRA": ("extra", "is declared, never implemented")},
             "less": dict(list(members.items())[1:])}
    for label, fake in fakes.items():
        setattr(names, kind, names.Choice(kind, fake))
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            sys.modules.pop(loaded)  # a package's rule modules register themselves anew
        try:
            importlib.import_module(module)
            out[kind + " " + label] = "imported"
        except ImportError as e:
            out[kind + " " + label] = str(e)
    setattr(names, kind, real)
    sys.modules.pop(module, None)
print(json.dumps(out))
"""


def test_a_registry_that_disagrees_with_the_declaration_fails_at_import() -> None:
    kinds = {kind.__name__: module for kind, (_, module, _) in KINDS.items()}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(kinds)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, (_, module, _) in KINDS.items():
        first = kind.names()[0]
        more, less = got[f"{kind.__name__} more"], got[f"{kind.__name__} less"]
        assert more == f"{module}: extra declared in common.names.{kind.__name__} but not implemented", more
        assert less.startswith(f"{module}: {first} implemented but not declared in common.names.{kind.__name__}"), less
