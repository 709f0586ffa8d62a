"""deploy/: every `cad-node` command in the systemd units, the compose file, the Dockerfile and the
READMEs is one the CLI has (each subcommand and option, against the click commands themselves); the
example settings file loads and names every setting; the compose file is what the scaling guide says."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import click.testing
import pytest
import yaml

from cad_node.cli import main
from cad_node.settings import CONFIG_VARIABLE, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
COMPOSE = DEPLOY / "compose.yaml"
DOCS = [ROOT / "README.md", DEPLOY / "README.md"]
DATA_PATH = "/var/lib/cad-node"


@dataclass(frozen=True)
class CommandLine:
    where: str  # file and line, for the failure message
    argv: tuple[str, ...]  # the arguments after the program name

    def __str__(self) -> str:
        return f"{self.where}: cad-node {' '.join(self.argv)}"


def is_program(token: str) -> bool:
    return token == "cad-node" or token.endswith("/bin/cad-node")


def invocations(text: str, where: str) -> list[CommandLine]:
    """The `cad-node ...` commands of one shell line: in any segment of a pipeline or list, after
    variable assignments, `sudo [-u USER]`, `env` or `docker compose exec|run [opts] SERVICE`."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for tokens in segments:
        tokens = _without_prefixes(tokens)
        if tokens and is_program(tokens[0]):
            found.append(CommandLine(where, tuple(tokens[1:])))
    return found


def _without_prefixes(tokens: list[str]) -> list[str]:
    while tokens:
        head = tokens[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", head) or head in ("env", "time", "exec"):
            tokens = tokens[1:]
        elif head == "sudo":
            tokens = tokens[1:]
            while tokens and tokens[0].startswith("-"):
                tokens = tokens[2:] if tokens[0] in ("-u", "-g") else tokens[1:]
        elif head == "docker" and tokens[1:2] == ["compose"] and tokens[2:3] in (["exec"], ["run"]):
            tokens = tokens[3:]
            while tokens and tokens[0].startswith("-"):
                tokens = tokens[1:]
            tokens = tokens[1:]  # the service
        else:
            return tokens
    return tokens


def _doc_text(text: str) -> str:
    """A command as documentation writes it, as a shell line: `[--opt]` optional parts and
    `a|b` alternatives (no spaces around the bar) become plain words."""
    text = text.replace("[", " ").replace("]", " ")
    return re.sub(r"(?<=\S)\|(?=\S)", " ", text)


def commands_in_units() -> list[CommandLine]:
    found = []
    for unit in UNITS:
        for number, line in enumerate(unit.read_text().splitlines(), start=1):
            key, _, value = line.partition("=")
            if key.strip().startswith("Exec"):
                found += invocations(value.lstrip("-@:+!"), f"{unit.name}:{number}")
    return found


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def node_services() -> dict[str, dict]:
    """The compose services that run the cad-node image."""
    return {
        name: s for name, s in compose()["services"].items() if str(s.get("image", "")).startswith("cad-node")
    }


def commands_in_compose() -> list[CommandLine]:
    found = []
    for name, service in compose()["services"].items():
        argv: list[str] = []
        for key in ("entrypoint", "command"):
            value = service.get(key) or []
            argv += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
        if argv and is_program(argv[0]):
            found.append(CommandLine(f"compose.yaml service {name}", tuple(argv[1:])))
    return found


def commands_in_dockerfile() -> list[CommandLine]:
    found = []
    for number, line in enumerate((DEPLOY / "Dockerfile").read_text().splitlines(), start=1):
        match = re.match(r"^(CMD|ENTRYPOINT)\s+(\[.*\])\s*$", line)
        if match:
            argv = json.loads(match[2])
            if argv and is_program(argv[0]):
                found.append(CommandLine(f"Dockerfile:{number}", tuple(argv[1:])))
    return found


def commands_in_docs() -> list[CommandLine]:
    """`cad-node` lines in the READMEs' fenced code blocks, and inline code that starts with it."""
    found = []
    for doc in DOCS:
        fence = False
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            where = f"{doc.relative_to(ROOT)}:{number}"
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            if fence:
                found += invocations(_doc_text(line), where)
                continue
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"^(\S*/)?cad-node\s+[-a-z]", span):  # not a version: `cad-node 0.1.0`
                    found += invocations(_doc_text(span), where)
    return found


def check(line: CommandLine) -> None:
    """Walk the click command tree along the arguments: every subcommand and option must exist."""
    command: click.Command = main
    context = click.Context(main, info_name="cad-node")
    tokens = list(line.argv)
    while tokens:
        token = tokens.pop(0)
        if token.startswith("-"):
            name, has_value, _ = token.partition("=")
            option = _option(command, context, name)
            assert option is not None, f"{line}: {context.command_path} has no option {name}"
            if not has_value and not (option.is_flag or option.count):
                assert tokens, f"{line}: {name} needs a value"
                tokens.pop(0)
        elif isinstance(command, click.Group):
            sub = command.get_command(context, token)
            assert sub is not None, f"{line}: {context.command_path} has no subcommand {token!r}"
            command = sub
            context = click.Context(sub, info_name=token, parent=context)
        # else: an argument of the command (a path, an ID...)
    assert not isinstance(command, click.Group) or command is main, f"{line}: names no command of its group"


def _option(command: click.Command, context: click.Context, name: str) -> click.Option | None:
    for param in command.get_params(context):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


ALL_COMMANDS = commands_in_units() + commands_in_compose() + commands_in_dockerfile() + commands_in_docs()


