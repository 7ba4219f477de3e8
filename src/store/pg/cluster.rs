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
    bin: PathBuf,
    /// The folder holding the data, the log and the socket.
    dir: PathBuf,
    /// The server's settings (`-c name=value` …).
    options: String,
    /// Stopped and removed on drop (the shared one is, at exit).
    private: bool,
}

impl Cluster {
    /// The cluster this test process shares; each test takes a database of
    /// its own ([`Cluster::database`]).
    pub(crate) fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = Cluster::start(&[], &[]);
            // Stopped when the test process exits, whichever test ends last.
            STOP.get_or_init(|| (cluster.bin.clone(), cluster.dir.clone()));
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
            cluster
        })
    }

    /// A cluster of the test's own, which it may stop and start again:
    /// `files` (name, contents) are written into its folder first (mode
    /// 0600, the server's), and `settings` (`name=value`) set on the server;
    /// a setting may name a file as `{dir}/name`.
    #[allow(dead_code, reason = "the API tests use it, the unit tests not yet")]
    pub(crate) fn private(files: &[(&str, &str)], settings: &[&str]) -> Cluster {
        let mut cluster = Cluster::start(files, settings);
        cluster.private = true;
        cluster
    }

    fn start(files: &[(&str, &str)], settings: &[&str]) -> Cluster {
        use std::os::unix::fs::PermissionsExt;
        let bin = bin_dir();
        // Removed when the process exits (or the private cluster drops),
        // once the cluster has stopped.
        let dir = tempfile::Builder::new()
            .prefix("tether-pg-")
            .tempdir()
            .expect("a temporary folder")
            .keep();
        for (name, contents) in files {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("a file for the cluster");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
        if as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster's folder to postgres");
        }
        run(command(&bin, "initdb")
            .args(["--auth=trust", "--username=tether", "--encoding=UTF8", "-D"])
            .arg(dir.join("data")));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Many tests, each with replicas of their own, run at once.
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -c max_connections=1000 -p {port} -k {}",
            dir.display()
        );
        for setting in settings {
            let setting = setting.replace("{dir}", &dir.display().to_string());
            options.push_str(&format!(" -c {setting}"));
        }
        let cluster = Cluster {
            port,
            bin,
            dir,
            options,
            private: false,
        };
        cluster.resume();
        cluster
    }

    /// Stops the server at once, as a crash would: every connection to it
    /// breaks, and new ones are refused.
    #[allow(dead_code, reason = "the API tests use it, the unit tests not yet")]
    pub(crate) fn halt(&self) {
        run(command(&self.bin, "pg_ctl")
            .args(["-m", "immediate", "-w", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop"));
    }

    /// Starts the server (again), on the same port, once it accepts connections.
    pub(crate) fn resume(&self) {
        run(command(&self.bin, "pg_ctl")
            .args(["-w", "-D"])
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &self.options, "start"]));
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

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.private {
            let _ = command(&self.bin, "pg_ctl")
                .args(["-m", "immediate", "-D"])
                .arg(self.dir.join("data"))
                .arg("stop")
                .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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
