//! `aiecs-storage`: health checks, diagnostics, statistics, migration, backup and
//! cleanup for any aiecs-storage backend (feature `cli`).
//!
//! Every command takes a backend URL or `--config FILE` (a TOML stack configuration).
//! Exit status is 0 only on success; `--json` prints machine-readable output. No
//! password is ever printed: URLs are shown redacted.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aiecs_storage::prelude::*;
use aiecs_storage::{HealthChecker, HealthStatus, MetricsReport};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "aiecs-storage",
    version,
    about = "Operate aiecs-storage backends"
)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the storage is: a URL, or a configuration file naming one with its layers.
#[derive(Args, Clone)]
struct Target {
    /// Backend URL: memory://, sqlite://path, redis://, rediss://, redis+cluster://, postgres://
    url: Option<String>,
    /// A TOML stack configuration instead of a URL.
    #[arg(long, value_name = "FILE", conflicts_with = "url")]
    config: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the health checker: connection and a timed metrics read.
    Health {
        #[command(flatten)]
        target: Target,
    },
    /// Count sessions, messages, checkpoints, pending writes and task contexts.
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Tell apart refused, timed out, auth and TLS failures, then round-trip a record.
    Diagnose {
        #[command(flatten)]
        target: Target,
        /// Seconds to wait for the connection (0..=86400).
        #[arg(long, default_value_t = 5.0, value_parser = parse_timeout, allow_hyphen_values = true)]
        timeout: f64,
    },
    /// Copy everything from one backend to another; rerunning is safe, an interrupted
    /// run resumes where it stopped. The `AIECS_STORAGE_*` variables do not apply to
    /// either side, and the same store on both sides is refused.
    Migrate {
        /// Source URL.
        #[arg(long, required_unless_present = "from_config")]
        from: Option<String>,
        /// Source configuration file instead of --from.
        #[arg(long, value_name = "FILE", conflicts_with = "from")]
        from_config: Option<std::path::PathBuf>,
        /// Target URL.
        #[arg(long, required_unless_present = "to_config")]
        to: Option<String>,
        /// Target configuration file instead of --to.
        #[arg(long, value_name = "FILE", conflicts_with = "to")]
        to_config: Option<std::path::PathBuf>,
        /// Records per batch (1..=10000).
        #[arg(long, default_value_t = 100, value_parser = parse_batch_size, allow_hyphen_values = true)]
        batch_size: usize,
        /// Compare counts and per-session and per-thread checksums afterwards.
        #[arg(long)]
        verify: bool,
        /// Where progress is kept for resuming; a file written for another pair of
        /// stores is refused (default: one file per pair of stores in
        /// `$XDG_STATE_HOME/aiecs-storage` or `~/.local/state/aiecs-storage`).
        #[arg(long, value_name = "FILE")]
        state_file: Option<std::path::PathBuf>,
    },
    /// Write a whole store, one session or one thread as JSON lines.
    Export {
        #[command(flatten)]
        target: Target,
        /// Only this session (with its messages and task context).
        #[arg(long, conflicts_with = "thread")]
        session: Option<String>,
        /// Only this thread (every namespace, checkpoint and pending write).
        #[arg(long)]
        thread: Option<String>,
        /// Write here instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Read JSON lines written by export into a backend: `import URL FILE`, or
    /// `import --config CFG FILE`. The whole file is checked (header, order, counts and
    /// checksum in its trailer) before anything is written.
    Import {
        /// The backend URL (omitted with --config), then the export file.
        #[arg(num_args = 1..=2, value_names = ["URL", "FILE"], required = true)]
        args: Vec<String>,
        /// A TOML stack configuration instead of a URL.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Accept a version 1 export (written before exports had a trailer), which
        /// cannot be checked for truncation.
        #[arg(long)]
        accept_v1: bool,
    },
    /// Remove sessions idle longer than the given hours, with their messages and context.
    Cleanup {
        #[command(flatten)]
        target: Target,
        /// Sessions idle longer than this many hours are removed (0..=876000).
        #[arg(long, value_name = "H", value_parser = parse_max_idle_hours, allow_hyphen_values = true)]
        max_idle_hours: f64,
    },
}

// Numeric flags are checked while parsing, so every bad value is a usage error (exit 2)
// naming the flag, and no out-of-range figure reaches a `Duration` or `Instant`
// conversion that would panic.

/// Longest connection wait: a day is already far beyond any useful diagnosis, and
/// `Instant + timeout` must not overflow.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;
/// A century: older than any stored session, and `now - max_idle` must stay a date.
const MAX_IDLE_HOURS: f64 = 876_000.0;
const MAX_BATCH_SIZE: usize = 10_000;

fn parse_bounded_f64(text: &str, max: f64, unit: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of {unit}"))?;
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(value)
    } else {
        Err(format!("`{text}` is out of range: give 0 to {max} {unit}"))
    }
}

