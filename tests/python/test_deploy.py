"""The deployment files in deploy/ hold together and run: the Containerfile
(parsed: it cannot be built here, as base images cannot be pulled), the
Kubernetes manifests (parsed, checked against Kubernetes' own schemas offline,
and cross-checked: ports, probes, volumes, the Secret) and the systemd unit
(`systemd-analyze verify` and `security` where systemd is installed). Every
flag and environment variable they set is one `tether serve --help` lists,
and the real binary is started with exactly the settings of each StatefulSet
and of the unit, paths moved into a temp dir and addresses to loopback, then
asked for its health and a call with a token from the access file they name.
The Deployment of three replicas over PostgreSQL runs the same way, its init
container's copy included, on a throwaway PostgreSQL cluster.
"""

import base64
import copy
import fnmatch
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import types
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import CALL_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, tether_bin

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
STATEFULSETS = ["statefulset.yaml", "statefulset-tls.yaml"]
# Three replicas over a PostgreSQL database, and the Secret of its password.
REPLICAS = "postgres/deployment.yaml"
DB_SECRET = "postgres/secret.example.yaml"
# Settings of work merged separately (the admin HTTP listener): the files may
# name them before the binary knows them, and they are checked once it does.
NOT_YET = {"--admin-listen", "TETHER_ADMIN_LISTEN"}
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


# --- what the binary accepts ------------------------------------------------


@pytest.fixture(scope="module")
def serve_help_text():
    """What `tether serve --help` prints."""
    out = subprocess.run(
        [tether_bin(), "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def serve_help(serve_help_text):
    """The flags and environment variables `tether serve --help` lists."""
    text = serve_help_text
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    envs = set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))
    # The key itself has no flag; the help of --secret-key-file names it.
    if "TETHER_SECRET_KEY," in text:
        envs.add("TETHER_SECRET_KEY")
    assert {"--listen", "--db", "--secret-key-file"} <= flags, text
    assert {"TETHER_LISTEN", "TETHER_DB", "TETHER_LOG_FORMAT"} <= envs, text
    return flags, envs


def help_default(help_text: str, flag: str) -> str:
    """The default `tether serve --help` gives for `flag`."""
    block = re.search(rf"^\s+{flag} <\w+>\n((?:\s{{8,}}.*\n)+)", help_text, re.M)
    found = block and re.search(r"\[default: ([^\]]+)\]", block.group(1))
    assert found, f"no default for {flag} in serve --help"
    return found.group(1)


def assert_known(names, known, what):
    unknown = sorted(n for n in names if n not in known and n not in NOT_YET)
    assert not unknown, f"{what} names settings `tether serve --help` does not list: {unknown}"


# --- the Containerfile --------------------------------------------------------


@pytest.fixture(scope="module")
def containerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=open(DEPLOY / "Containerfile", "rb"))
    return parser.structure


def stages(structure):
    """The instructions of each stage, in order: [[(INSTRUCTION, value), ...], ...]."""
    out = []
    for ins in structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if ins["instruction"] != "COMMENT":
            out[-1].append((ins["instruction"], ins["value"]))
    return out


def env_of(stage):
    env = {}
    for ins, value in stage:
        if ins == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(value)))
    return env


