//! What the layers of a stack report about themselves that asks for an operator: a
//! failover journal holding writes its primary has not got.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::within;
use crate::model::{Metadata, MetricsReport};
use crate::storage::StorageBackend;

/// One thing [`diagnose_layers`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Always `warning` for now: the stack works, and something in it needs watching.
    pub severity: String,
    /// Where, from the outermost layer: `cache > failover`; the sides of a failover
    /// pair are `primary <kind>` and `fallback <kind>`.
    pub component: String,
    /// What, in one line.
    pub message: String,
    /// The figures it is made of (for a journal: `journal_depth`,
    /// `journal_oldest_age_seconds`, `journal_path`).
    pub details: Metadata,
}

/// What [`diagnose_layers`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDiagnosis {
    /// What needs watching; empty when nothing does.
    pub findings: Vec<Finding>,
    /// Why the layers' figures could not be read (`get_metrics` failed), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reads the figures of every layer of `backend` (its
/// [`get_metrics`](StorageBackend::get_metrics), at most `timeout`) and reports what
/// asks for an operator: a failover journal that holds writes not yet replayed to the
/// primary (its depth, the age of the oldest, its path), which means the primary is
/// still down, or no process replays the journal, or the replay is stuck. Never fails;
/// calls nothing but `get_metrics`, so it neither writes nor starts a replay.
pub async fn diagnose_layers(backend: &dyn StorageBackend, timeout: Duration) -> LayerDiagnosis {
    match within(timeout, "get_metrics", backend.get_metrics()).await {
        Ok(report) => {
            let mut findings = Vec::new();
            collect(&report, &mut vec![report.component.clone()], &mut findings);
            LayerDiagnosis {
                findings,
                error: None,
            }
        }
        Err(e) => LayerDiagnosis {
            findings: Vec::new(),
            error: Some(e.to_string()),
        },
    }
}

fn collect(report: &MetricsReport, path: &mut Vec<String>, findings: &mut Vec<Finding>) {
    if report.component == "failover" {
        if let Some(finding) = journal_finding(&report.values, &path.join(" > ")) {
            findings.push(finding);
        }
    }
    let failover = report.component == "failover" && report.components.len() == 2;
    for (i, child) in report.components.iter().enumerate() {
        path.push(side_name(failover, i, &child.component));
        collect(child, path, findings);
        path.pop();
    }
}

/// The name of a nested component in a path: the sides of a failover pair (primary
/// first) are told apart.
pub(crate) fn side_name(failover: bool, index: usize, component: &str) -> String {
    match (failover, index) {
        (true, 0) => format!("primary {component}"),
        (true, _) => format!("fallback {component}"),
        _ => component.to_owned(),
    }
}

/// What a failover layer's figures (its `get_metrics` values or its health details)
/// say of writes waiting in its journal: `None` without a journal, or with an empty one.
pub(crate) fn journal_finding(figures: &Metadata, component: &str) -> Option<Finding> {
    let depth = figures.get("journal_depth")?.as_u64().filter(|&d| d > 0)?;
    let age = figures
        .get("journal_oldest_age_seconds")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    // The layer reports its path without credentials.
    let path = figures
        .get("journal_path")
        .and_then(Value::as_str)
        .unwrap_or("(path unknown)");
    let details = [
        "journal_depth",
        "journal_oldest_age_seconds",
        "journal_path",
    ]
    .into_iter()
    .filter_map(|k| Some((k.to_owned(), figures.get(k)?.clone())))
    .collect();
    Some(Finding {
        severity: "warning".into(),
        component: component.to_owned(),
        message: format!(
            "the failover journal {path} holds {depth} write(s) not yet replayed to the \
             primary, the oldest {age:.1} s old"
        ),
        details,
    })
}