fn parse_timeout(text: &str) -> Result<f64, String> {
    parse_bounded_f64(text, MAX_TIMEOUT_SECS, "seconds")
}

fn parse_max_idle_hours(text: &str) -> Result<f64, String> {
    parse_bounded_f64(text, MAX_IDLE_HOURS, "hours")
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_SIZE).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is out of range: give a whole number from 1 to {MAX_BATCH_SIZE}"
        )),
    }
}

/// What a command prints and whether it succeeded.
struct Outcome {
    ok: bool,
    text: String,
    json: Value,
}

fn open(target: &Target) -> aiecs_storage::Result<Arc<dyn StorageBackend>> {
    open_either(&target.url, &target.config, true)
}

/// Opens a URL or a configuration file. `env_overrides` applies the `AIECS_STORAGE_*`
/// variables to a file: they configure an application's one store, and must not
/// redirect a side of a two-sided command such as `migrate`.
fn open_either(
    url: &Option<String>,
    config: &Option<std::path::PathBuf>,
    env_overrides: bool,
) -> aiecs_storage::Result<Arc<dyn StorageBackend>> {
    match (url, config) {
        (Some(url), None) => aiecs_storage::open(url),
        (None, Some(path)) => {
            let config = aiecs_storage::config::StorageConfig::from_file(path)?;
            if env_overrides {
                config.with_env_overrides()?.build()
            } else {
                config.build()
            }
        }
        _ => Err(aiecs_storage::StorageError::invalid_input(
            "url",
            "give a backend URL or --config FILE",
        )),
    }
}

/// The figures of the backend itself: a stack nests them under its layers' reports.
fn backend_values(report: &MetricsReport) -> &aiecs_storage::Metadata {
    let mut r = report;
    while let Some(inner) = r.components.first() {
        r = inner;
    }
    &r.values
}

