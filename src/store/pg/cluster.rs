//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary folder,
//! started on a free loopback port, stopped when the test process ends. The
//! binaries are Debian's `postgresql` package (the test command installs it):
//! `TETHER_PG_BIN` names their folder, else `initdb` on the PATH, else the
//! newest `/usr/lib/postgresql/*/bin`. PostgreSQL refuses to run as root; as
//! root, the cluster runs as the `postgres` user the package makes.
//!
//! The API tests include this file too (`tests/api/main.rs`), so it uses
//! nothing of the crate's own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub(crate) struct Cluster {
    port: u16,
}

impl Cluster {
    /// The cluster this test process shares; each test takes a database of
    /// its own ([`Cluster::database`]).
    pub(crate) fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let bin = bin_dir();
        // Removed when the process exits, once the cluster has stopped.
        let dir = tempfile::Builder::new()
            .prefix("tether-pg-")
            .tempdir()
            .expect("a temporary folder")
            .keep();
        if as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster's folder to postgres");
        }
        let data = dir.join("data");
        run(command(&bin, "initdb")
            .args(["--auth=trust", "--username=tether", "--encoding=UTF8", "-D"])
            .arg(&data));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let options = format!(
            // Many tests, each with replicas of their own, run at once.
            "-c listen_addresses=127.0.0.1 -c max_connections=1000 -p {port} -k {}",
            dir.display()
        );
        run(command(&bin, "pg_ctl")
            .args(["-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-o", &options, "start"]));
        // Stopped when the test process exits, whichever test ends last.
        STOP.get_or_init(|| (bin, dir));
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> i32;
        }
        extern "C" fn stop() {
            if let Some((bin, dir)) = STOP.get() {
                let _ = command(bin, "pg_ctl")
                    .args(["-m", "immediate", "-D"])
                    .arg(dir.join("data"))
                    .arg("stop")
                    .output();
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: `stop` is a plain function that only runs a command.
        unsafe { atexit(stop) };
        Cluster { port }
    }

    /// A URL of a new, empty database in the cluster.
    pub(crate) fn database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("the admin database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create a database");
        self.url(&name)
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://tether@127.0.0.1:{}/{database}", self.port)
    }
}

/// The binaries' folder and the cluster's, for the stop at exit.
static STOP: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` from the PostgreSQL binaries, as the `postgres` user when root.
fn command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect(
        "PostgreSQL's binaries: install Debian's postgresql package (scripts/test does), \
         or set TETHER_PG_BIN",
    )
}
