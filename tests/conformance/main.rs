//! The conformance suite: one set of cases, run against every backend and stack.
//!
//! Layout:
//! - `cases/` holds the cases, one module per concern (sessions, conversation,
//!   checkpoints, ...). Each case is a `pub async fn case(b: Arc<dyn StorageBackend>)`
//!   that panics when the backend breaks the contract of `src/storage.rs`. A case must
//!   be able to fail: it pins behaviour a wrong backend would get wrong.
//! - `cases/mod.rs` also holds `all_cases!`, the one list naming every case. A case
//!   missing from it is dead code and fails `clippy -D warnings`, so none is forgotten.
//! - `targets.rs` builds a fresh, initialized backend per test ([`targets::Target`]).
//! - Below, `target!(name)` makes `mod name` with one `#[tokio::test]` per case, so
//!   `cargo test --test conformance -- --list` shows `<target>::<case>` and every
//!   target runs exactly the same cases.
//!
//! Adding a target: write `pub async fn name() -> Target` in `targets.rs` and add one
//! `target!(name);` line below (with a `#[cfg(feature = ...)]` if it needs a feature).
//! Adding a case: write the function in its module and add its path to `all_cases!`.

#[macro_use]
mod cases;
#[path = "../common/mod.rs"]
mod common;
mod targets;

/// Expands to one test per case for `$target`; the test is named after the bare case so
/// that the listed name is `<target>::<case>`.
macro_rules! case_tests {
    ($target:ident; $($module:ident :: $case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                // `None`: a server target whose URL is unset (a notice was printed).
                let Some(t) = crate::targets::$target().await else { return };
                crate::cases::$module::$case(t.backend.clone()).await;
                t.finish().await;
            }
        )*
    };
}

/// `target!(name)` instantiates every case of `all_cases!` in `mod name`, building the
/// backend with `targets::name()`.
macro_rules! target {
    ($target:ident) => {
        mod $target {
            all_cases!(case_tests!($target));
        }
    };
}

target!(memory);
#[cfg(feature = "sqlite")]
target!(sqlite);
#[cfg(feature = "sqlite")]
target!(sqlite_memory);
#[cfg(feature = "redis")]
target!(redis);
#[cfg(feature = "redis")]
target!(redis_cluster);
#[cfg(feature = "postgres")]
target!(postgres);
#[cfg(feature = "sqlite")]
target!(stack_retry_timeout_sqlite);
#[cfg(feature = "sqlite")]
target!(stack_timeout_failover_memory_sqlite);
target!(stack_batch_memory);
target!(stack_cache_memory);
#[cfg(feature = "sqlite")]
target!(stack_cache_retry_timeout_sqlite);
target!(stack_batch_cache_memory);
#[cfg(feature = "sqlite")]
target!(stack_cache_retry_batch_sqlite);
#[cfg(feature = "sqlite")]
target!(stack_cache_failover_memory_sqlite);
#[cfg(feature = "sqlite")]
target!(stack_failover_cache_memory_sqlite);
