//! The keys file and its secret: how keys are made, stored, revoked and verified.
//!
//! A key reads `gf_<id>_<secret>`: `id` is 12 lowercase hex characters (48 random bits, not
//! secret: `keys list` shows it, logs may name it) that finds the entry in O(1); `secret` is 32
//! random bytes, base64url. The file stores, per key, only `HMAC-SHA256(store secret, key)`.
//!
//! Files (all mode 0600 on Unix):
//! - `<keys_file>`: JSON `{"version": 1, "keys": [{id, tenant, scopes, name?, created_at,
//!   revoked_at?, hash}]}`; an entry is never removed, revoking stamps `revoked_at`.
//! - `<keys_file>.secret`: the store's 32-byte HMAC key (hex), made on the first `keys add`. It
//!   sits apart from the keys file so a copy of the keys file alone (a backup, a config repo, a
//!   support bundle) does not let anyone check a guess offline; losing it invalidates every key.
//! - `<keys_file>.lock`: writers (`keys add`, `keys revoke`) hold an exclusive OS lock on it
//!   around read-modify-write, so two concurrent commands never lose an update. The server only
//!   reads; it sees a write as a whole because each file is replaced by rename (temp file, fsync,
//!   rename, fsync of the directory).
//!
//! Invariants: ids are unique; a revoked entry stays (so the store never shrinks to "no keys",
//! which would turn authentication off); the plaintext key exists only in the output of `add`.
//!
//! Tested below: round trip through the files, verification (right, wrong secret, unknown id,
//! malformed, revoked), concurrent writers, bad files, no plaintext on disk.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::scope::{Scope, Scopes};
use crate::atomic_file::{self, private_options, sibling};
use crate::pipeline::context::is_valid_tenant;

type HmacSha256 = Hmac<Sha256>;

/// Every key starts with it (secret scanners and humans can tell what leaked).
const KEY_PREFIX: &str = "gf_";
/// Hex characters of a key id.
const ID_LEN: usize = 12;
/// Random bytes of a key's secret part, and of the store secret.
const SECRET_BYTES: usize = 32;
/// Characters of a key's secret part (base64url of [`SECRET_BYTES`], no padding).
const SECRET_LEN: usize = 43;
const FILE_VERSION: u32 = 1;
/// Longest `--name`.
const MAX_NAME_LEN: usize = 128;

/// One key as the file stores it: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyEntry {
    pub id: String,
    /// "" = the default tenant.
    pub tenant: String,
    pub scopes: Vec<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// RFC 3339, UTC, seconds.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Hex HMAC-SHA256 of the whole key under the store secret.
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    version: u32,
    keys: Vec<KeyEntry>,
}

/// The path of the store secret next to the keys file.
pub(crate) fn secret_path(keys_file: &Path) -> PathBuf {
    sibling(keys_file, ".secret")
}

/// The entries of the keys file; none when it does not exist.
pub(crate) fn read_entries(path: &Path) -> anyhow::Result<Vec<KeyEntry>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading the keys file {}", path.display())),
    };
    let file: KeysFile = serde_json::from_str(&text)
        .with_context(|| format!("the keys file {} is not a valid keys file", path.display()))?;
    if file.version != FILE_VERSION {
        bail!(
            "the keys file {} has version {}; this server reads version {FILE_VERSION}",
            path.display(),
            file.version
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, k) in file.keys.iter().enumerate() {
        let bad = |what: &str| anyhow!("the keys file {}: keys[{i}].{what}", path.display());
        if !is_id(&k.id) {
            return Err(bad(&format!("id {:?} is not {ID_LEN} lowercase hex characters", k.id)));
        }
        if !seen.insert(k.id.as_str()) {
            return Err(bad(&format!("id {} appears twice", k.id)));
        }
        if !is_valid_tenant(&k.tenant) {
            return Err(bad("tenant is not a valid tenant name"));
        }
        if hex::decode(&k.hash).map_or(true, |h| h.len() != 32) {
            return Err(bad("hash is not 64 hex characters"));
        }
    }
    Ok(file.keys)
}

