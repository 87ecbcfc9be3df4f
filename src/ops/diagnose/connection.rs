//! Why a backend cannot be reached: refused, timed out, unresolved, refused
//! credentials or a failed TLS handshake.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::endpoint::{endpoint, plain_resp_reply, tcp_probe, Endpoint};
use super::within;
use crate::config::open;
use crate::error::StorageError;
use crate::model::now;
use crate::redact::{redact_url, scrub};
use crate::storage::StorageBackend;

/// What [`diagnose_connection`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnectionOutcome {
    /// The server answered and the backend initialized.
    Ok,
    /// Nothing listens at the address (the connection was actively refused).
    Refused,
    /// No answer within the timeout: a host that drops packets, a firewall, or a server
    /// that accepts connections and never answers.
    TimedOut,
    /// The server refused the credentials.
    AuthFailed,
    /// The TLS handshake failed: the port does not speak TLS, or the certificate is not
    /// trusted or does not match the host.
    TlsFailed,
    /// The host name does not resolve.
    DnsFailed,
    /// The URL is malformed, or names a backend this build cannot open.
    InvalidUrl,
    /// Anything else; the message says what.
    Other,
}

impl ConnectionOutcome {
    /// A stable snake_case name (`ok`, `refused`, `timed_out`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnectionOutcome::Ok => "ok",
            ConnectionOutcome::Refused => "refused",
            ConnectionOutcome::TimedOut => "timed_out",
            ConnectionOutcome::AuthFailed => "auth_failed",
            ConnectionOutcome::TlsFailed => "tls_failed",
            ConnectionOutcome::DnsFailed => "dns_failed",
            ConnectionOutcome::InvalidUrl => "invalid_url",
            ConnectionOutcome::Other => "other",
        }
    }

    /// What to check next, in one sentence.
    pub const fn advice(self) -> &'static str {
        match self {
            ConnectionOutcome::Ok => "nothing to do",
            ConnectionOutcome::Refused => {
                "nothing listens there: check that the server runs and the host and port \
                 are right"
            }
            ConnectionOutcome::TimedOut => {
                "no answer in time: check the host, firewalls and security groups, and \
                 whether the server is overloaded or hung"
            }
            ConnectionOutcome::AuthFailed => {
                "the server refused the credentials: check the user name and password \
                 (and the ACL user, for Redis)"
            }
            ConnectionOutcome::TlsFailed => {
                "the TLS handshake failed: check that the port speaks TLS (rediss:// and \
                 sslmode=require need a TLS port) and that the server's certificate is \
                 trusted and matches the host name"
            }
            ConnectionOutcome::DnsFailed => {
                "the host name does not resolve: check its spelling and the DNS settings"
            }
            ConnectionOutcome::InvalidUrl => {
                "fix the URL: see aiecs_storage::open for the forms and the features they \
                 need"
            }
            ConnectionOutcome::Other => "see the message",
        }
    }
}

