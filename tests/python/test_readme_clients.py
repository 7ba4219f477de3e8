"""The README's client examples run as pasted and print what the README says
they print: the Python one (with the README's protoc command making its
stubs) and the Rust one (`examples/client.rs`, which must be the README's
text exactly), each against a fresh server started as the README starts it.
The Node example is run by tests/node/readme.test.js."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Server, tether_bin

ROOT = Path(__file__).resolve().parents[2]
README_ADDR = "127.0.0.1:50051"


def section(title: str) -> str:
    """The text under `### title` of the README's Clients section."""
    text = (ROOT / "README.md").read_text()
    clients = text.split("\n## Clients\n", 1)[1].split("\n## ", 1)[0]
    return clients.split(f"\n### {title}\n", 1)[1].split("\n### ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def expected_output(text: str) -> list[str]:
    (out,) = blocks(text, "text")
    return [line.rstrip() for line in out.splitlines()]


def lines_of(stdout: str) -> list[str]:
    return [line.rstrip() for line in stdout.splitlines()]


@pytest.fixture
def readme_server(tmp_path):
    s = Server(tmp_path)
    yield s
    assert s.stop() == 0, s.log()


def test_the_python_example_runs_as_pasted(readme_server, tmp_path):
    text = section("Python")
    (setup,) = blocks(text, "sh")
    (code,) = blocks(text, "python")
    work = tmp_path / "py"
    work.mkdir()
    (work / "proto").symlink_to(ROOT / "proto")
    # The README's protoc command, with the test's own Python (whose venv
    # already has the packages its `pip install` line names).
    protoc = setup.split("\npython -m grpc_tools.protoc", 1)[1].replace("\\\n", " ")
    args = ["-m", "grpc_tools.protoc", *shlex.split(protoc)]
    made = subprocess.run([sys.executable, *args], cwd=work, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    (work / "client.py").write_text(code.replace(README_ADDR, readme_server.addr))
    ran = subprocess.run(
        [sys.executable, "client.py"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert lines_of(ran.stdout) == expected_output(text)


def test_the_rust_example_is_the_readmes_and_runs(readme_server):
    text = section("Rust")
    (code,) = blocks(text, "rust")
    assert code == (ROOT / "examples" / "client.rs").read_text(), (
        "the README's Rust example differs from examples/client.rs"
    )
    # `cargo test` builds every example beside the binary.
    example = tether_bin().parent / "examples" / "client"
    if not os.access(example, os.X_OK):
        pytest.fail(f"no {example}: build it with `cargo build --example client` (or `cargo test`)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_ENDPOINT"] = readme_server.addr
    ran = subprocess.run([example], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert lines_of(ran.stdout) == expected_output(text)