/// The store secret; None when it does not exist yet.
fn read_secret(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match fs::read_to_string(path) {
        Ok(t) => {
            let bytes = hex::decode(t.trim())
                .ok()
                .filter(|b| b.len() == SECRET_BYTES)
                .ok_or_else(|| {
                    anyhow!(
                        "the key store secret {} is corrupt (expected 64 hex characters)",
                        path.display()
                    )
                })?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the key store secret {}", path.display())),
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length")
}

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id part of something that looks like a key (for logs: the id is not secret).
pub(crate) fn key_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let id = rest.get(..ID_LEN)?;
    (is_id(id) && rest[ID_LEN..].starts_with('_')).then_some(id)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The exclusive writer lock, held while this value lives.
struct WriteLock {
    _file: File,
}

impl WriteLock {
    fn acquire(keys_file: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = keys_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let path = sibling(keys_file, ".lock");
        let file = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Blocks while another `keys` command writes: both finish, in turn.
        file.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

fn write_entries(path: &Path, keys: Vec<KeyEntry>) -> anyhow::Result<()> {
    let file = KeysFile {
        version: FILE_VERSION,
        keys,
    };
    let mut text = serde_json::to_string_pretty(&file)?;
    text.push('\n');
    atomic_file::write(path, text.as_bytes(), true)
}

/// Makes a key for `tenant` with `scopes` (`infer` when empty) and stores its hash; returns the
/// entry and the key, which exists nowhere else.
pub(crate) fn add(
    keys_file: &Path,
    tenant: &str,
    scopes: &[Scope],
    name: Option<&str>,
) -> anyhow::Result<(KeyEntry, String)> {
    if !is_valid_tenant(tenant) {
        bail!("--tenant {tenant:?}: must be at most 64 characters of [A-Za-z0-9._-]");
    }
    if let Some(n) = name {
        if n.len() > MAX_NAME_LEN || n.chars().any(char::is_control) {
            bail!("--name: must be at most {MAX_NAME_LEN} bytes without control characters");
        }
    }
    let mut scopes: Vec<Scope> = if scopes.is_empty() {
        vec![Scope::Infer]
    } else {
        scopes.to_vec()
    };
    scopes.sort();
    scopes.dedup();

    let _lock = WriteLock::acquire(keys_file)?;
    let mut entries = read_entries(keys_file)?;
    let secret_file = secret_path(keys_file);
    let secret = match read_secret(&secret_file)? {
        Some(s) => s,
        None if entries.is_empty() => {
            let mut s = vec![0u8; SECRET_BYTES];
            rand::rng().fill_bytes(&mut s);
            atomic_file::write(&secret_file, format!("{}\n", hex::encode(&s)).as_bytes(), true)?;
            s
        }
        None => bail!(
            "the key store secret {} is missing but {} holds keys: restore it from a backup (every existing key is unusable without it)",
            secret_file.display(),
            keys_file.display()
        ),
    };
    let mut rng = rand::rng();
    let id = loop {
        let mut b = [0u8; ID_LEN / 2];
        rng.fill_bytes(&mut b);
        let id = hex::encode(b);
        if entries.iter().all(|e| e.id != id) {
            break id;
        }
    };
    let mut raw = [0u8; SECRET_BYTES];
    rng.fill_bytes(&mut raw);
    let key = format!(
        "{KEY_PREFIX}{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let mut m = mac(&secret);
    m.update(key.as_bytes());
    let entry = KeyEntry {
        id,
        tenant: tenant.to_owned(),
        scopes,
        name: name.map(str::to_owned),
        created_at: now_rfc3339(),
        revoked_at: None,
        hash: hex::encode(m.finalize().into_bytes()),
    };
    entries.push(entry.clone());
    write_entries(keys_file, entries)?;
    Ok((entry, key))
}

/// What [`revoke`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Revoked {
    Now(KeyEntry),
    /// It was revoked before (revoking is idempotent: scripts may retry).
    Already(KeyEntry),
}

/// Marks key `id` revoked; an unknown id is an error naming it.
pub(crate) fn revoke(keys_file: &Path, id: &str) -> anyhow::Result<Revoked> {
    let _lock = WriteLock::acquire(keys_file)?;
    let mut entries = read_entries(keys_file)?;
    let Some(e) = entries.iter_mut().find(|e| e.id == id) else {
        bail!(
            "no key with id {id:?} in {} (`genai-factory keys list` shows the ids)",
            keys_file.display()
        );
    };
    if e.revoked_at.is_some() {
        return Ok(Revoked::Already(e.clone()));
    }
    e.revoked_at = Some(now_rfc3339());
    let done = e.clone();
    write_entries(keys_file, entries)?;
    Ok(Revoked::Now(done))
}

/// Who a verified key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyIdentity {
    pub id: String,
    pub tenant: String,
    pub scopes: Scopes,
}

/// Why a presented key was refused (for the audit log; the caller hears only "invalid").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not of the form `gf_<id>_<secret>`.
    Malformed,
    UnknownId,
    /// The id exists but the secret part is wrong.
    WrongSecret,
    Revoked,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownId => "unknown_id",
            Refusal::WrongSecret => "wrong_secret",
            Refusal::Revoked => "revoked",
        }
    }
}

struct Stored {
    identity: KeyIdentity,
    revoked: bool,
    tag: Vec<u8>,
}

