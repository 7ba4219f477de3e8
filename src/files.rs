//! Files the server creates for itself: private by default. Folders are made
//! 0700 and files 0600, opened without following a symbolic link, so another
//! user on the machine can neither read the database or key nor plant a link
//! that makes the server write somewhere else.
//!
//! Existing folders and files keep their modes; a folder open to others is
//! reported, a key file open to others refuses start (in `secrets`).

use crate::error::Error;
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and its missing parents with mode 0700; warns when `dir`
/// already exists and others may enter it.
pub(crate) fn private_dir(dir: &Path) -> Result<(), Error> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Internal(format!("cannot create directory {}: {e}", dir.display())))?;
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the data directory is open to other users; chmod 700 it"
        );
    }
    Ok(())
}

/// Opens `path` for writing, creating it with mode 0600 if missing; never
/// through a symbolic link.
pub(crate) fn open_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ELOOP) {
                "it is a symbolic link".to_owned()
            } else {
                e.to_string()
            };
            Error::Internal(format!("cannot open {}: {why}", path.display()))
        })
}

/// Creates `path` with mode 0600; fails if it exists (or is a link).
pub(crate) fn create_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_files_are_private_and_links_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        let file = dir.join("f");
        open_private(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        let target = root.path().join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_private(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(create_private(&file).is_err(), "exists already");
    }
}
