"""The README's client examples run as pasted and print what the README says
they print: the Python one (with the README's protoc command making its
stubs), the Go one (with the README's protoc command, built offline against
Debian's Go packages) and the Rust one (`examples/client.rs`, which must be
the README's text exactly), each against a fresh server started as the README
starts it. The Node example is run by tests/node/readme.test.js."""

import os
import re
import shlex
import shutil
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


# Where Debian's golang-*-dev packages put their sources (a GOPATH).
DEBIAN_GOCODE = Path("/usr/share/gocode")
GO_TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")


def test_the_go_example_runs_as_pasted(readme_server, tmp_path):
    """The README's protoc command and main.go, built in GOPATH mode against
    Debian's grpc-go and genproto: no Go module proxy is reachable, so its
    `go mod init` and `go mod tidy` lines are the ones not run."""
    missing = [tool for tool in GO_TOOLS if not shutil.which(tool)]
    golang_protobuf = DEBIAN_GOCODE / "src/github.com/golang/protobuf/proto/proto.go"
    if not golang_protobuf.exists() or "ProtoPackageIsVersion4" not in golang_protobuf.read_text():
        missing.append("golang/protobuf 1.5")
    if not (DEBIAN_GOCODE / "src/google.golang.org/grpc").is_dir():
        missing.append("grpc-go")
    if missing:
        pytest.fail(
            f"missing for the Go example: {', '.join(missing)}; scripts/test installs them "
            "(its go_packages, from Debian)"
        )
    text = section("Go")
    (setup,) = blocks(text, "sh")
    (code,) = blocks(text, "go")
    commands = setup.replace("\\\n", " ").splitlines()
    (mkdir,) = [c for c in commands if c.startswith("mkdir ")]
    (module,) = [c.split()[-1] for c in commands if c.startswith("go mod init ")]
    (protoc,) = [c for c in commands if c.startswith("protoc ")]
    # The module's folder, as GOPATH mode finds it; ../proto beside it, as
    # the README's `mkdir` in the repository's root has it.
    gopath = tmp_path / "gopath"
    work = gopath / "src" / module
    work.mkdir(parents=True)
    (work.parent / "proto").symlink_to(ROOT / "proto")
    assert mkdir.split()[-1] in setup.split("cd ", 1)[1]
    made = subprocess.run(["bash", "-c", protoc], cwd=work, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    (work / "main.go").write_text(code.replace(README_ADDR, readme_server.addr))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "GO"))}
    env.update(
        GO111MODULE="off",
        GOPATH=f"{gopath}:{DEBIAN_GOCODE}",
        GOCACHE=str(ROOT / "target" / "go-build"),
        GOPROXY="off",
        GOFLAGS="",
    )
    built = subprocess.run(
        ["go", "build", "-o", str(tmp_path / "client"), "."],
        cwd=work, capture_output=True, text=True, env=env, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([tmp_path / "client"], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert lines_of(ran.stdout) == expected_output(text)