/// The keys as the server verifies them: an immutable snapshot of the files.
pub(crate) struct KeySet {
    /// None only when there are no keys.
    mac: Option<HmacSha256>,
    keys: HashMap<String, Stored>,
}

impl KeySet {
    /// Reads the keys file and its secret; a missing keys file is an empty set (open mode).
    pub(crate) fn load(keys_file: &Path) -> anyhow::Result<Self> {
        let entries = read_entries(keys_file)?;
        if entries.is_empty() {
            return Ok(Self {
                mac: None,
                keys: HashMap::new(),
            });
        }
        let secret_file = secret_path(keys_file);
        let secret = read_secret(&secret_file)?.ok_or_else(|| {
            anyhow!(
                "the key store secret {} is missing but {} holds {} keys: restore it (no key can be verified without it)",
                secret_file.display(),
                keys_file.display(),
                entries.len()
            )
        })?;
        let keys = entries
            .into_iter()
            .map(|e| {
                let stored = Stored {
                    identity: KeyIdentity {
                        id: e.id.clone(),
                        tenant: e.tenant,
                        scopes: Scopes::of(&e.scopes),
                    },
                    revoked: e.revoked_at.is_some(),
                    tag: hex::decode(&e.hash).expect("checked by read_entries"),
                };
                (e.id, stored)
            })
            .collect();
        Ok(Self {
            mac: Some(mac(&secret)),
            keys,
        })
    }

    /// Keys in the set, revoked ones included (any key turns authentication on).
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn revoked(&self) -> usize {
        self.keys.values().filter(|k| k.revoked).count()
    }