def test_the_containerfile_builds_from_source_and_runs_unprivileged(containerfile):
    build, runtime = stages(containerfile)
    assert re.match(r"\S*rust:\S*bookworm\S* AS build$", build[0][1]), build[0]
    runs = " ".join(v for i, v in build if i == "RUN")
    assert "cargo build --release --locked" in runs
    # The runtime has the builder's Debian release, so its glibc.
    assert "debian12" in runtime[0][1] or "bookworm" in runtime[0][1], runtime[0]

    (user,) = [v for i, v in runtime if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root"
    (entrypoint,) = [v for i, v in runtime if i == "ENTRYPOINT"]
    binary = yaml.safe_load(entrypoint)[0]
    copies = [v for i, v in runtime if i == "COPY"]
    assert any(c.split()[-1] == binary for c in copies), (binary, copies)

    env = env_of(runtime)
    (volume,) = [yaml.safe_load(v) for i, v in runtime if i == "VOLUME"]
    assert env["TETHER_DB"].startswith(volume[0] + "/"), (env, volume)
    # The volume's folder is the server user's own.
    assert any(
        c.split()[-1] == volume[0] and f"--chown={uid}:" in c for c in copies
    ), copies
    exposed = {p for i, v in runtime if i == "EXPOSE" for p in v.split()}
    assert env["TETHER_LISTEN"].rsplit(":", 1)[1] in exposed, (env, exposed)


def test_the_container_context_leaves_out_build_output_but_keeps_the_sources():
    patterns = [
        line.strip().lstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
            for pat in patterns
            for p in prefixes
        )

    for path in ["target/debug/tether", ".venv/bin/python", ".git/HEAD",
                 "tests/node/node_modules/x.js"]:
        assert ignored(path), f"{path} would go into the build context"
    for path in ["Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs",
                 "proto/tether/v1/connection.proto", "models/kubernetes.yaml"]:
        assert (ROOT / path).exists(), path
        assert not ignored(path), f"{path} is needed by the build but ignored"


def test_the_binary_needs_no_library_beyond_what_the_runtime_image_has():
    """distroless/cc has glibc and libgcc only: SQLite must be bundled and
    TLS rustls, as the Containerfile's comment says."""
    ldd = shutil.which("ldd")
    if not ldd:
        pytest.skip("no ldd on this machine")
    out = subprocess.run([ldd, tether_bin()], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    libs = {line.split()[0].rsplit("/", 1)[-1] for line in out.stdout.splitlines() if line.strip()}
    allowed = re.compile(
        r"linux-vdso\.so\.1|ld-linux.*\.so\.\d|lib(c|m|dl|rt|pthread|gcc_s|util)\.so\.\d+"
    )
    extra = sorted(lib for lib in libs if not allowed.fullmatch(lib))
    assert not extra, f"the binary links libraries the runtime image lacks: {extra}"


# --- the Kubernetes manifests -------------------------------------------------


def manifests(name):
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def the(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_every_file_in_deploy_says_what_it_is_for():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path.relative_to(ROOT)} opens without a # comment"


def test_the_manifests_are_valid_kubernetes_objects():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    seen = []
    for path in sorted(KUBE.rglob("*.yaml")):
        name = str(path.relative_to(KUBE))
        for doc in manifests(name):
            assert "namespace" not in doc["metadata"], f"{name}: namespace-free"
            seen.append((name, doc["apiVersion"], doc["kind"]))
            if doc["kind"] == "ServiceMonitor":
                continue  # a CRD: no schema ships with Kubernetes; checked below
            # strict: a misspelt or misplaced field fails too.
            kubernetes_validate.validate(doc, version, strict=True)
    assert sorted(seen) == [
        ("postgres/deployment.yaml", "apps/v1", "Deployment"),
        ("postgres/deployment.yaml", "policy/v1", "PodDisruptionBudget"),
        ("postgres/deployment.yaml", "v1", "Service"),
        ("postgres/secret.example.yaml", "v1", "Secret"),
        ("secret.example.yaml", "v1", "Secret"),
        ("servicemonitor.yaml", "monitoring.coreos.com/v1", "ServiceMonitor"),
        ("statefulset-tls.yaml", "apps/v1", "StatefulSet"),
        ("statefulset-tls.yaml", "v1", "Service"),
        ("statefulset.yaml", "apps/v1", "StatefulSet"),
        ("statefulset.yaml", "v1", "Service"),
    ]
    # The validator does refuse what is wrong.
    bad = copy.deepcopy(the(manifests("statefulset.yaml"), "StatefulSet"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def container(sts):
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def env_values(c):
    return {e["name"]: e.get("value") for e in c["env"]}


def assert_serve_settings(c, pod, env, flags, envs, name):
    """Settings only through `tether serve`'s own flags and variables, and gRPC and admin
    ports that agree with the listeners."""
    assert c["args"][0] == "serve"
    assert_known([a.split("=")[0] for a in c["args"][1:] if a.startswith("--")], flags, name)
    assert_known(env, envs, name)
    assert pod["enableServiceLinks"] is False
    assert int(env["TETHER_LISTEN"].rsplit(":", 1)[1]) == port_number(c, "grpc")
    assert int(env["TETHER_ADMIN_LISTEN"].rsplit(":", 1)[1]) == port_number(c, "admin")


def port_number(c, name):
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return p


@pytest.mark.parametrize("name", STATEFULSETS)
def test_the_statefulset_holds_together(name, serve_help, containerfile):
    flags, envs = serve_help
    docs = manifests(name)
    sts, svc = the(docs, "StatefulSet"), the(docs, "Service")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    c = container(sts)
    env = env_values(c)

    # SQLite has one writer: one pod, ever.
    assert spec["replicas"] == 1
    assert spec["serviceName"] == svc["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    for port in svc["spec"]["ports"]:
        port_number(c, port["targetPort"])

    assert_serve_settings(c, pod, env, flags, envs, name)
    probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    if "TETHER_TLS_CERT" in env:
        # Kubelet's gRPC probes cannot speak TLS: HTTP on the admin listener.
        assert [p["httpGet"]["path"] for p in probes] == ["/healthz", "/readyz", "/healthz"]
        assert {p["httpGet"]["port"] for p in probes} == {"admin"}
        assert "TETHER_INSECURE" not in env
    else:
        assert all(p["grpc"]["port"] == port_number(c, "grpc") for p in probes), probes
        assert "service" not in str(probes)

    # The database on the claim, inside the image's volume, as the image's user.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) <= claims | volumes.keys()
    db_mounts = [m for m in mounts if env["TETHER_DB"].startswith(m + "/")]
    assert [mounts[m] for m in db_mounts] == ["data"] and "data" in claims
    runtime = stages(containerfile)[-1]
    (volume,) = [yaml.safe_load(v) for i, v in runtime if i == "VOLUME"]
    assert db_mounts == volume
    (user,) = [v for i, v in runtime if i == "USER"]
    security = pod["securityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert security["fsGroup"] == security["runAsGroup"] and security["runAsNonRoot"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    # Every file setting names a file a volume provides.
    for key in ("TETHER_AUTH_FILE", "TETHER_TLS_CERT", "TETHER_TLS_KEY"):
        if key in env:
            (mount,) = [m for m in mounts if env[key].startswith(m + "/")]
            source = volumes[mounts[mount]]["secret"]
            assert source["defaultMode"] & 0o022 == 0, "the server refuses a writable access file"

    # The key from the Secret, which secret.example.yaml shows the shape of.
    secret = the(manifests("secret.example.yaml"), "Secret")
    ref = next(e for e in c["env"] if e["name"] == "TETHER_SECRET_KEY")["valueFrom"]
    assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert ref["secretKeyRef"]["key"] in secret["stringData"]
    access = volumes[mounts["/etc/tether/access"]]["secret"]
    assert access["secretName"] == secret["metadata"]["name"]
    assert {i["key"] for i in access["items"]} <= secret["stringData"].keys()


def test_the_tls_statefulset_differs_only_in_tls_and_probes():
    plain, tls = (the(manifests(n), "StatefulSet") for n in STATEFULSETS)
    for sts in (plain, tls):
        c = container(sts)
        for key in ("env", "startupProbe", "readinessProbe", "livenessProbe", "volumeMounts"):
            c.pop(key)
        sts["spec"]["template"]["spec"].pop("volumes")
    assert plain == tls


def test_the_service_monitor_scrapes_the_admin_port():
    monitor = the(manifests("servicemonitor.yaml"), "ServiceMonitor")
    for name in [*STATEFULSETS, REPLICAS]:
        svc = the(manifests(name), "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_the_example_secret_is_refused_as_is(tmp_path):
    """Its placeholders are no key: applied unchanged, it starts no server
    with a key that everyone has read."""
    secret = the(manifests("secret.example.yaml"), "Secret")
    env = clean_env()
    env["TETHER_SECRET_KEY"] = secret["stringData"]["secret-key"]
    out = subprocess.run(
        [tether_bin(), "serve", "--listen", "127.0.0.1:0", "--db", tmp_path / "t.db"],
        capture_output=True, text=True, env=env, timeout=START_TIMEOUT,
    )
    assert out.returncode != 0 and "32 bytes" in out.stderr, out.stdout + out.stderr


# --- running the binary as each file configures it -----------------------------


class Process:
    """A `tether` started with a whole argv and environment of a test's
    choice; `popen` may say as whom (user, group, extra_groups)."""

    def __init__(self, argv, env, log_path: Path, **popen):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            **popen,
        )
        # The address line, read by a thread so that the wait is bounded.
        lines: queue.Queue = queue.Queue()

        def read():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put("")

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        prefix = "tether listening on "
        deadline = time.monotonic() + START_TIMEOUT
        line = None
        while line is None or not (line == "" or line.startswith(prefix)):
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                line = ""
        if not line.startswith(prefix):
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"tether printed no address:\n{self.log()}")
        self.addr = line[len(prefix) :].strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"tether did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log()}")
        finally:
            self._reader.join(timeout=STOP_TIMEOUT)
            self.proc.stdout.close()
            self._log.close()


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}


def make_token(principal: str, role: str) -> tuple[str, str]:
    """A token and its access-file line, from `tether token`."""
    out = subprocess.run(
        [tether_bin(), "token", "--principal", principal, "--role", role],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    token, entry = out.stdout.splitlines()[:2]
    return token, entry


def serving(channel) -> bytes:
    check = channel.unary_unary(HEALTH_CHECK, request_serializer=None, response_deserializer=None)
    return check(b"", timeout=CALL_TIMEOUT)


def assert_serves_with_token(pb, channel, token):
    """Health answers anyone; a call needs the token the access file admits."""
    assert serving(channel) == SERVING
    stub = pb.grpc.ConnectionServiceStub(channel)
    request = pb.service.ListConnectionsRequest()
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListConnections(request, timeout=CALL_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.ListConnections(
        request, timeout=CALL_TIMEOUT, metadata=[("authorization", f"Bearer {token}")]
    )


def tls_files(ca, folder: Path, cert_name: str, key_name: str, mode: int):
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(folder / cert_name)
    cert.private_key_pem.write_to_path(folder / key_name)
    for name in (cert_name, key_name):
        os.chmod(folder / name, mode)


def open_channel(addr, ca=None):
    if ca is None:
        return grpc.insecure_channel(addr)
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    return grpc.secure_channel(
        addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


@pytest.mark.parametrize("name", STATEFULSETS)
def test_the_server_runs_as_the_statefulset_configures_it(name, pb, tmp_path, serve_help):
    """Each volume becomes a folder (a Secret's items files with its mode),
    the Secret's key an environment variable as Kubernetes passes it, the
    listeners loopback; everything else is the manifest's, unchanged."""
    import trustme

    _, envs = serve_help
    sts = the(manifests(name), "StatefulSet")
    c, pod = container(sts), sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    token, entry = make_token("alice", "operator")
    secrets = {
        "tether": {
            "secret-key": base64.b64encode(os.urandom(32)).decode(),
            "access.yaml": f"tokens:\n{entry}\n",
        },
    }
    ca = trustme.CA()

    where = {}
    for mount in c["volumeMounts"]:
        folder = tmp_path / "volumes" / mount["name"]
        folder.mkdir(parents=True)
        where[mount["mountPath"]] = folder
        source = volumes.get(mount["name"], {}).get("secret")
        if source is None:
            os.chmod(folder, 0o2770)  # a claim's root with fsGroup
        elif source["secretName"] == "tether-tls":
            tls_files(ca, folder, "tls.crt", "tls.key", source["defaultMode"])
        else:
            data = secrets[source["secretName"]]
            for item in source.get("items") or [{"key": k, "path": k} for k in data]:
                (folder / item["path"]).write_text(data[item["key"]])
                os.chmod(folder / item["path"], source["defaultMode"])

    def moved(value: str) -> str:
        for mount_path, folder in where.items():
            if value.startswith(mount_path + "/"):
                return str(folder) + value[len(mount_path) :]
        return value

    env = clean_env()
    for e in c["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[e["name"]] = moved(e["value"])
    env["TETHER_LISTEN"] = "127.0.0.1:0"
    if "TETHER_ADMIN_LISTEN" in envs:
        env["TETHER_ADMIN_LISTEN"] = "127.0.0.1:0"
    else:
        env.pop("TETHER_ADMIN_LISTEN")
    server = Process([tether_bin(), *c["args"]], env, tmp_path / "tether.log")
    try:
        with open_channel(server.addr, ca if "TETHER_TLS_CERT" in env else None) as ch:
            assert_serves_with_token(pb, ch, token)
        db = Path(env["TETHER_DB"])
        assert db.exists(), server.log()
        # The key came from the Secret: no key file was made beside the database.
        assert not (db.parent / "tether.key").exists()
        assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    finally:
        code = server.stop()
    assert code == 0, server.log()


# --- the systemd unit ------------------------------------------------------------


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with its values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="module")
def unit():
    return unit_file(SYSTEMD / "tether.service")


def test_the_unit_runs_serve_with_known_settings_and_a_sandbox(unit, serve_help):
    flags, envs = serve_help
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/usr/local/bin/tether", "serve"]
    assert_known([a.split("=")[0] for a in argv[2:] if a.startswith("--")], flags, "ExecStart")
    assert argv[argv.index("--db") + 1].startswith("%S/tether/")
    assert service["StateDirectory"] == ["tether"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["User"] == ["tether"]
    sysusers = (SYSTEMD / "tether.sysusers").read_text().splitlines()
    assert any(line.split()[:2] == ["u", "tether"] for line in sysusers)
    (env_path,) = service["EnvironmentFile"]
    assert env_path.lstrip("-") == "/etc/tether/tether.env"
    settings = env_file(SYSTEMD / "tether.env")
    commented = re.findall(r"^#(TETHER_[A-Z0-9_]+)=", (SYSTEMD / "tether.env").read_text(), re.M)
    assert_known([*settings, *commented], envs, "tether.env")
    for key, want in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
    }.items():
        assert service[key] == [want], key
    assert service["SystemCallFilter"][0] == "@system-service"


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if not path:
        pytest.skip("systemd-analyze is not installed here (systemd is not needed to run tether)")
    return path


def unit_for_here(tmp_path) -> Path:
    """The unit with ExecStart's binary at this build's path: verify checks
    that the program exists."""
    text = (SYSTEMD / "tether.service").read_text()
    copy_ = tmp_path / "tether.service"
    copy_.write_text(text.replace("/usr/local/bin/tether", str(tether_bin())))
    return copy_


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = systemd_analyze()
    out = subprocess.run(
        [analyze, "verify", unit_for_here(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr


def test_the_units_sandbox_rates_ok_in_systemd_analyze_security(tmp_path):
    analyze = systemd_analyze()
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager",
         unit_for_here(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    if "--offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {out.stderr}")
    # Exposure 0.0 (best) to 10.0; 2.0 and below is what systemd calls OK.
    assert out.returncode == 0, out.stdout + out.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out.stdout)
    assert level, out.stdout
    assert float(level.group(1)) <= 2.0, out.stdout


def test_the_server_runs_as_the_unit_configures_it_and_reloads_on_sighup(pb, tmp_path, unit):
    """ExecStart's arguments (%S the state root) and the example environment
    file's settings (/etc/tether moved into a temp dir, the listener to
    loopback): TLS and an access file. ExecReload's SIGHUP makes a token
    added to the access file work."""
    import trustme

    state, etc = tmp_path / "state", tmp_path / "etc"
    (state / "tether").mkdir(parents=True, mode=0o700)  # StateDirectory, 0700
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = [a.replace("%S", str(state)) for a in shlex.split(exec_start)]
    argv[0] = str(tether_bin())
    env = clean_env()
    for key, value in env_file(SYSTEMD / "tether.env").items():
        env[key] = value.replace("/etc/tether", str(etc))
    env["TETHER_LISTEN"] = "127.0.0.1:0"

    ca = trustme.CA()
    cert, key = Path(env["TETHER_TLS_CERT"]), Path(env["TETHER_TLS_KEY"])
    assert cert.parent == key.parent
    tls_files(ca, cert.parent, cert.name, key.name, 0o640)
    token, entry = make_token("alice", "operator")
    access = Path(env["TETHER_AUTH_FILE"])
    access.write_text(f"tokens:\n{entry}\n")
    os.chmod(access, 0o640)

    server = Process(argv, env, tmp_path / "tether.log")
    try:
        with open_channel(server.addr, ca) as ch:
            assert_serves_with_token(pb, ch, token)
            # The database and the key it made are in the state directory.
            assert (state / "tether" / "tether.db").exists()
            assert (state / "tether" / "tether.key").stat().st_mode & 0o777 == 0o600

            later, later_entry = make_token("bob", "viewer")
            access.write_text(f"tokens:\n{entry}\n{later_entry}\n")
            (reload,) = unit["Service"]["ExecReload"]
            reload_argv = shlex.split(reload.replace("$MAINPID", str(server.proc.pid)))
            subprocess.run(reload_argv, check=True, timeout=10)
            stub = pb.grpc.ConnectionServiceStub(ch)
            deadline = time.monotonic() + CALL_TIMEOUT
            while True:
                try:
                    stub.ListConnections(
                        pb.service.ListConnectionsRequest(), timeout=CALL_TIMEOUT,
                        metadata=[("authorization", f"Bearer {later}")],
                    )
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert "SIGHUP" in server.log()
    finally:
        code = server.stop()
    assert code == 0, server.log()


# --- the README ------------------------------------------------------------------


def test_the_readme_deploying_section_names_files_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"deploy/[\w./-]+\w", section))
    assert named, "the Deploying section names no deploy/ file"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
    shipped = {str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert shipped <= named, f"files the README does not mention: {sorted(shipped - named)}"


# --- the compose file ------------------------------------------------------------

COMPOSE = DEPLOY / "compose" / "compose.yaml"


def test_the_compose_file_runs_three_replicas_on_one_postgresql(serve_help, containerfile):
    """Three replicas of the Containerfile's image (built with PostgreSQL in),
    each on its own loopback port, all on the one PostgreSQL
    service, with one shared key, started once the database is healthy."""
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert "healthcheck" in services["postgres"], services["postgres"]
    replicas = {n: s for n, s in services.items() if n.startswith("tether-")}
    assert len(replicas) == 3, sorted(services)
    _, envs = serve_help
    published = set()
    for name, service in replicas.items():
        env = service["environment"]
        assert_known(env.keys(), envs, f"compose service {name}")
        assert re.fullmatch(r"postgres://tether:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/tether",
                            env["TETHER_DB"]), env["TETHER_DB"]
        assert env["TETHER_SECRET_KEY"].startswith("${TETHER_SECRET_KEY"), env
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        (port,) = service["ports"]
        host, outside, inside = port.split(":")
        assert host == "127.0.0.1", port
        assert inside == env["TETHER_LISTEN"].rsplit(":", 1)[1], (port, env["TETHER_LISTEN"])
        published.add(outside)
    assert len(published) == 3, published
    build, _ = stages(containerfile)
    runs = " ".join(v for i, v in build if i == "RUN")
    assert "--features postgres" in runs, "the image serves PostgreSQL too"


# --- three replicas over PostgreSQL, on Kubernetes ---------------------------------


def example_secrets() -> dict[str, dict]:
    """The example Secrets by name: "tether" and "tether-db"."""
    return {
        d["metadata"]["name"]: d
        for name in ("secret.example.yaml", DB_SECRET)
        for d in manifests(name)
    }


def seconds(duration: str) -> int:
    assert re.fullmatch(r"\d+s", duration), f"{duration}: whole seconds expected"
    return int(duration[:-1])


def test_the_replicas_deployment_holds_together(serve_help, serve_help_text, containerfile):
    """Three replicas with no state of their own: the database a postgres://
    URL without its password, which is a file, as the key is, both copied by
    the init container from the Secrets into files only the server's user
    can read; probes on grpc.health.v1.Health; a drain that fits the grace."""
    flags, envs = serve_help
    docs = manifests(REPLICAS)
    svc, dep, pdb = (the(docs, k) for k in ("Service", "Deployment", "PodDisruptionBudget"))
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = container(dep)
    env = env_values(c)

    # Several replicas, and no claim: the state is in PostgreSQL.
    assert spec["replicas"] == 3
    assert "volumeClaimTemplates" not in spec
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    # A rollout adds a pod before it takes one away; a drain takes one at a time.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pdb["spec"]["maxUnavailable"] == 1

    labels = spec["template"]["metadata"]["labels"]
    for selector in (spec["selector"], pdb["spec"]["selector"]):
        assert selector["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    # A virtual IP, not headless, with the name and ports of statefulset.yaml's
    # Service: clients and the ServiceMonitor need no change.
    assert svc["spec"].get("clusterIP", "") != "None"
    single = the(manifests("statefulset.yaml"), "Service")
    assert svc["metadata"] == single["metadata"]
    assert svc["spec"]["ports"] == single["spec"]["ports"]
    for port in svc["spec"]["ports"]:
        port_number(c, port["targetPort"])

    assert_serve_settings(c, pod, env, flags, envs, REPLICAS)

    # A user and no password in the URL: the server refuses a password given
    # twice, and the password file is the one place for it.
    url = urllib.parse.urlsplit(env["TETHER_DB"])
    assert url.scheme in ("postgres", "postgresql") and url.hostname, env["TETHER_DB"]
    assert url.username and url.password is None and url.path.strip("/"), env["TETHER_DB"]
    # No secret in the environment: the key (which a PostgreSQL --db needs
    # given, never made) and the password are files.
    assert "TETHER_SECRET_KEY" not in env
    assert not [e for e in c["env"] if "valueFrom" in e]
    files = [env["TETHER_DB_PASSWORD_FILE"], env["TETHER_SECRET_KEY_FILE"]]

    # Both in a folder in memory that the init container fills and the
    # server only reads; the Secrets' own files are the init container's alone.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    (init,) = pod["initContainers"]
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    (folder,) = {f.rsplit("/", 1)[0] for f in files}
    private = mounts[folder]
    assert private["readOnly"] is True
    assert volumes[private["name"]]["emptyDir"]["medium"] == "Memory"
    assert not init_mounts[private["name"]].get("readOnly", False)
    (source,) = [n for n in init_mounts if n != private["name"]]
    assert source not in {m["name"] for m in c["volumeMounts"]}
    projected = volumes[source]["projected"]
    assert projected["defaultMode"] & 0o077 == 0, "0400 or 0600"
    secrets = example_secrets()
    items = {}
    for each in projected["sources"]:
        ref = each["secret"]
        for item in ref["items"]:
            assert item["key"] in secrets[ref["name"]]["stringData"], (ref["name"], item["key"])
            items[item["path"]] = (ref["name"], item["key"])
    assert sorted(items) == sorted(f.rsplit("/", 1)[1] for f in files)
    key_file = env["TETHER_SECRET_KEY_FILE"].rsplit("/", 1)[1]
    assert items[key_file] == ("tether", "secret-key"), "the key statefulset.yaml reads too"

    # The access file straight from the Secret "tether": updated in place and
    # reloaded; the server refuses it only if others can write it.
    (access_at,) = [m for m in mounts if env["TETHER_AUTH_FILE"].startswith(m + "/")]
    access = volumes[mounts[access_at]["name"]]["secret"]
    assert access["secretName"] == "tether"
    assert access["defaultMode"] & 0o022 == 0
    assert {i["key"] for i in access["items"]} <= secrets["tether"]["stringData"].keys()

    # Both containers as the image's user; fsGroup makes the Secrets' files
    # readable to its group, which is how the init container reads them.
    runtime = stages(containerfile)[-1]
    (user,) = [v for i, v in runtime if i == "USER"]
    security = pod["securityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert security["fsGroup"] == security["runAsGroup"] and security["runAsNonRoot"]
    for each in (init, c):
        assert not {"runAsUser", "runAsGroup"} & each["securityContext"].keys()
        assert each["securityContext"]["readOnlyRootFilesystem"] is True

    # Native gRPC probes on grpc.health.v1.Health (the whole server: no service).
    probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(p["grpc"]["port"] == port_number(c, "grpc") for p in probes), probes
    assert "service" not in str(probes)

    # The preStop sleep, then SIGTERM and --shutdown-grace for open calls,
    # with room left to commit what is queued, all before the kill.
    grace = env.get("TETHER_SHUTDOWN_GRACE") or help_default(serve_help_text, "--shutdown-grace")
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep + seconds(grace) + 10 <= pod["terminationGracePeriodSeconds"]


def test_the_replicas_pod_differs_from_the_statefulsets_only_in_store_and_drain():
    """The same image, ports, probes, resources, security and other settings
    as statefulset.yaml's pod: only the database, the key's and the
    password's files, and the preStop sleep differ."""
    single, many = (the(manifests(n), k) for n, k in
                    (("statefulset.yaml", "StatefulSet"), (REPLICAS, "Deployment")))
    a, b = container(single), container(many)
    for key in ("image", "imagePullPolicy", "args", "ports", "startupProbe", "readinessProbe",
                "livenessProbe", "resources", "securityContext"):
        assert a[key] == b[key], key
    store = {"TETHER_DB", "TETHER_DB_PASSWORD_FILE", "TETHER_SECRET_KEY", "TETHER_SECRET_KEY_FILE"}
    assert ({k: v for k, v in env_values(a).items() if k not in store}
            == {k: v for k, v in env_values(b).items() if k not in store})
    pod_a, pod_b = (s["spec"]["template"]["spec"] for s in (single, many))
    for key in ("automountServiceAccountToken", "enableServiceLinks",
                "terminationGracePeriodSeconds"):
        assert pod_a[key] == pod_b[key], key
    # fsGroupChangePolicy is about the claim, which the Deployment has not.
    security = {k: v for k, v in pod_a["securityContext"].items() if k != "fsGroupChangePolicy"}
    assert security == pod_b["securityContext"]


def loopback_url(url: str, port: int) -> str:
    """`url` with its host and port moved to 127.0.0.1:`port`."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_password_file_mounted_straight_from_the_secret_is_refused(tmp_path):
    """Why the init container copies: under fsGroup, kubelet makes a Secret's
    files group-readable (0400 becomes 0440), and the server refuses such a
    password file before it connects anywhere. The same file 0600 passes
    that check (and then finds no PostgreSQL on a closed loopback port)."""
    c = container(the(manifests(REPLICAS), "Deployment"))
    password = tmp_path / "db-password"
    password.write_text("s3cret")
    env = clean_env()
    env["TETHER_DB"] = loopback_url(env_values(c)["TETHER_DB"], free_port())
    env["TETHER_DB_PASSWORD_FILE"] = str(password)
    env["TETHER_SECRET_KEY"] = base64.b64encode(os.urandom(32)).decode()
    argv = [tether_bin(), "serve", "--listen", "127.0.0.1:0"]
    for mode, refused in ((0o440, True), (0o600, False)):
        os.chmod(password, mode)
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
        assert out.returncode != 0, out.stdout + out.stderr
        assert ("group or others" in out.stderr) == refused, (oct(mode), out.stderr)


def pg_bin() -> Path | None:
    """PostgreSQL's binaries, found as src/store/pg/cluster.rs finds them."""
    if os.environ.get("TETHER_PG_BIN"):
        return Path(os.environ["TETHER_PG_BIN"])
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    return found[-1] if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, started as the
    store's tests start one (src/store/pg/cluster.rs; as root, it runs as
    the user postgres), but with password authentication over TCP: the user
    and database the Deployment's URL names, and a random password, which
    only the password file can give the server."""
    bin_dir = pg_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("no PostgreSQL binaries: install Debian's postgresql "
                    "(scripts/test does) or set TETHER_PG_BIN")
    url = urllib.parse.urlsplit(
        env_values(container(the(manifests(REPLICAS), "Deployment")))["TETHER_DB"])
    root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="tether-deploy-pg-"))
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    (folder / "password").write_text(password + "\n")
    if root:
        subprocess.run(["chown", "-R", "postgres:", folder], check=True, timeout=30)

    def pg(program: str, *args: str):
        argv = [str(bin_dir / program), *args]
        if root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def run(program: str, *args: str):
        out = pg(program, *args)
        assert out.returncode == 0, f"{program}: {out.stdout}{out.stderr}"

    data, port = folder / "data", free_port()
    try:
        run("initdb", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
            f"--username={url.username}", f"--pwfile={folder / 'password'}", "--encoding=UTF8",
            "-D", str(data))
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        run("pg_ctl", "-w", "-D", str(data), "-l", str(folder / "log"), "-o", options, "start")
        run("createdb", "-h", str(folder), "-p", str(port), "-U", url.username,
            url.path.strip("/"))
        yield types.SimpleNamespace(port=port, password=password)
    finally:
        pg("pg_ctl", "-m", "immediate", "-D", str(data), "stop")
        shutil.rmtree(folder, ignore_errors=True)


def as_pod_user(pod) -> dict:
    """Popen's arguments that run a process as the pod's user, group and
    fsGroup, when the tests run as root; otherwise, as whoever runs them."""
    if os.geteuid() != 0:
        return {}
    security = pod["securityContext"]
    return {"user": security["runAsUser"], "group": security["runAsGroup"],
            "extra_groups": [security["fsGroup"]]}


def kubelet_secret_volume(folder: Path, files: dict[str, str], mode: int, fs_group: int):
    """A Secret or projected volume as kubelet writes one: the files in a
    dated folder that `..data` links to, each name a link through `..data`;
    with an fsGroup, that is their group, and group read is added to `mode`
    whatever it says."""
    dated = folder / "..2026_01_01_00_00_00.000000001"
    dated.mkdir(parents=True)
    for name, text in files.items():
        (dated / name).write_text(text)
        if os.geteuid() == 0:
            os.chown(dated / name, 0, fs_group)
        os.chmod(dated / name, mode | 0o440)
    (folder / "..data").symlink_to(dated.name)
    for name in files:
        (folder / name).symlink_to(f"..data/{name}")


def pod_volumes(pod, folder: Path, secrets: dict[str, dict[str, str]]) -> dict[str, Path]:
    """A folder for each volume of `pod`, set up as kubelet would: the
    Secrets' files in theirs, emptyDirs empty."""
    fs_group = pod["securityContext"]["fsGroup"]
    out = {}
    for volume in pod["volumes"]:
        where = out[volume["name"]] = folder / volume["name"]
        if "emptyDir" in volume:
            where.mkdir(parents=True)
            if os.geteuid() == 0:
                os.chown(where, 0, fs_group)
            os.chmod(where, 0o2777)  # open to all, fsGroup's, setgid
            continue
        if "secret" in volume:
            sources = [{"name": volume["secret"]["secretName"], **volume["secret"]}]
            mode = volume["secret"]["defaultMode"]
        else:
            sources = [s["secret"] for s in volume["projected"]["sources"]]
            mode = volume["projected"]["defaultMode"]
        files = {}
        for source in sources:
            data = secrets[source["name"]]
            for item in source.get("items") or [{"key": k, "path": k} for k in data]:
                files[item["path"]] = data[item["key"]]
        kubelet_secret_volume(where, files, mode, fs_group)
    return out


def in_pod(text: str, c, folders: dict[str, Path]) -> str:
    """`text` with each of container `c`'s mount paths moved to its volume's folder."""
    for mount in sorted(c["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        text = text.replace(mount["mountPath"], str(folders[mount["name"]]))
    return text


def test_three_replicas_run_as_the_deployment_configures_them(pb, postgres, serve_help):
    """Each pod set up as kubelet would (its Secrets' files group-readable
    behind kubelet's links, an empty folder for the emptyDir), its init
    container's own script run by /bin/sh in place of busybox's, then the
    three servers started at once on one new database, all as the pod's user
    when the tests run as root. The URL's host and port move to a throwaway
    PostgreSQL that wants the password, the listeners to loopback;
    everything else is the manifest's. Each replica answers health and a
    token's call, and a connection made through one is read through the
    others; each exits 0 on SIGTERM."""
    _, envs = serve_help
    dep = the(manifests(REPLICAS), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c, (init,) = container(dep), pod["initContainers"]
    token, entry = make_token("alice", "operator")
    secrets = {
        "tether": {
            "secret-key": base64.b64encode(os.urandom(32)).decode(),
            "access.yaml": f"tokens:\n{entry}\n",
        },
        "tether-db": {"password": postgres.password},
    }
    workdir = Path(tempfile.mkdtemp(prefix="tether-deploy-pods-"))
    os.chmod(workdir, 0o755)  # the pod's user goes through it

    def start(i: int) -> Process:
        folders = pod_volumes(pod, workdir / f"pod-{i}", secrets)
        argv = [*init["command"], *init.get("args", [])]
        assert argv[0] == "/busybox/sh", argv  # the image's busybox; here, /bin/sh
        copied = subprocess.run(
            ["/bin/sh", *(in_pod(a, init, folders) for a in argv[1:])],
            capture_output=True, text=True, timeout=30, env={"PATH": os.defpath},
            **as_pod_user(pod),
        )
        assert copied.returncode == 0, copied.stderr
        env = clean_env()
        for e in c["env"]:
            env[e["name"]] = in_pod(e["value"], c, folders)
        for key in ("TETHER_DB_PASSWORD_FILE", "TETHER_SECRET_KEY_FILE"):
            made = os.stat(env[key])
            assert made.st_mode & 0o777 == 0o600, (key, oct(made.st_mode))
            assert made.st_uid == as_pod_user(pod).get("user", os.geteuid()), key
        env["TETHER_DB"] = loopback_url(env["TETHER_DB"], postgres.port)
        env["TETHER_LISTEN"] = "127.0.0.1:0"
        if "TETHER_ADMIN_LISTEN" in envs:
            env["TETHER_ADMIN_LISTEN"] = "127.0.0.1:0"
        else:
            env.pop("TETHER_ADMIN_LISTEN")
        return Process([tether_bin(), *c["args"]], env, workdir / f"pod-{i}.log",
                       **as_pod_user(pod))

    replicas = dep["spec"]["replicas"]
    started = []
    try:
        with ThreadPoolExecutor(replicas) as pool:
            futures = [pool.submit(start, i) for i in range(replicas)]
        started = [f.result() for f in futures if f.exception() is None]
        for f in futures:
            f.result()
        auth = [("authorization", f"Bearer {token}")]
        for server in started:
            user = as_pod_user(pod).get("user", os.geteuid())
            assert os.stat(f"/proc/{server.proc.pid}").st_uid == user
            with open_channel(server.addr) as ch:
                assert_serves_with_token(pb, ch, token)
        with open_channel(started[0].addr) as ch:
            made = pb.grpc.ConnectionServiceStub(ch).CreateConnection(
                pb.service.CreateConnectionRequest(
                    connection=pb.connection.Connection(kind="tcp", name="shared",
                                                        url="tcp://127.0.0.1:9")),
                timeout=CALL_TIMEOUT, metadata=auth,
            )
        for server in started[1:]:
            with open_channel(server.addr) as ch:
                got = pb.grpc.ConnectionServiceStub(ch).GetConnection(
                    pb.service.GetConnectionRequest(id=made.id),
                    timeout=CALL_TIMEOUT, metadata=auth,
                )
            assert (got.id, got.name) == (made.id, "shared")
    finally:
        try:
            with ThreadPoolExecutor(max(len(started), 1)) as pool:
                codes = list(pool.map(Process.stop, started))
            logs = "\n".join(server.log() for server in started)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    assert codes == [0] * replicas, logs
