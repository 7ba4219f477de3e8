//! Encryption of credential secrets at rest: XChaCha20-Poly1305 under one
//! server key, with the credential id as associated data.
//!
//! The key comes from `TETHER_SECRET_KEY` (base64 of 32 bytes) or a key file;
//! a missing key file is created on first start with mode 0600. A database
//! copied without the key yields no secret. Nothing here logs or formats a
//! secret.

use crate::error::Error;
use crate::probe::Secret;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Seals and opens secrets with the server's key.
pub(crate) struct SecretBox {
    cipher: XChaCha20Poly1305,
    /// Kept to derive keys for other purposes (see [`SecretBox::subkey`]).
    key: [u8; 32],
}

impl SecretBox {
    /// The key from `env_key` (base64) if given, else from `key_file`,
    /// creating that file (0600) with a fresh random key when it does not exist.
    pub(crate) fn load_or_create(
        key_file: &Path,
        env_key: Option<&str>,
    ) -> Result<SecretBox, Error> {
        match SecretBox::load(key_file, env_key)? {
            Some(b) => Ok(b),
            None => SecretBox::from_base64(&create_key_file(key_file)?),
        }
    }

    /// The key from `env_key` (base64) if given, else from `key_file`; `None`
    /// when neither exists.
    pub(crate) fn load(key_file: &Path, env_key: Option<&str>) -> Result<Option<SecretBox>, Error> {
        let encoded = match env_key {
            Some(k) => k.trim().to_owned(),
            None => match std::fs::read_to_string(key_file) {
                Ok(text) => {
                    refuse_if_readable_by_others(key_file)?;
                    text.trim().to_owned()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "cannot read the secret key file {}: {e}",
                        key_file.display()
                    )));
                }
            },
        };
        SecretBox::from_base64(&encoded).map(Some)
    }

    fn from_base64(encoded: &str) -> Result<SecretBox, Error> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| {
                Error::invalid(
                    "secret key",
                    "must be 32 bytes, base64-encoded (TETHER_SECRET_KEY or the key file)",
                )
            })?;
        let cipher = XChaCha20Poly1305::new_from_slice(&key)
            .map_err(|_| Error::Internal("secret key has the wrong length".into()))?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| Error::Internal("secret key has the wrong length".into()))?;
        Ok(SecretBox { cipher, key })
    }

    /// A key for another purpose, derived from the server key and `label`
    /// (HMAC-SHA256), so one secret to back up serves them all.
    pub(crate) fn subkey(&self, label: &str) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .expect("hmac takes any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Encrypts `secret` for credential `id`: (nonce, sealed bytes).
    pub(crate) fn seal(&self, id: &str, secret: &Secret) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let plain = serde_json::to_vec(secret)?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| Error::Internal("sealing a secret failed".into()))?;
        Ok((nonce.to_vec(), sealed))
    }

    /// Decrypts the secret of credential `id`. Fails (without detail) under
    /// another key, for another id, or if the bytes were altered.
    pub(crate) fn open(&self, id: &str, nonce: &[u8], sealed: &[u8]) -> Result<Secret, Error> {
        if nonce.len() != 24 {
            return Err(Error::Internal(format!("credential {id}: bad nonce")));
        }
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::Internal(format!(
                    "credential {id} cannot be opened with this server's key"
                ))
            })?;
        serde_json::from_slice(&plain)
            .map_err(|_| Error::Internal(format!("credential {id}: secret is not a JSON object")))
    }
}

fn create_key_file(path: &Path) -> Result<String, Error> {
    if let Some(dir) = path.parent() {
        crate::files::private_dir(dir)?;
    }
    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    let mut file = crate::files::create_private(path)?;
    file.write_all(format!("{encoded}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "created a new secret key; back it up with the database");
    Ok(encoded)
}

/// A key others can read is no secret: refuse to use it until it is private.
fn refuse_if_readable_by_others(path: &Path) -> Result<(), Error> {
    refuse_unless_private(path, "secret key")
}

/// A secret (named `field` in the error) in a file that group or others can
/// read is refused until the file is private.
pub(crate) fn refuse_unless_private(path: &Path, field: &str) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::Internal(format!(
            "cannot read the {field} file {}: {e}",
            path.display()
        ))
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::invalid(
            field,
            format!(
                "{} has mode {mode:o}: group or others can use it; chmod 600 it (and consider the key exposed)",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        serde_json::from_str(r#"{"token": "s3cr3t-token"}"#).unwrap()
    }

    #[test]
    fn a_new_key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/tether.key");
        let a = SecretBox::load_or_create(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (nonce, sealed) = a.seal("c1", &secret()).unwrap();
        let b = SecretBox::load_or_create(&path, None).unwrap();
        assert_eq!(b.open("c1", &nonce, &sealed).unwrap(), secret());
    }

    #[test]
    fn sealed_secrets_reveal_nothing_and_move_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretBox::load_or_create(&dir.path().join("a.key"), None).unwrap();
        let other = SecretBox::load_or_create(&dir.path().join("b.key"), None).unwrap();
        let (nonce, sealed) = a.seal("c1", &secret()).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("s3cr3t"));
        assert!(a.open("c2", &nonce, &sealed).is_err(), "bound to its id");
        assert!(
            other.open("c1", &nonce, &sealed).is_err(),
            "bound to its key"
        );
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(a.open("c1", &nonce, &tampered).is_err());
    }

    #[test]
    fn a_key_from_the_environment_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unused.key");
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(SecretBox::load_or_create(&path, Some(&good)).is_ok());
        assert!(!path.exists(), "an environment key creates no file");
        assert!(SecretBox::load_or_create(&path, Some("c2hvcnQ=")).is_err());
    }
}