    /// Checks a presented key: HMAC of it compared in constant time with the stored tag; the
    /// revocation is looked at only after the secret matched, so a guess learns nothing about it.
    pub(crate) fn verify(&self, token: &str) -> Result<&KeyIdentity, Refusal> {
        let id = key_id(token).ok_or(Refusal::Malformed)?;
        if token.len() != KEY_PREFIX.len() + ID_LEN + 1 + SECRET_LEN {
            return Err(Refusal::Malformed);
        }
        let (Some(mac), Some(stored)) = (&self.mac, self.keys.get(id)) else {
            return Err(Refusal::UnknownId);
        };
        let mut m = mac.clone();
        m.update(token.as_bytes());
        m.verify_slice(&stored.tag).map_err(|_| Refusal::WrongSecret)?;
        if stored.revoked {
            return Err(Refusal::Revoked);
        }
        Ok(&stored.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/keys.json");
        (dir, path)
    }

    #[test]
    fn added_keys_verify_and_only_their_hash_is_stored() {
        let (_d, path) = store();
        let (a, key_a) = add(&path, "acme", &[], Some("ci")).unwrap();
        let (b, key_b) = add(&path, "globex", &[Scope::Metrics, Scope::Infer, Scope::Metrics], None).unwrap();
        assert_eq!(a.scopes, vec![Scope::Infer], "no --scope means infer");
        assert_eq!(b.scopes, vec![Scope::Infer, Scope::Metrics], "sorted, deduplicated");
        assert!(key_a.starts_with(&format!("gf_{}_", a.id)), "{key_a}");
        assert_eq!(key_a.len(), 3 + ID_LEN + 1 + SECRET_LEN);

        let set = KeySet::load(&path).unwrap();
        assert_eq!((set.len(), set.revoked()), (2, 0));
        let who = set.verify(&key_a).unwrap();
        assert_eq!((who.id.as_str(), who.tenant.as_str()), (a.id.as_str(), "acme"));
        assert!(who.scopes.allows(Scope::Infer) && !who.scopes.allows(Scope::Metrics));
        assert_eq!(set.verify(&key_b).unwrap().tenant, "globex");

        for f in [path.clone(), secret_path(&path), sibling(&path, ".lock")] {
            let text = fs::read_to_string(&f).unwrap();
            for key in [&key_a, &key_b] {
                assert!(!text.contains(key.as_str()), "{} holds a key", f.display());
                assert!(
                    !text.contains(&key[KEY_PREFIX.len() + ID_LEN + 1..]),
                    "{} holds a secret",
                    f.display()
                );
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", f.display());
            }
        }
        assert_eq!(read_entries(&path).unwrap(), vec![a, b]);
    }

    #[test]
    fn wrong_unknown_malformed_and_revoked_keys_are_refused() {
        let (_d, path) = store();
        let (a, key) = add(&path, "acme", &[Scope::Admin], None).unwrap();
        let set = KeySet::load(&path).unwrap();
        // Same id, one character of the secret changed.
        let mut wrong = key.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
        let wrong = String::from_utf8(wrong).unwrap();
        assert_eq!(set.verify(&wrong), Err(Refusal::WrongSecret));
        let unknown = format!("gf_{}{}", "0".repeat(ID_LEN), &key[KEY_PREFIX.len() + ID_LEN..]);
        assert_eq!(set.verify(&unknown), Err(Refusal::UnknownId));
        for bad in [
            "",
            "gf_",
            "Bearer x",
            &key[..key.len() - 1],
            &format!("{key}x"),
            &key.replacen("gf_", "sk_", 1),
            &key.to_uppercase(),
        ] {
            assert_eq!(set.verify(bad), Err(Refusal::Malformed), "{bad:?}");
        }
        assert_eq!(
            revoke(&path, &a.id).unwrap(),
            Revoked::Now(read_entries(&path).unwrap()[0].clone())
        );
        assert!(matches!(revoke(&path, &a.id).unwrap(), Revoked::Already(_)));
        let set = KeySet::load(&path).unwrap();
        assert_eq!((set.len(), set.revoked()), (1, 1));
        assert_eq!(set.verify(&key), Err(Refusal::Revoked));
        assert_eq!(
            set.verify(&wrong),
            Err(Refusal::WrongSecret),
            "revocation shows only to the key's holder"
        );
        let e = revoke(&path, "0123456789ab").unwrap_err().to_string();
        assert!(e.contains("0123456789ab") && e.contains("keys list"), "{e}");
    }

    #[test]
    fn the_secret_is_what_makes_a_hash_verifiable() {
        let (_d, path) = store();
        let (_, key) = add(&path, "acme", &[], None).unwrap();
        // Another store secret: the same file no longer verifies the key.
        let other = format!("{}\n", hex::encode([7u8; SECRET_BYTES]));
        fs::write(secret_path(&path), other).unwrap();
        assert_eq!(KeySet::load(&path).unwrap().verify(&key), Err(Refusal::WrongSecret));
        // Without a secret, a file that holds keys is an error (never an open server).
        fs::remove_file(secret_path(&path)).unwrap();
        let e = KeySet::load(&path).err().unwrap().to_string();
        assert!(e.contains("secret") && e.contains("missing"), "{e}");
        let e = add(&path, "acme", &[], None).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn missing_file_is_empty_and_bad_files_are_errors_naming_the_problem() {
        let (_d, path) = store();
        assert_eq!(KeySet::load(&path).unwrap().len(), 0);
        assert!(read_entries(&path).unwrap().is_empty());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        for (text, want) in [
            ("{", "not a valid keys file"),
            (r#"{"version": 2, "keys": []}"#, "version 2"),
            (
                r#"{"version": 1, "keys": [{"id": "x", "tenant": "a", "scopes": [], "created_at": "", "hash": ""}]}"#,
                "keys[0].id",
            ),
            (
                r#"{"version": 1, "keys": [{"id": "0123456789ab", "tenant": "a b", "scopes": [], "created_at": "", "hash": ""}]}"#,
                "keys[0].tenant",
            ),
            (
                r#"{"version": 1, "keys": [{"id": "0123456789ab", "tenant": "a", "scopes": ["root"], "created_at": "", "hash": ""}]}"#,
                "root",
            ),
            (
                r#"{"version": 1, "keys": [{"id": "0123456789ab", "tenant": "a", "scopes": [], "created_at": "", "hash": "00"}]}"#,
                "keys[0].hash",
            ),
        ] {
            fs::write(&path, text).unwrap();
            let e = format!("{:#}", KeySet::load(&path).err().unwrap());
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = add(&path, "no/slash", &[], None).unwrap_err().to_string();
        assert!(e.contains("--tenant"), "{e}");
        let e = add(&path, "t", &[], Some("a\nb")).unwrap_err().to_string();
        assert!(e.contains("--name"), "{e}");
    }

    #[test]
    fn concurrent_writers_lose_no_key() {
        let (_d, path) = store();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || add(&path, &format!("t{i}"), &[], None).unwrap().1)
            })
            .collect();
        let keys: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let set = KeySet::load(&path).unwrap();
        assert_eq!(set.len(), 8);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(set.verify(k).unwrap().tenant, format!("t{i}"));
        }
    }

    #[test]
    fn key_id_reads_only_well_formed_ids() {
        assert_eq!(key_id("gf_0123456789ab_rest"), Some("0123456789ab"));
        assert_eq!(key_id("gf_0123456789AB_rest"), None);
        assert_eq!(key_id("gf_0123456789abc"), None);
        assert_eq!(key_id("gf_01234"), None);
        assert_eq!(key_id("ÿÿÿÿÿÿÿÿÿÿÿÿÿÿ"), None);
    }
}
