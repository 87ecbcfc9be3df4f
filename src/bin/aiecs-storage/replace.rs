//! Writing an output file beside its target and renaming it over the target on success.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use aiecs_storage::StorageError;

/// A file written beside `target` and renamed over it only by
/// [`commit`](Replacement::commit), so an export that fails or is interrupted never
/// truncates or replaces what `target` held. Dropped without a commit, it removes
/// itself (a killed process leaves it behind, as a `.…tmp` file beside the target).
pub struct Replacement {
    // Declared before the guard so the file is closed before the guard removes it.
    file: BufWriter<File>,
    guard: TempGuard,
    target: PathBuf,
}

/// Removes the temporary file unless disarmed by a successful rename.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn output_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::invalid_input("output", format!("{what} {}: {e}", path.display()))
}

impl Replacement {
    pub fn create(target: &Path) -> Result<Self, StorageError> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                StorageError::invalid_input(
                    "output",
                    format!("{} does not name a file", target.display()),
                )
            })?
            .to_string_lossy()
            .into_owned();
        // Same directory, so the rename stays on one file system and is atomic.
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut attempt = 0u32;
        loop {
            let path = dir.join(format!(
                ".{name}.{}.{stamp}.{attempt}.tmp",
                std::process::id()
            ));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let guard = TempGuard { path, armed: true };
                    // The export replaces the file's content, not who may read it.
                    if let Ok(meta) = std::fs::metadata(target) {
                        let _ = std::fs::set_permissions(&guard.path, meta.permissions());
                    }
                    return Ok(Replacement {
                        file: BufWriter::new(file),
                        guard,
                        target: target.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => return Err(output_error("cannot create a file beside", target, e)),
            }
        }
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.file
    }

    /// Flushes the file to disk and renames it over the target.
    pub fn commit(self) -> Result<(), StorageError> {
        let Replacement {
            file,
            mut guard,
            target,
        } = self;
        let file = file
            .into_inner()
            .map_err(|e| output_error("cannot write", &guard.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| output_error("cannot write", &guard.path, e))?;
        drop(file);
        std::fs::rename(&guard.path, &target)
            .map_err(|e| output_error("cannot replace", &target, e))?;
        guard.armed = false;
        Ok(())
    }
}
