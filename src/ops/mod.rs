//! Operations on a whole backend: the library side of the `aiecs-storage` command line.
//!
//! - [`health`]: [`HealthChecker`], the spec's `StorageHealthChecker`.

pub mod health;

pub use health::{CheckResult, HealthCheckReport, HealthChecker, HealthChecks};