@pytest.mark.parametrize("line", ALL_COMMANDS, ids=str)
def test_every_command_is_one_the_cli_has(line: CommandLine) -> None:
    check(line)


def test_the_checker_catches_what_the_cli_does_not_have() -> None:
    for bad in ["worker --queue analysis --gpu 1", "workers --queue export", "jobs purge 3", "db migrate"]:
        with pytest.raises(AssertionError):
            check(CommandLine("example", tuple(bad.split())))
    check(CommandLine("example", ("--config", "FILE", "jobs", "show", "7", "--data-dir=/x")))


def test_commands_are_found_where_they_are_written() -> None:
    found = {str(c).split(": ", 1)[1] for c in ALL_COMMANDS}
    assert "cad-node listen" in found
    assert "cad-node worker --queue analysis --device cuda:%i --concurrency 1" in found
    assert "cad-node worker --queue export --concurrency 4" in found
    assert "cad-node dashboard --port 8080" in found
    assert "cad-node db upgrade" in found  # compose's migration, and the guide
    assert len([c for c in ALL_COMMANDS if c.where.startswith("README.md")]) >= 10
    assert invocations(
        "sudo -u cad-node env A=1 /opt/x/bin/cad-node db upgrade && cad-node jobs list", "x"
    ) == [
        CommandLine("x", ("db", "upgrade")),
        CommandLine("x", ("jobs", "list")),
    ]
    assert invocations("useradd --system --home-dir /var/lib/cad-node cad-node", "x") == []


def test_units_run_the_parts_as_the_guide_says() -> None:
    names = {unit.name for unit in UNITS}
    assert {
        "cad-node-listener.service",
        "cad-node-worker@.service",
        "cad-node-worker-cpu.service",
        "cad-node-export.service",
        "cad-node-dashboard.service",
    } <= names
    for unit in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(unit.read_text())
        assert {"Unit", "Service", "Install"} <= set(parser.sections()), unit.name
        exec_start = parser["Service"]["ExecStart"]
        assert exec_start.startswith("/"), f"{unit.name}: ExecStart needs an absolute path"
        assert parser["Service"]["User"] == "cad-node", unit.name
        assert DATA_PATH in parser["Unit"].get("RequiresMountsFor", ""), unit.name
        assert parser["Service"]["Environment"] == f"{CONFIG_VARIABLE}=/etc/cad-node/cad-node.toml"
    pinned = (DEPLOY / "systemd" / "cad-node-worker@.service").read_text()
    assert "--device cuda:%i" in pinned, "one worker per GPU: the instance name is the device index"


def test_compose_file_has_the_services_on_one_shared_store() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "orthanc", "node", "worker-gpu", "worker-export", "dashboard"} <= set(
        services
    )
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    nodes = node_services()
    assert {"node", "worker-gpu", "worker-export", "dashboard", "migrate"} <= set(nodes)
    for name, service in nodes.items():
        environment = service["environment"]
        assert environment["CAD_NODE_BROKER_URL"] == "redis://redis:6379/0", name
        assert environment["CAD_NODE_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert environment["CAD_NODE_DATA_DIR"] == DATA_PATH, name
        assert f"node-data:{DATA_PATH}" in service["volumes"], (
            f"{name}: the store at the same path everywhere"
        )
        assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    [gpu] = nodes["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and len(gpu["device_ids"]) == 1
    assert "--device" in nodes["worker-gpu"]["command"]
    assert nodes["migrate"]["command"] == ["cad-node", "db", "upgrade"]
    for name in ("node", "worker-gpu", "worker-export", "dashboard"):
        assert nodes[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_dockerfile_installs_a_cpu_torch_by_default() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None and f"torch=={pin[1]}" in dockerfile, "the image installs the project's torch pin"


def test_example_settings_load_and_name_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CAD_NODE_")]:
        monkeypatch.delenv(name)
    example = DEPLOY / "cad-node.example.toml"
    monkeypatch.setenv(CONFIG_VARIABLE, str(example))
    settings = Settings()
    assert settings.data_dir == Path(DATA_PATH)
    assert settings.broker_url.startswith("redis://") and settings.database_url.startswith(
        "postgresql+psycopg://"
    )
    written = set(re.findall(r"^#?\s*([a-z_]+)\s*=", example.read_text(), flags=re.MULTILINE))
    missing = set(Settings.model_fields) - written
    assert not missing, f"cad-node.example.toml lacks {sorted(missing)}: every setting, commented"


def test_worker_device_option_pins_the_worker_to_its_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import cad_node.schema_migration
    import workers.worker_main

    environment = {k: v for k, v in os.environ.items() if not k.startswith("CAD_NODE_")}
    monkeypatch.setattr(os, "environ", environment)
    monkeypatch.setattr(cad_node.schema_migration, "current_revision", lambda url: "head")
    monkeypatch.setattr(cad_node.schema_migration, "head_revision", lambda: "head")
    started: list[tuple[str, int, str]] = []
    monkeypatch.setattr(
        workers.worker_main,
        "run_worker",
        lambda queue, concurrency: started.append((queue, concurrency, Settings().device)),
    )
    argv = ["worker", "--queue", "analysis", "--device", "cuda:3", "--data-dir", str(tmp_path)]
    result = click.testing.CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    # The analysis tasks read their settings from the environment the worker process was given.
    assert started == [("analysis", 1, "cuda:3")]
    assert environment["CAD_NODE_DEVICE"] == "cuda:3"
