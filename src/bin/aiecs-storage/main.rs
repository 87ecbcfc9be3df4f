//! `aiecs-storage`: health checks, diagnostics, statistics, migration, backup and
//! cleanup for any aiecs-storage backend (feature `cli`).
//!
//! Every command takes a backend URL or `--config FILE` (a TOML stack configuration).
//! Exit status is 0 only on success; `--json` prints machine-readable output. No
//! password is ever printed: URLs are shown redacted.

use std::process::ExitCode;
use std::sync::Arc;

use aiecs_storage::prelude::*;
use aiecs_storage::MetricsReport;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

mod progress;
mod replace;
mod run;
mod state_dir;

use run::run;

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
    /// Tell apart refused, timed out, auth and TLS failures, then round-trip a record;
    /// warn of what the layers report (a failover journal holding writes).
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
