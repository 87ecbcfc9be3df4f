//! Opening one backend from a URL: the scheme is the type (the spec's StorageFactory).

use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::storage::StorageBackend;

/// Opens the backend a URL names; nothing connects until `initialize()` or the first
/// call.
///
/// | URL | backend |
/// | --- | --- |
/// | `memory://` | [`MemoryBackend`](crate::MemoryBackend) |
/// | `sqlite://path/to/file.db`, `sqlite:///abs/path.db`, `sqlite::memory:`; `?change_feed=off` turns its change feed off | [`SqliteBackend`](crate::SqliteBackend) (feature `sqlite`) |
/// | `redis://`, `rediss://`, `redis+cluster://h1:7000,h2:7001` | `RedisBackend` (feature `redis`) |
/// | `postgres://`, `postgresql://` | `PostgresBackend` (feature `postgres`) |
///
/// A scheme this build cannot open is [`StorageError::InvalidInput`] on `url`, naming
/// the feature to enable; the password never appears in the error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// let storage = aiecs_storage::open("sqlite::memory:")?;
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
pub fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    match scheme {
        "memory" => Ok(Arc::new(crate::MemoryBackend::new())),
        "sqlite" => sqlite(url),
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => redis(url),
        "postgres" | "postgresql" => postgres(url),
        _ => Err(StorageError::invalid_input(
            "url",
            format!(
                "unknown scheme `{scheme}`; expected memory://, sqlite://, redis://, \
                 rediss://, redis+cluster://, postgres://"
            ),
        )),
    }
}

#[cfg_attr(
    all(feature = "sqlite", feature = "redis", feature = "postgres"),
    allow(dead_code)
)]
fn missing_feature(feature: &str) -> StorageError {
    StorageError::invalid_input(
        "url",
        format!("this build cannot open it: enable the `{feature}` feature of aiecs-storage"),
    )
}

#[cfg(feature = "sqlite")]
fn sqlite(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    let (path, change_feed) = sqlite_query(rest)?;
    if path.is_empty() {
        return Err(StorageError::invalid_input(
            "url",
            "sqlite URL names no file; use sqlite://path/to/file.db or sqlite::memory:",
        ));
    }
    let backend = crate::SqliteBackend::new(path);
    Ok(Arc::new(match change_feed {
        Some(on) => backend.with_change_feed(on),
        None => backend,
    }))
}

/// Splits `?change_feed=on|off` off what follows `sqlite://`. Before it existed, a `?`
/// was part of the file name, and any `?` that does not start a query of known
/// parameters still is, so every path that opened a file opens it still.
#[cfg(feature = "sqlite")]
fn sqlite_query(rest: &str) -> Result<(&str, Option<bool>)> {
    let Some((path, query)) = rest.rsplit_once('?') else {
        return Ok((rest, None));
    };
    let mut change_feed = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("change_feed", value)) => {
                change_feed = Some(match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    other => {
                        return Err(StorageError::invalid_input(
                            "url",
                            format!("sqlite URL has change_feed `{other}`; expected on or off"),
                        ))
                    }
                })
            }
            _ => return Ok((rest, None)),
        }
    }
    Ok((path, change_feed))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("sqlite"))
}

#[cfg(feature = "redis")]
fn redis(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::RedisBackend::new(url)?))
}

#[cfg(not(feature = "redis"))]
fn redis(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("redis"))
}

#[cfg(feature = "postgres")]
fn postgres(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(crate::PostgresBackend::new(url)?))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature("postgres"))
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;

    #[test]
    fn a_sqlite_url_turns_the_change_feed_off_and_keeps_other_question_marks() {
        for (rest, path, feed) in [
            ("data.db", "data.db", None),
            ("data.db?change_feed=off", "data.db", Some(false)),
            ("data.db?change_feed=false", "data.db", Some(false)),
            ("/a/b.db?change_feed=on", "/a/b.db", Some(true)),
            (
                "d?x.db?change_feed=on&change_feed=off",
                "d?x.db",
                Some(false),
            ),
            // Not a query of known parameters: part of the file name, as always.
            ("what?.db", "what?.db", None),
            ("a.db?mode=ro", "a.db?mode=ro", None),
            (
                "a.db?change_feed=off&mode=ro",
                "a.db?change_feed=off&mode=ro",
                None,
            ),
            ("a.db?", "a.db?", None),
            (":memory:", ":memory:", None),
        ] {
            assert_eq!(sqlite_query(rest).unwrap(), (path, feed), "{rest}");
        }
        let err = sqlite_query("data.db?change_feed=maybe").unwrap_err();
        assert!(err.to_string().contains("change_feed `maybe`"), "{err}");
        assert!(open("sqlite://?change_feed=off").is_err());

        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("f.db").display());
        let off = open(&format!("{url}?change_feed=off")).unwrap();
        assert!(off.changes().is_none());
        assert_eq!(off.store_id(), open(&url).unwrap().store_id());
        assert!(open(&url).unwrap().changes().is_some());
    }
}