async fn run(command: Command) -> aiecs_storage::Result<Outcome> {
    match command {
        Command::Health { target } => {
            let storage = open(&target)?;
            let report = HealthChecker::new(storage.clone()).check().await;
            let ok = report.status != HealthStatus::Unhealthy;
            let mut text = format!("status: {:?}\n", report.status).to_lowercase();
            if let Ok(Value::Object(checks)) = serde_json::to_value(&report.checks) {
                for (name, check) in checks {
                    text.push_str(&format!("{name}: {check}\n"));
                }
            }
            for issue in &report.issues {
                text.push_str(&format!("issue: {issue}\n"));
            }
            let _ = storage.close().await;
            Ok(Outcome {
                ok,
                text,
                json: serde_json::to_value(&report)?,
            })
        }
        Command::Stats { target } => {
            let storage = open(&target)?;
            storage.initialize().await?;
            let report = storage.get_metrics().await?;
            let values = backend_values(&report);
            let mut stats = serde_json::Map::new();
            let mut text = String::new();
            for key in [
                "sessions",
                "messages",
                "checkpoints",
                "pending_writes",
                "task_contexts",
            ] {
                let v = values.get(key).cloned().unwrap_or(Value::Null);
                text.push_str(&format!("{key}: {v}\n"));
                stats.insert(key.into(), v);
            }
            storage.close().await?;
            Ok(Outcome {
                ok: true,
                text,
                json: Value::Object(stats),
            })
        }
        Command::Diagnose { target, timeout } => {
            let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
                aiecs_storage::StorageError::invalid_input(
                    "timeout",
                    "must be seconds, not negative",
                )
            })?;
            let storage = open(&target)?;
            // With --config, the connection check is of the backend the file names.
            let url = match (&target.url, &target.config) {
                (Some(url), _) => url.clone(),
                (None, Some(path)) => {
                    aiecs_storage::StorageConfig::from_file(path)?
                        .with_env_overrides()?
                        .url
                }
                (None, None) => String::new(),
            };
            let connection = Some(aiecs_storage::ops::diagnose_connection(&url, timeout).await);
            let consistency = aiecs_storage::ops::diagnose_consistency(storage.as_ref()).await;
            let _ = storage.close().await;
            let conn_json = serde_json::to_value(&connection)?;
            let cons_json = serde_json::to_value(&consistency)?;
            let conn_ok = conn_json.get("ok").and_then(Value::as_bool).unwrap_or(true);
            let cons_ok = cons_json
                .get("ok")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let text = format!(
                "connection: {}\nconsistency: {}\n",
                serde_json::to_string_pretty(&conn_json)?,
                serde_json::to_string_pretty(&cons_json)?
            );
            Ok(Outcome {
                ok: conn_ok && cons_ok,
                text,
                json: json!({ "connection": conn_json, "consistency": cons_json }),
            })
        }
        Command::Migrate {
            from,
            from_config,
            to,
            to_config,
            batch_size,
            verify,
            state_file,
        } => {
            let source = open_either(&from, &from_config, false)?;
            let target = open_either(&to, &to_config, false)?;
            // Compared before either is opened, so a mistake touches nothing.
            if let (Some(a), Some(b)) = (source.store_id(), target.store_id()) {
                if a == b {
                    return Err(aiecs_storage::StorageError::invalid_input(
                        "to",
                        // Not the id: a URL the parser misreads (a password with a raw
                        // `?`) could put part of a password in it.
                        "names the same store as the source (same file, server, database \
                         and prefix or schema); a migration needs two different stores",
                    ));
                }
            }
            source.initialize().await?;
            target.initialize().await?;
            let state = match state_file {
                Some(path) => path,
                None => default_state_file(source.as_ref(), target.as_ref())?,
            };
            let bar = progress::Bar::new();
            let report = aiecs_storage::Migrator::new(source.as_ref(), target.as_ref())
                .batch_size(batch_size)
                .state_file(&state)
                .on_progress(|p| bar.update(p))
                .run()
                .await;
            bar.finish();
            let report = report?;
            let mut json = json!({ "migration": report });
            let mut text = format!(
                "copied {} sessions, {} messages, {} task contexts, {} checkpoints, {} pending writes in {:.1?}{}\n",
                report.copied.sessions,
                report.copied.messages,
                report.copied.task_contexts,
                report.copied.checkpoints,
                report.copied.writes,
                report.elapsed,
                if report.resumed_from.is_some() { " (resumed)" } else { "" },
            );
            let mut ok = true;
            if verify {
                let check = aiecs_storage::ops::verify(source.as_ref(), target.as_ref()).await?;
                ok = check.is_clean();
                text.push_str(&format!(
                    "verify: {} ({} sessions, {} threads checked, {} differences)\n",
                    if ok { "clean" } else { "DIFFERENT" },
                    check.sessions_checked,
                    check.threads_checked,
                    check.differences.len()
                ));
                for d in &check.differences {
                    text.push_str(&format!("  {}\n", serde_json::to_string(d)?));
                }
                json["verify"] = serde_json::to_value(&check)?;
            }
            source.close().await?;
            target.close().await?;
            Ok(Outcome { ok, text, json })
        }
        Command::Export {
            target,
            session,
            thread,
            output,
        } => {
            use aiecs_storage::ops::transfer::{export, Scope, TransferOptions};
            let storage = open(&target)?;
            let scope = match (session, thread) {
                (Some(s), _) => Scope::session(s),
                (_, Some(t)) => Scope::thread(t),
                _ => Scope::All,
            };
            let options = TransferOptions::default();
            let counts = match &output {
                Some(path) => {
                    let mut file = replace::Replacement::create(path)?;
                    let counts = export(storage.as_ref(), &scope, file.writer(), &options).await?;
                    file.commit()?;
                    counts
                }
                None => {
                    export(storage.as_ref(), &scope, std::io::stdout().lock(), &options).await?
                }
            };
            storage.close().await?;
            // The records went to standard output; the summary goes to standard error.
            eprintln!("exported {}", serde_json::to_string(&counts)?);
            Ok(Outcome {
                ok: true,
                text: String::new(),
                json: Value::Null,
            })
        }
        Command::Import {
            mut args,
            config,
            accept_v1,
        } => {
            use aiecs_storage::ops::transfer::{check_export, import_stream, TransferOptions};
            use std::io::Seek;
            let file = std::path::PathBuf::from(args.pop().unwrap_or_default());
            let target = Target {
                url: args.pop(),
                config,
            };
            let storage = open(&target)?;
            let input = std::fs::File::open(&file)
                .map_err(|e| aiecs_storage::StorageError::invalid_input("file", e.to_string()))?;
            let options = TransferOptions {
                accept_v1,
                ..TransferOptions::default()
            };
            // Two passes, as `import` makes them, with the header of the first at hand
            // for the version 1 warning: nothing is written unless the whole file passes.
            let mut input = std::io::BufReader::new(input);
            let summary = check_export(&mut input, &options)?;
            input
                .rewind()
                .map_err(|e| aiecs_storage::StorageError::invalid_input("file", e.to_string()))?;
            let counts = import_stream(storage.as_ref(), input, &options).await?;
            storage.close().await?;
            let mut text = format!("imported {}\n", serde_json::to_string(&counts)?);
            let mut json = serde_json::to_value(counts)?;
            if summary.header.version < 2 {
                let warning = format!(
                    "{} is a version {} export, without a trailer: it could not be checked \
                     for truncation",
                    file.display(),
                    summary.header.version
                );
                text.push_str(&format!("warning: {warning}\n"));
                json["warning"] = json!(warning);
            }
            Ok(Outcome {
                ok: true,
                text,
                json,
            })
        }
        Command::Cleanup {
            target,
            max_idle_hours,
        } => {
            if !(max_idle_hours.is_finite() && max_idle_hours >= 0.0) {
                return Err(aiecs_storage::StorageError::invalid_input(
                    "max_idle_hours",
                    "must be a number of hours, not negative",
                ));
            }
            let storage = open(&target)?;
            let removed = aiecs_storage::ops::run_cleanup(
                storage.as_ref(),
                Duration::from_secs_f64(max_idle_hours * 3600.0),
            )
            .await?;
            storage.close().await?;
            Ok(Outcome {
                ok: true,
                text: format!("removed {removed} idle sessions\n"),
                json: json!({ "removed": removed }),
            })
        }
    }
}

