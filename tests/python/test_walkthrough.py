"""The README's walkthrough runs as pasted: every `$ command` of its console
blocks runs, in order and in one shell, against a fresh server started as the
README starts it (background probing on), with the real `tether` CLI on PATH;
each output must match the one the README shows, once ids, times, probe
latencies and the server's port are set aside."""

import os
import re
import subprocess
from pathlib import Path

from conftest import Server, tether_bin

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDR = "127.0.0.1:50051"
MARK = "@@walkthrough-step@@"


def walkthrough() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$` line of the console
    blocks under `## Walkthrough`."""
    text = README.read_text()
    section = text.split("\n## Walkthrough\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```console\n(.*?)```", section, re.S)
    assert blocks, "the walkthrough has no console block"
    steps: list[tuple[str, list[str]]] = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                assert steps, f"output before any command: {line!r}"
                steps[-1][1].append(line)
    return steps


def normalise(lines: list[str], addr: str) -> list[str]:
    out = []
    for line in lines:
        line = line.replace(addr, README_ADDR)
        line = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<ID>", line)
        line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<TIME>", line)
        line = re.sub(r"succeeded in \d+ ms", "succeeded in <N> ms", line)
        line = re.sub(r"latency: [0-9.]+s", "latency: <D>", line)
        # Columns widen with their contents: compare the cells, not the padding.
        line = " ".join(line.split())
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def test_the_readme_walkthrough_runs_as_pasted(tmp_path):
    steps = walkthrough()
    assert len(steps) >= 8, steps
    server = Server(tmp_path)
    try:
        # One shell for every step, so `ID=$(...)` carries over and `$?` is
        # the previous step's status; a marker after each step splits the output.
        script = ["set -u"]
        for command, _ in steps:
            script.append(command.replace(README_ADDR, server.addr))
            script.append(f'__rc=$?; printf "%s\\n" "{MARK}"; ( exit $__rc )')
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("TETHER_"):
                del env[key]
        env["TETHER_ENDPOINT"] = server.addr
        env["PATH"] = f"{tether_bin().parent}{os.pathsep}{env['PATH']}"
        ran = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=120,
        )
        outputs = ran.stdout.split(MARK + "\n")
        assert len(outputs) == len(steps) + 1, ran.stdout
        for (command, expected), actual in zip(steps, outputs):
            want = normalise(expected, server.addr)
            got = normalise(actual.splitlines(), server.addr)
            assert got == want, f"$ {command}\n--- README\n" + "\n".join(want) + "\n--- ran\n" + "\n".join(got)
    finally:
        code = server.stop()
    assert code == 0, server.log()