impl std::fmt::Display for ConnectionOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a [`ConnectionDiagnosis`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosisStep {
    /// `tcp_connect`, `plain_ping` (for `rediss://`: does the port answer without TLS?),
    /// `open`, `initialize` or `health_check`.
    pub step: String,
    /// Whether it worked.
    pub ok: bool,
    /// How long it took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// What it found (the address reached, the error), without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What [`diagnose_connection`] found. Serializes as `{ok, target, backend, outcome,
/// latency_ms, message, advice, checked_at, steps}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionDiagnosis {
    /// Whether the outcome is [`ConnectionOutcome::Ok`] (a summary for JSON readers).
    pub ok: bool,
    /// The URL diagnosed, with its password replaced by `***`.
    pub target: String,
    /// The URL's scheme (`redis`, `postgres`, `sqlite`, ...).
    pub backend: String,
    /// The conclusion.
    pub outcome: ConnectionOutcome,
    /// How long the whole diagnosis took, serialized as milliseconds.
    #[serde(rename = "latency_ms", with = "crate::model::duration_ms")]
    pub latency: Duration,
    /// What happened, in a sentence, with the error when there is one.
    pub message: String,
    /// What to check next ([`ConnectionOutcome::advice`]).
    pub advice: String,
    /// When the diagnosis started.
    pub checked_at: DateTime<Utc>,
    /// The steps run, in order; the last one decided the outcome.
    pub steps: Vec<DiagnosisStep>,
}

impl ConnectionDiagnosis {
    /// Whether the backend could be reached and initialized.
    pub fn is_ok(&self) -> bool {
        self.outcome == ConnectionOutcome::Ok
    }
}

/// Finds out why `url` can or cannot be reached, within about `timeout` in all.
///
/// For a network backend it first resolves the host and opens a plain TCP connection
/// (telling apart [`DnsFailed`](ConnectionOutcome::DnsFailed),
/// [`Refused`](ConnectionOutcome::Refused) and
/// [`TimedOut`](ConnectionOutcome::TimedOut)). For `rediss://` it then sends a plain-text
/// `PING`: a plain Redis reply means the port does not speak TLS
/// ([`TlsFailed`](ConnectionOutcome::TlsFailed)), a case in which the TLS handshake would
/// only hang until the timeout. If all that works, it opens the backend with
/// [`open`] and runs `initialize()` and `health_check()`, and classifies their error:
/// refused credentials are [`AuthFailed`](ConnectionOutcome::AuthFailed), a connection
/// error about TLS, certificates or the handshake is
/// [`TlsFailed`](ConnectionOutcome::TlsFailed), a timeout is
/// [`TimedOut`](ConnectionOutcome::TimedOut). For `memory://` and SQLite it only
/// initializes. The backend is closed afterwards. For a cluster URL, the seed nodes are
/// tried in order and the first one that accepts a connection is used.
///
/// The report shows the URL and every message with the password replaced by `***`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use aiecs_storage::ops::diagnose::{diagnose_connection, ConnectionOutcome};
///
/// let report = diagnose_connection("sqlite::memory:", Duration::from_secs(2)).await;
/// assert_eq!(report.outcome, ConnectionOutcome::Ok);
///
/// // A port nothing listens on.
/// let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
/// let url = format!("postgres://app:s3cret@127.0.0.1:{port}/db");
/// let report = diagnose_connection(&url, Duration::from_secs(2)).await;
/// assert_eq!(report.outcome, ConnectionOutcome::Refused);
/// assert!(!serde_json::to_string(&report).unwrap().contains("s3cret"));
/// # }
/// ```
pub async fn diagnose_connection(url: &str, timeout: Duration) -> ConnectionDiagnosis {
    let checked_at = now();
    let started = Instant::now();
    let deadline = started + timeout;
    let mut steps = Vec::new();
    let (outcome, message) = run_connection(url, deadline, timeout, &mut steps).await;
    for step in &mut steps {
        step.detail = step.detail.take().map(|d| scrub(&d, url));
    }
    let report = ConnectionDiagnosis {
        ok: outcome == ConnectionOutcome::Ok,
        target: redact_url(url),
        backend: url.split_once(':').map_or("", |(s, _)| s).to_owned(),
        outcome,
        latency: started.elapsed(),
        message: scrub(&message, url),
        advice: outcome.advice().to_owned(),
        checked_at,
        steps,
    };
    if report.is_ok() {
        tracing::debug!(target_url = %report.target, outcome = outcome.as_str(), "storage connection diagnosis: ok");
    } else {
        tracing::warn!(
            target_url = %report.target,
            outcome = outcome.as_str(),
            message = %report.message,
            "storage connection diagnosis: {outcome}"
        );
    }
    report
}

async fn run_connection(
    url: &str,
    deadline: Instant,
    timeout: Duration,
    steps: &mut Vec<DiagnosisStep>,
) -> (ConnectionOutcome, String) {
    let left = || deadline.saturating_duration_since(Instant::now());
    let redacted = redact_url(url);

    let mut reached = None;
    if let Endpoint::Tcp(nodes) = endpoint(url) {
        let mut failures = Vec::new();
        for (host, port) in nodes {
            let started = Instant::now();
            let result = tcp_probe(host.clone(), port, left()).await;
            let latency = started.elapsed();
            match result {
                Ok(addr) => {
                    steps.push(step("tcp_connect", true, latency, Some(addr.to_string())));
                    reached = Some(addr);
                    break;
                }
                Err((outcome, detail)) => {
                    steps.push(step("tcp_connect", false, latency, Some(detail.clone())));
                    failures.push((outcome, detail));
                }
            }
        }
        if reached.is_none() {
            let all = failures
                .iter()
                .map(|(_, d)| d.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let outcome = failures
                .first()
                .map_or(ConnectionOutcome::Other, |(o, _)| *o);
            let message = match outcome {
                ConnectionOutcome::DnsFailed => {
                    format!("cannot resolve the host of {redacted}: {all}")
                }
                ConnectionOutcome::Refused => format!("connection to {redacted} refused: {all}"),
                ConnectionOutcome::TimedOut => {
                    format!("no TCP connection to {redacted} within {timeout:?}: {all}")
                }
                _ => format!("cannot connect to {redacted}: {all}"),
            };
            return (outcome, message);
        }
    }

    // TLS spoken to a plain Redis port gets no answer at all (the server waits for the
    // end of an inline command), so the handshake would only time out. A plain PING
    // tells the two apart: a RESP reply means the port does not speak TLS.
    if let (Some(addr), true) = (reached, url.starts_with("rediss")) {
        let started = Instant::now();
        let budget = (left() / 3).min(Duration::from_secs(1));
        let reply = plain_resp_reply(addr, budget).await;
        if reply.is_none() {
            steps.push(step(
                "plain_ping",
                true,
                started.elapsed(),
                Some("no plain-text Redis answer".into()),
            ));
        }
        if let Some(reply) = reply {
            steps.push(step(
                "plain_ping",
                false,
                started.elapsed(),
                Some(format!("answered without TLS: {reply}")),
            ));
            return (
                ConnectionOutcome::TlsFailed,
                format!(
                    "{redacted} ({addr}) answers in plain Redis, not TLS (a PING got `{reply}`): \
                     the TLS handshake cannot succeed on this port; use redis:// or the \
                     server's TLS port"
                ),
            );
        }
    }

    let started = Instant::now();
    let backend = match open(url) {
        Ok(backend) => {
            steps.push(step("open", true, started.elapsed(), None));
            backend
        }
        Err(e) => {
            steps.push(step("open", false, started.elapsed(), Some(e.to_string())));
            let outcome = match e {
                StorageError::InvalidInput { .. } => ConnectionOutcome::InvalidUrl,
                _ => ConnectionOutcome::Other,
            };
            return (outcome, format!("cannot open {redacted}: {e}"));
        }
    };

    let result = async {
        let started = Instant::now();
        let result = within(left(), "initialize", backend.initialize()).await;
        steps.push(step(
            "initialize",
            result.is_ok(),
            started.elapsed(),
            result.as_ref().err().map(|e| e.to_string()),
        ));
        result?;
        let started = Instant::now();
        let result = within(left(), "health_check", backend.health_check()).await;
        steps.push(step(
            "health_check",
            result.is_ok(),
            started.elapsed(),
            result.as_ref().err().map(|e| e.to_string()),
        ));
        result
    }
    .await;
    // Release connections; a close that hangs must not hang the diagnosis.
    let _ = tokio::time::timeout(Duration::from_secs(1), backend.close()).await;

    let via = reached.map(|a| format!(" ({a})")).unwrap_or_default();
    match result {
        Ok(report) => (
            ConnectionOutcome::Ok,
            format!(
                "reached {redacted}{via}: the {} backend initialized and reports itself {}",
                backend.kind(),
                serde_json::to_value(report.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => {
            let outcome = classify(&e);
            let message = match outcome {
                ConnectionOutcome::TimedOut if reached.is_some() => format!(
                    "{redacted}{via} accepted the TCP connection but the {} backend did not \
                     answer within {timeout:?}: {e}",
                    backend.kind()
                ),
                _ => format!("{redacted}{via}: {e}"),
            };
            (outcome, message)
        }
    }
}

fn step(name: &str, ok: bool, latency: Duration, detail: Option<String>) -> DiagnosisStep {
    DiagnosisStep {
        step: name.to_owned(),
        ok,
        latency,
        detail,
    }
}

/// The error's text with its whole source chain, lower-cased, for classification. URLs
/// are left out: backends name theirs in the message (`cannot connect to
/// postgres://...?sslmode=require: timed out`), and its words say nothing of the failure.
fn full_text(e: &StorageError) -> String {
    let mut text = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text.split_whitespace()
        .filter(|word| !word.contains("://"))
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn classify(e: &StorageError) -> ConnectionOutcome {
    const TLS: [&str; 9] = [
        "tls",
        "ssl",
        "certificate",
        "handshake",
        "x509",
        "unknownissuer",
        "corrupt message",
        "invalidcontenttype",
        "peer sent no certificates",
    ];
    match e {
        StorageError::Authentication { .. } => ConnectionOutcome::AuthFailed,
        StorageError::Timeout { .. } => ConnectionOutcome::TimedOut,
        StorageError::InvalidInput { .. } => ConnectionOutcome::InvalidUrl,
        StorageError::Connection { .. }
        | StorageError::Backend { .. }
        | StorageError::Unavailable { .. } => {
            let text = full_text(e);
            if TLS.iter().any(|w| text.contains(w)) {
                ConnectionOutcome::TlsFailed
            } else if text.contains("password") && text.contains("invalid")
                || text.contains("noauth")
                || text.contains("wrongpass")
                || text.contains("authentication")
            {
                ConnectionOutcome::AuthFailed
            } else if text.contains("refused") {
                ConnectionOutcome::Refused
            } else if text.contains("timed out") || text.contains("timeout") {
                ConnectionOutcome::TimedOut
            } else if text.contains("lookup") || text.contains("resolve") {
                ConnectionOutcome::DnsFailed
            } else {
                ConnectionOutcome::Other
            }
        }
        _ => ConnectionOutcome::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_kind_then_text() {
        let conn = |m: &str| StorageError::Connection {
            message: m.into(),
            source: None,
        };
        assert_eq!(
            classify(&StorageError::Authentication {
                message: "x".into()
            }),
            ConnectionOutcome::AuthFailed
        );
        assert_eq!(
            classify(&StorageError::Timeout {
                operation: "x",
                after: Duration::from_millis(1)
            }),
            ConnectionOutcome::TimedOut
        );
        assert_eq!(
            classify(&conn(
                "error performing TLS handshake: invalid peer certificate"
            )),
            ConnectionOutcome::TlsFailed
        );
        assert_eq!(
            classify(&conn("connection refused")),
            ConnectionOutcome::Refused
        );
        assert_eq!(classify(&conn("broken pipe")), ConnectionOutcome::Other);
        // A connection never made is `Unavailable`, classified by its text, not by the
        // URL it names.
        let unavailable = |m: &str| StorageError::Unavailable { message: m.into() };
        assert_eq!(
            classify(&unavailable(
                "cannot connect to redis at redis://:***@127.0.0.1:1: \
                 Connection refused (os error 111)"
            )),
            ConnectionOutcome::Refused
        );
        assert_eq!(
            classify(&unavailable(
                "cannot connect to postgres://u:***@h/db?sslmode=require: timed out after 1s"
            )),
            ConnectionOutcome::TimedOut
        );
        assert_eq!(
            classify(&unavailable(
                "cannot connect to redis at redis://h.invalid:6379: failed to lookup \
                 address information: Name or service not known"
            )),
            ConnectionOutcome::DnsFailed
        );
    }
}
