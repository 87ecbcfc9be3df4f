//! What each command does.

use std::time::Duration;

use aiecs_storage::prelude::*;
use aiecs_storage::{HealthChecker, HealthStatus};
use serde_json::{json, Value};

use crate::state_dir::default_state_file;
use crate::{backend_values, open, open_either, progress, replace, Command, Outcome, Target};

/// Runs one command: its text and JSON output, and whether it succeeded.
pub async fn run(command: Command) -> aiecs_storage::Result<Outcome> {
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
            // Before the round trip, whose writes a degraded failover would journal too.
            let layers =
                aiecs_storage::ops::diagnose_layers(storage.as_ref(), Duration::from_secs(10))
                    .await;
            let consistency = aiecs_storage::ops::diagnose_consistency(storage.as_ref()).await;
            let _ = storage.close().await;
            let conn_json = serde_json::to_value(&connection)?;
            let cons_json = serde_json::to_value(&consistency)?;
            let layers_json = serde_json::to_value(&layers)?;
            let conn_ok = conn_json.get("ok").and_then(Value::as_bool).unwrap_or(true);
            let cons_ok = cons_json
                .get("ok")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut text = format!(
                "connection: {}\nconsistency: {}\n",
                serde_json::to_string_pretty(&conn_json)?,
                serde_json::to_string_pretty(&cons_json)?
            );
            // Warnings: the store works, and something in the stack needs watching.
            for f in &layers.findings {
                text.push_str(&format!("{}: {}: {}\n", f.severity, f.component, f.message));
            }
            if let Some(e) = &layers.error {
                text.push_str(&format!("layers: could not read their figures: {e}\n"));
            }
            Ok(Outcome {
                ok: conn_ok && cons_ok,
                text,
                json: json!({
                    "connection": conn_json,
                    "consistency": cons_json,
                    "layers": layers_json,
                }),
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
