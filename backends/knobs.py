"""The knobs a user turns: ``make <stage> KNOB=value`` == ``invoke <stage> --knob value``.

One row per knob. The Makefile, the Invoke task signatures and ``make help`` are all
generated from this table, and ``resolve`` turns raw user strings into checked values
(one clear error per bad value, raised before anything runs).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from nanochat.common import CHECKPOINT_KINDS, UsageError, hub_repo_problem

BACKENDS = ("local", "docker", "modal")
CHECKPOINT_SOURCES = CHECKPOINT_KINDS  # SOURCE picks one kind of checkpoint


@dataclass(frozen=True)
class Knob:
    name: str  # python / invoke name: device_batch -> --device-batch, DEVICE_BATCH
    help: str
    kind: str = "str"  # "str" | "int" (positive) | "index" (0 or more) | "bool"

    @property
    def make_var(self) -> str:
        return self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KNOBS: tuple[Knob, ...] = (
    Knob("backend", "where to run: local | docker | modal (default local)"),
    Knob("preset", "tiny | smoke | quick | speedrun | gpt2: sets of defaults (default tiny)"),
    Knob("depth", "model depth; width = 64*depth rounded up to 128 (the size dial)", "int"),
    Knob("gpus", "processes per node (GPUs; CPU processes when no GPU is visible)", "int"),
    Knob("gpu", "Modal GPU type and count, e.g. H100:8 or A100-80GB:4; 'cpu' = no GPU"),
    Knob("nodes", "machines for a multi-GPU stage (default 1; docs/multinode.md)", "int"),
    Knob("node_rank", "NODES>1, local/docker: this machine's index, 0 .. NODES-1", "index"),
    Knob("master_addr", "NODES>1, local/docker: node 0's address, reachable from every node"),
    Knob("master_port", "NODES>1: node 0's rendezvous TCP port (default 29500)", "int"),
    Knob("shards", "training shards to download (the validation shard comes too)", "int"),
    Knob("device_batch", "sequences per device per micro-step", "int"),
    Knob("run", "wandb run name; 'dummy' turns wandb off"),
    Knob("base_dir", "artifacts root (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)"),
    Knob("dataset", "climbmix | fineweb-edu | embedded | a custom name with SOURCE=folder"),
    Knob("source", "download: mirror URL or local folder; chat stages: base|mid|sft|rl"),
    Knob(
        "dest",
        "export: the folder to write; push-hub: the one to upload (relative = under "
        "BASE_DIR/export; default export/<kind>-<tag>); volume-get: where to put it",
    ),
    Knob("repo", "push-hub: the Hugging Face repository, owner/name (HF_TOKEN needed)"),
    Knob("args", "extra flags passed verbatim to the stage script, e.g. ARGS='--vocab-size=8192'"),
    Knob("dry_run", "print the exact command(s) and run nothing", "bool"),
    Knob("detach", "Modal: keep running after this terminal disconnects", "bool"),
    Knob("rl", "speedrun: include RL on GSM8K and its chat eval", "bool"),
    Knob(
        "force",
        "speedrun: run this stage (or stages, comma-separated) and every later one again, "
        "training from scratch; 'all' = everything",
    ),
)
KNOBS_BY_NAME = {knob.name: knob for knob in KNOBS}

_GPU_SPEC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(:[1-9][0-9]*)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# a host name (letters, digits, dots, hyphens), an IPv4 address or an IPv6 one (hex and colons)
_ADDRESS = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$"
)


def parse_int(knob: Knob, raw: str | int) -> int:
    """An "int" knob (1 or more) or an "index" knob (0 or more)."""
    text, least = str(raw).strip(), 0 if knob.kind == "index" else 1
    if not re.fullmatch(r"[0-9]+", text) or int(text) < least:
        what = "0 or a positive integer" if least == 0 else "a positive integer"
        raise UsageError(f"{knob.make_var} must be {what}, got {raw!r}")
    return int(text)


SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off", "")


def parse_switch(knob: Knob, raw: object) -> bool:
    """A switch knob: True/False as invoke passes them, or 1/0, true/false, yes/no, on/off
    (the Makefile accepts the same words); anything else is refused, never taken as on."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in SWITCH_ON or text in SWITCH_OFF:
        return text in SWITCH_ON
    raise UsageError(f"{knob.make_var} must be 1 or 0 (on or off), got {raw!r}")


def check_raw(values: dict[str, object]) -> dict[str, object]:
    """Type-check user-given knob values (None = not given). Returns the parsed values."""
    parsed: dict[str, object] = {}
    for name, raw in values.items():
        knob = KNOBS_BY_NAME.get(name)
        if knob is None:
            raise UsageError(f"unknown knob {name!r}; knobs: {', '.join(KNOBS_BY_NAME)}")
        if raw is None or raw is False:  # not given (invoke's default for bools)
            continue
        if knob.kind != "bool" and str(raw).strip() == "":
            raise UsageError(f"{knob.make_var} is empty: give it a value, or leave it out")
        if knob.kind in ("int", "index"):
            parsed[name] = parse_int(knob, raw)
        elif knob.kind == "bool":
            parsed[name] = parse_switch(knob, raw)
        else:
            parsed[name] = str(raw)
    if "backend" in parsed and parsed["backend"] not in BACKENDS:
        raise UsageError(
            f"unknown backend {parsed['backend']!r}; choose one of: {', '.join(BACKENDS)}"
        )
    if "gpu" in parsed and not _GPU_SPEC.match(str(parsed["gpu"])):
        raise UsageError(f"GPU must look like H100:8 or A100-80GB, got {parsed['gpu']!r}")
    if "dataset" in parsed and not _NAME.match(str(parsed["dataset"])):
        raise UsageError(
            f"DATASET must be a lowercase name like climbmix, got {parsed['dataset']!r}"
        )
    if "master_port" in parsed and not 1 <= int(parsed["master_port"]) <= 65535:
        raise UsageError(f"MASTER_PORT must be a TCP port, 1-65535, got {parsed['master_port']}")
    if "master_addr" in parsed and not _ADDRESS.match(str(parsed["master_addr"])):
        raise UsageError(
            "MASTER_ADDR must be a host name or an IPv4/IPv6 address, "
            f"got {parsed['master_addr']!r}"
        )
    if "repo" in parsed and hub_repo_problem(str(parsed["repo"])):
        raise UsageError(f"REPO: {hub_repo_problem(str(parsed['repo']))}")
    if "args" in parsed:
        try:
            shlex.split(str(parsed["args"]))
        except ValueError as exc:
            raise UsageError(f"ARGS cannot be split like a shell line: {exc}") from None
    return parsed