/// A state file per pair of stores, so rerunning the same migration resumes it, in a
/// directory private to the user: `$XDG_STATE_HOME/aiecs-storage`, else
/// `~/.local/state/aiecs-storage`, else `aiecs-storage-<uid>` in the temp directory.
fn default_state_file(
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

mod replace {
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
}

mod progress {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use aiecs_storage::ops::migrate::Progress;
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

    /// A bar with rate and ETA, drawn only once a migration has run for a second, so
    /// short runs print nothing but their summary.
    pub struct Bar {
        bar: ProgressBar,
        started: Instant,
        shown: Mutex<bool>,
    }

    impl Bar {
        pub fn new() -> Self {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} units ({per_sec}, ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Bar {
                bar,
                started: Instant::now(),
                shown: Mutex::new(false),
            }
        }

        pub fn update(&self, p: &Progress) {
            if let Some(t) = &p.totals {
                self.bar.set_length(t.units());
            }
            self.bar.set_position(p.units_done());
            self.bar
                .set_message(format!("{:?}", p.phase).to_lowercase());
            let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
            if !*shown && self.started.elapsed() > Duration::from_secs(1) {
                self.bar.set_draw_target(ProgressDrawTarget::stderr());
                *shown = true;
            }
        }

        pub fn finish(&self) {
            self.bar.finish_and_clear();
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(outcome) => {
            if cli.json {
                println!("{}", outcome.json);
            } else {
                print!("{}", outcome.text);
            }
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    json!({ "error": e.to_string(), "kind": e.kind().as_str() })
                );
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
