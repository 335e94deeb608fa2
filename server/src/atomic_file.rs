//! Replacing a small state file atomically (the keys file and its secret, the tenants' spend):
//! a temp file beside it, fsync, rename over it, fsync the directory — a crash leaves the old
//! file or the new one, never a torn one. One writer per file is the caller's business (a lock
//! or a single owning task), as the temp name is fixed.
//!
//! Tested through its callers' round-trip tests (`auth::keys`, `tenancy`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// `p` with `suffix` appended to its file name (`keys.json` → `keys.json.lock`).
pub(crate) fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Open options that create files readable by their owner only (0600) on Unix.
pub(crate) fn private_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Writes `bytes` to `path` atomically, creating its directory; `private` files are 0600.
pub(crate) fn write(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = sibling(path, ".tmp");
    let mut options = if private { private_options() } else { OpenOptions::new() };
    let mut f = options
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}
