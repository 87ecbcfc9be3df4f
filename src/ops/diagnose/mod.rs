//! Diagnostics: why a backend cannot be reached, and whether what it stores reads back
//! unchanged (the spec's `diagnose_connection_issue` and `diagnose_data_consistency`).
//!
//! - [`diagnose_connection`] tells apart a refused connection, a timeout, a name that
//!   does not resolve, refused credentials and a failed TLS handshake.
//! - [`diagnose_consistency`] writes a session, a message, a checkpoint with a pending
//!   write and a task context, reads each back, compares, and cleans up after itself.
//! - [`diagnose_layers`] reads the figures of a stack's layers and reports what needs
//!   an operator: a failover journal holding writes the primary has not got.
//!
//! Each returns a serializable report and never fails; none shows a password.

use std::future::Future;
use std::time::Duration;

use crate::error::{Result, StorageError};

mod checks;
mod connection;
mod consistency;
mod endpoint;
mod layers;

pub use connection::{diagnose_connection, ConnectionDiagnosis, ConnectionOutcome, DiagnosisStep};
pub use consistency::{
    diagnose_consistency, diagnose_consistency_within, CheckOutcome, ConsistencyCheck,
    ConsistencyDiagnosis,
};
pub use layers::{diagnose_layers, Finding, LayerDiagnosis};
pub(crate) use layers::{journal_finding, side_name};

/// The prefix of the session and thread ids [`diagnose_consistency`] writes.
pub const DIAGNOSE_PREFIX: &str = "aiecs-diagnose-";

/// The user id of the sessions [`diagnose_consistency`] writes.
pub const DIAGNOSE_USER: &str = "aiecs-diagnose";

/// Runs `call`, a [`StorageError::Timeout`] naming `operation` after `timeout`.
async fn within<T>(
    timeout: Duration,
    operation: &'static str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(StorageError::Timeout {
            operation,
            after: timeout,
        }),
    }
}
