//! The migration state file: what it holds, how it is read, written and removed, and the
//! fingerprints that bind it to its pair of stores.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::fnv::Fnv;
use crate::ops::transfer::{Position, Scope};
use crate::storage::StorageBackend;

/// The `format` of a migration state file.
pub const STATE_FORMAT: &str = "aiecs-storage-migration";

/// The version of the migration state file. Version 2 binds the file to its pair of
/// stores; a version 1 file is refused, since the pair it belongs to is unknown.
pub const STATE_VERSION: u32 = 2;

/// The content of a migration state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// What the migration copies; a run with another scope refuses the file.
    pub scope: Scope,
    /// The source's kind, for people reading the file.
    pub source: String,
    /// The target's kind, for people reading the file.
    pub target: String,
    /// A fingerprint of the source's [`store_id`](StorageBackend::store_id) (a hash:
    /// the file never holds a URL); a run between other stores refuses the file.
    #[serde(default)]
    pub source_store: Option<String>,
    /// A fingerprint of the target's `store_id`.
    #[serde(default)]
    pub target_store: Option<String>,
    /// Everything before this position is copied.
    pub position: Position,
    /// Items copied by all runs so far.
    pub records: u64,
    /// When the first run started.
    pub started_at: DateTime<Utc>,
    /// When the file was last written.
    pub updated_at: DateTime<Utc>,
}

/// Reads a migration state file; `None` when there is none.
pub fn read_state(path: &Path) -> Result<Option<MigrationState>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StorageError::Backend {
                message: format!(
                    "could not read the migration state file {}: {e}",
                    path.display()
                ),
                transient: false,
                source: Some(Box::new(e)),
            })
        }
    };
    let state: MigrationState = serde_json::from_slice(&bytes).map_err(|e| {
        StorageError::serialization(
            format!("{} is not a migration state file: {e}", path.display()),
            e,
        )
    })?;
    if state.format == STATE_FORMAT && state.version < STATE_VERSION {
        return Err(StorageError::invalid_input(
            "state_file",
            format!(
                "{} is a version {} state file, which does not record the stores it \
                 belongs to; remove it to start the migration over",
                path.display(),
                state.version
            ),
        ));
    }
    if state.format != STATE_FORMAT || state.version > STATE_VERSION {
        return Err(StorageError::Serialization {
            message: format!(
                "{} is a `{}` file of version {}; this build reads `{STATE_FORMAT}` up to \
                 version {STATE_VERSION}",
                path.display(),
                state.format,
                state.version
            ),
            source: None,
        });
    }
    Ok(Some(state))
}

pub(super) fn write_state(path: &Path, state: &MigrationState) -> Result<()> {
    let io = |e: std::io::Error| StorageError::Backend {
        message: format!(
            "could not write the migration state file {}: {e}",
            path.display()
        ),
        transient: false,
        source: Some(Box::new(e)),
    };
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| StorageError::serialization("could not encode the migration state", e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover temp file (a crash) or a planted symlink is removed, not written
    // through: `create_new` refuses any existing path, symlinks included, and the new
    // file is readable by its owner only. The rename replaces `path` itself, never
    // what a symlink there points to.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// A fingerprint of a store's id (FNV-1a, 64 bits): enough to tell two stores apart in
/// a state file without writing down where they are.
pub(super) fn store_fingerprint(backend: &dyn StorageBackend) -> Option<String> {
    Some(format!(
        "fnv1a64:{:016x}",
        Fnv::hash(backend.store_id()?.as_bytes())
    ))
}

/// Names a pair of stores (kinds and [`store_id`](StorageBackend::store_id)s) as 16 hex
/// digits, the same in every process: the command line names its default state file
/// with it, so rerunning a migration between the same stores resumes it.
pub fn pair_key(source: &dyn StorageBackend, target: &dyn StorageBackend) -> String {
    let mut h = Fnv::default();
    h.bytes(
        format!(
            "{}|{:?}|{}|{:?}",
            source.kind(),
            source.store_id(),
            target.kind(),
            target.store_id()
        )
        .as_bytes(),
    );
    h.hex()
}

pub(super) fn remove_state(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::Backend {
            message: format!(
                "could not remove the migration state file {}: {e}",
                path.display()
            ),
            transient: false,
            source: Some(Box::new(e)),
        }),
    }
}
