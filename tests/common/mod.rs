//! Helpers shared by the test targets that talk to real servers.

/// The URL of a test server from `var`. Unset: prints a notice and returns `None` so the
/// test passes as skipped, unless `CI=true`, where a missing server must fail the run.
#[allow(dead_code)]
pub fn server_url(var: &str, target: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} is unset under CI=true: the {target} tests need their server")
        }
        _ => {
            eprintln!("skipping {target} test: {var} is unset");
            None
        }
    }
}

/// A name no other test run uses, for a key prefix or a schema.
#[allow(dead_code)]
pub fn unique_name(kind: &str) -> String {
    format!("aiecs_test_{kind}_{}", uuid::Uuid::now_v7().simple())
}

/// The ids of the first page (up to 10 000) of `storage`'s sessions, unfiltered.
#[allow(dead_code)]
pub async fn listed_session_ids(
    storage: &dyn aiecs_storage::StorageBackend,
) -> std::collections::BTreeSet<String> {
    let query = aiecs_storage::SessionQuery::new().limit(10_000);
    storage
        .list_sessions(&query)
        .await
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect()
}

pub mod capture;
#[allow(dead_code)]
pub mod coherence;
pub mod fault;
#[cfg(feature = "postgres")]
#[allow(dead_code)]
pub mod pg;
#[allow(dead_code)]
pub mod proxy;
