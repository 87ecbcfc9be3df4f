//! Operations on a whole backend: the library side of the `aiecs-storage` command line.
//!
//! - [`health`]: [`HealthChecker`], the spec's `StorageHealthChecker`.
//! - [`diagnose`]: [`diagnose_connection`] and [`diagnose_consistency`], the spec's
//!   `diagnose_connection_issue` and `diagnose_data_consistency`, and
//!   [`diagnose_layers`].
//! - [`cleanup`]: [`run_cleanup`] once, or [`CleanupTask`] on an interval.
//! - [`migrate`]: [`Migrator`], the spec's `StorageMigrator`, and [`verify`].
//! - [`transfer`]: [`export`] and [`import`] as JSON lines, on the streaming path the
//!   migrator uses.

pub mod cleanup;
pub mod diagnose;
pub mod health;
pub mod migrate;
pub mod transfer;

pub use cleanup::{run_cleanup, CleanupStats, CleanupTask};
pub use diagnose::{
    diagnose_connection, diagnose_consistency, diagnose_consistency_within, diagnose_layers,
    CheckOutcome, ConnectionDiagnosis, ConnectionOutcome, ConsistencyCheck, ConsistencyDiagnosis,
    DiagnosisStep, Finding, LayerDiagnosis,
};
pub use health::{CheckResult, HealthCheckReport, HealthChecker, HealthChecks};
pub use migrate::{
    verify, verify_scope, MigrateOptions, MigrationReport, Migrator, Progress, VerifyReport,
};
pub use transfer::{
    check_export, export, import, import_stream, Record, Scope, TransferCounts, TransferOptions,
};
