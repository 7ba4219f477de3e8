//! `tether backup`: a consistent copy of a live database while the server
//! runs (the copy itself is `store::backup`: one read snapshot, no lock of
//! the server's), written to a new private file.
//!
//! The secret key is not in the database and is not put in the backup:
//! a backup and its key kept in one place would be no protection. It is
//! copied only when asked, to a file of its own (`--key-out`), never to the
//! backup file. The copy is checked (`quick_check`, schema) before it is
//! reported done; restoring is copying it back with its key, and the server
//! checks the file again when it starts.

use crate::error::Error;
pub use crate::store::BackupDone as Done;
use std::path::{Path, PathBuf};

/// What to back up, and where to.
#[derive(Clone, Debug, clap::Args)]
pub struct BackupArgs {
    /// The live database [default: as for `tether serve`].
    #[arg(long, env = "TETHER_DB")]
    pub db: Option<PathBuf>,

    /// The backup file to write; it must not exist.
    #[arg(long)]
    pub out: PathBuf,

    /// Also copy the secret key, to this file (0600; never the backup
    /// file itself). Without it the key is left where it is: keep it with
    /// the backup, but not in the same place.
    #[arg(long, value_name = "FILE")]
    pub key_out: Option<PathBuf>,

    /// The key file to copy with --key-out [default: as for `tether serve`].
    #[arg(long, env = "TETHER_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
}

/// Copies the database at `args.db` to `args.out` (and the key, if asked).
pub fn run(args: &BackupArgs) -> Result<Done, Error> {
    if crate::config::postgres_url(args.db.as_deref()).is_some() {
        return Err(Error::invalid(
            "db",
            "a PostgreSQL database is backed up with PostgreSQL's own tools (pg_dump, or its \
             continuous archiving)",
        ));
    }
    let db = crate::config::db_path(args.db.as_deref());
    if !db.exists() {
        return Err(Error::invalid(
            "db",
            format!("{} does not exist", db.display()),
        ));
    }
    if let Some(key_out) = &args.key_out
        && same_file(key_out, &args.out)
    {
        return Err(Error::invalid(
            "key-out",
            "the key never goes into the backup file: name another file",
        ));
    }
    // Created private (and refused if it exists) before SQLite writes to it.
    drop(crate::files::create_private(&args.out)?);
    let copied = crate::store::backup(&db, &args.out);
    let done = match copied {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&args.out);
            return Err(e);
        }
    };
    if let Some(key_out) = &args.key_out {
        let key = crate::config::key_path(args.secret_key_file.as_deref(), &db);
        let text = match std::env::var("TETHER_SECRET_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            Some(k) => k,
            None => std::fs::read_to_string(&key).map_err(|e| {
                Error::invalid(
                    "secret-key-file",
                    format!("cannot read {}: {e}", key.display()),
                )
            })?,
        };
        use std::io::Write;
        let mut f = crate::files::create_private(key_out)?;
        f.write_all(format!("{}\n", text.trim()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", key_out.display())))?;
    }
    Ok(done)
}

/// Whether two paths name one file (or would, once created).
fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| {
        p.canonicalize().ok().or_else(|| {
            let parent = p.parent()?.canonicalize().ok()?;
            Some(parent.join(p.file_name()?))
        })
    };
    a == b || matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}
