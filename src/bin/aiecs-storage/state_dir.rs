//! Where `migrate` keeps its default state file: a directory private to the user.

use aiecs_storage::prelude::*;

/// A state file per pair of stores, so rerunning the same migration resumes it, in a
/// directory private to the user: `$XDG_STATE_HOME/aiecs-storage`, else
/// `~/.local/state/aiecs-storage`, else `aiecs-storage-<uid>` in the temp directory.
pub fn default_state_file(
    source: &dyn StorageBackend,
    target: &dyn StorageBackend,
) -> aiecs_storage::Result<std::path::PathBuf> {
    Ok(private_state_dir()?.join(format!(
        "migrate-{}.json",
        aiecs_storage::ops::migrate::pair_key(source, target)
    )))
}

fn private_state_dir() -> aiecs_storage::Result<std::path::PathBuf> {
    use std::path::PathBuf;
    let env_dir = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let dir = match (env_dir("XDG_STATE_HOME"), env_dir("HOME")) {
        (Some(state), _) => state.join("aiecs-storage"),
        (None, Some(home)) => home.join(".local/state/aiecs-storage"),
        (None, None) => std::env::temp_dir().join(format!("aiecs-storage-{}", user_tag())),
    };
    let refuse = |why: String| {
        aiecs_storage::StorageError::invalid_input(
            "state_file",
            format!("{why}; give a state file with --state-file"),
        )
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| refuse(format!("cannot create {}: {e}", dir.display())))?;
    // A directory someone else made (or a symlink planted in a shared temp directory)
    // could hand us their state file or take our writes.
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| refuse(format!("cannot read {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(refuse(format!("{} is not a directory", dir.display())));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "{} is writable by other users (mode {:o})",
                dir.display(),
                meta.mode() & 0o777
            )));
        }
        if our_uid().is_some_and(|uid| uid != meta.uid()) {
            return Err(refuse(format!("{} belongs to another user", dir.display())));
        }
    }
    Ok(dir)
}

/// This process's user id, as Linux shows it (`None` elsewhere).
#[cfg(unix)]
fn our_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Tells users apart in a shared temp directory.
fn user_tag() -> String {
    #[cfg(unix)]
    if let Some(uid) = our_uid() {
        return uid.to_string();
    }
    std::env::var("USER").unwrap_or_else(|_| "user".to_owned())
}
