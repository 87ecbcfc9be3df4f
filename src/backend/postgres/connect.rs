//! Connection settings of the PostgreSQL backend: URL parsing, password redaction, TLS,
//! and the mapping of driver and pool errors onto [`StorageError`].
//!
//! The password is kept only inside the `tokio_postgres::Config` handed to the pool; every
//! message, `Debug` output and health report uses [`ConnectOptions::redacted`], the URL
//! with the password replaced by `***`.

use std::error::Error as _;
use std::time::Duration;

use deadpool_postgres::{PoolError, TimeoutType};
use tokio_postgres::config::SslMode as PgSslMode;

use crate::error::{Result, StorageError};

/// How the connection is protected, from the URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    /// `disable`: plain TCP.
    Disable,
    /// `prefer` (the default): plain TCP. TLS is only used when required, because a
    /// failed certificate check must not silently fall back to plain text.
    Prefer,
    /// `require`: TLS with rustls, the server certificate verified against the webpki
    /// (Mozilla) roots and the host name.
    Require,
}

impl SslMode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
        }
    }
}

/// What [`parse_url`] makes of a connection URL.
#[derive(Clone)]
pub(super) struct ConnectOptions {
    /// The driver's configuration, password included. Never printed.
    pub config: tokio_postgres::Config,
    /// The TLS mode.
    pub ssl_mode: SslMode,
    /// The URL with its password replaced by `***`: the only form ever shown.
    pub redacted: String,
    /// The host, for reports.
    pub host: String,
    /// The database name, for reports.
    pub dbname: String,
    /// The schema the URL names with `?schema=`, if any.
    pub schema: Option<String>,
    /// Whether the URL turns the change feed on or off with `?change_feed=`, if it does.
    pub change_feed: Option<bool>,
}

/// The `application_name` set when the URL gives none: shows the pool's connections
/// in `pg_stat_activity`.
pub(super) const DEFAULT_APPLICATION_NAME: &str = "aiecs-storage";

/// Default for the time allowed to open one connection.
pub(super) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn bad_url(reason: impl Into<String>) -> StorageError {
    StorageError::invalid_input("url", reason)
}

/// Decodes `%XX` escapes (the URL crate leaves user, password and path encoded).
fn percent_decode(input: &str) -> Option<Vec<u8>> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn decoded_text(what: &str, raw: &str) -> Result<String> {
    percent_decode(raw)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad_url(format!("has an invalid percent-encoded {what}")))
}

/// Parses a `postgres://` or `postgresql://` URL:
/// `postgres://user:password@host:port/dbname?sslmode=require&application_name=x`.
///
/// Query parameters understood: `sslmode` (`disable`, `prefer`, `require`),
/// `application_name`, `connect_timeout` (seconds), `host` (a host name or a
/// Unix-socket directory, overriding the URL's host), `schema` (where the tables
/// live, as [`PostgresBackend::with_schema`](super::PostgresBackend::with_schema)) and
/// `change_feed` (`on` or `off`, as
/// [`PostgresBackend::with_change_feed`](super::PostgresBackend::with_change_feed)). Any
/// other parameter is refused, so a typo is not silently ignored. No error message contains the password.
pub(super) fn parse_url(input: &str) -> Result<ConnectOptions> {
    // A raw `?`, `#` or `/` in the password makes the URL parser split it into host,
    // port, query or fragment: the connection would go elsewhere and a piece of the
    // password could show up in a message about that piece.
    if let Some((_, rest)) = input.split_once("://") {
        if let Some(at) = rest.rfind('@') {
            if let Some((_, password)) = rest[..at].split_once(':') {
                if password.contains(['?', '#', '/']) {
                    return Err(bad_url(
                        "has a raw `?`, `#` or `/` in its password; percent-encode it \
                         (%3F, %23, %2F)",
                    ));
                }
            }
        }
    }
    // url's parse errors describe the problem without echoing the input.
    let url = url::Url::parse(input).map_err(|e| bad_url(format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad_url(format!(
            "has scheme `{}`; expected `postgres://` or `postgresql://`",
            url.scheme()
        )));
    }
    // From the raw text, not the parsed URL: a raw `?` or `#` in the password makes the
    // parser see a query or fragment, and it would keep the password visible there.
    let redacted = crate::redact::redact_url(input);

    let mut config = tokio_postgres::Config::new();
    let user = decoded_text("user name", url.username())?;
    config.user(if user.is_empty() { "postgres" } else { &user });
    if let Some(password) = url.password() {
        let password = percent_decode(password)
            .ok_or_else(|| bad_url("has an invalid percent-encoded password"))?;
        config.password(password);
    }
    let mut host = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    config.port(url.port().unwrap_or(5432));
    let dbname = decoded_text("database name", url.path().trim_start_matches('/'))?;
    if dbname.contains('/') {
        return Err(bad_url("has a path with more than one segment"));
    }
    if !dbname.is_empty() {
        config.dbname(&dbname);
    }

    let mut ssl_mode = SslMode::Prefer;
    let mut application_name = None;
    let mut schema = None;
    let mut change_feed = None;
    config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "sslmode" => {
                ssl_mode = match value.as_ref() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    other => {
                        return Err(bad_url(format!(
                            "has sslmode `{other}`; expected disable, prefer or require"
                        )))
                    }
                }
            }
            "application_name" => application_name = Some(value.into_owned()),
            "connect_timeout" => {
                let secs: u64 = value.parse().map_err(|_| {
                    bad_url("has a connect_timeout that is not a whole number of seconds")
                })?;
                if secs > 0 {
                    config.connect_timeout(Duration::from_secs(secs));
                }
            }
            "host" => host = value.into_owned(),
            "schema" => schema = Some(value.into_owned()),
            "change_feed" => {
                change_feed = Some(match value.as_ref() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    other => {
                        return Err(bad_url(format!(
                            "has change_feed `{other}`; expected on or off"
                        )))
                    }
                })
            }
            // Only the key: the value may be a secret (for example `password=`).
            other => {
                return Err(bad_url(format!(
                    "has unsupported parameter `{other}`; supported: sslmode, \
                     application_name, connect_timeout, host, schema, change_feed"
                )))
            }
        }
    }
    config.host(&host);
    config.application_name(
        application_name
            .as_deref()
            .unwrap_or(DEFAULT_APPLICATION_NAME),
    );
    config.ssl_mode(match ssl_mode {
        SslMode::Require => PgSslMode::Require,
        SslMode::Disable | SslMode::Prefer => PgSslMode::Disable,
    });
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default()
        .to_owned();
    Ok(ConnectOptions {
        config,
        ssl_mode,
        redacted,
        host,
        dbname,
        schema,
        change_feed,
    })
}

/// The rustls connector used for `sslmode=require`: the process-wide crypto provider
/// (ring, installed as the Redis backend does unless the application chose one) and the
/// webpki roots.
pub(super) fn rustls_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
    crate::backend::tls::install_crypto_provider();
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// A short description of a driver error: its kind and, for server errors, the server's
/// message and SQLSTATE; for others, the underlying cause. Never includes the password:
/// neither the driver nor the server puts it in an error.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Maps a driver error onto the crate's kinds. `target` is the redacted URL.
///
/// - Authentication refused (28000, 28P01): `Authentication` (not transient).
/// - No such database (3D000): `Backend`, not transient: waiting will not create it.
/// - Connection-level SQLSTATEs (class 08, 57P01..57P03 shutdown, 53300 too many
///   connections), a closed connection, I/O and TLS failures: `Connection` (transient),
///   since the statement may have been sent; [`connect_error`] makes them `Unavailable`
///   when they come while opening a connection.
/// - Serialization failure (40001), deadlock (40P01), lock timeout (55P03), statement
///   cancelled (57014) and out of resources (class 53): `Backend`, transient.
/// - A stored value that does not decode: `Serialization`.
/// - Anything else (constraint violations, bad SQL): `Backend`, not transient.
pub(super) fn pg_error(e: tokio_postgres::Error, target: &str) -> StorageError {
    let text = describe(&e);
    if let Some(code) = e.code().map(|c| c.code().to_owned()) {
        if code == "28000" || code == "28P01" {
            return StorageError::Authentication {
                message: format!("{target} refused the credentials: {text}"),
            };
        }
        // (is a connection error, is transient, message)
        let (connection, transient, message) = match code.as_str() {
            "3D000" => (
                false,
                false,
                format!("database does not exist at {target}: {text}"),
            ),
            "53300" => (
                true,
                true,
                format!("too many connections to {target}: {text}"),
            ),
            "57P01" | "57P02" | "57P03" => (
                true,
                true,
                format!("server at {target} is shutting down or starting: {text}"),
            ),
            c if c.starts_with("08") => {
                (true, true, format!("connection to {target} failed: {text}"))
            }
            "40001" | "40P01" | "55P03" | "57014" => (false, true, format!("postgres: {text}")),
            c if c.starts_with("53") => (false, true, format!("postgres: {text}")),
            _ => (false, false, format!("postgres: {text}")),
        };
        return if connection {
            StorageError::Connection {
                message,
                source: Some(Box::new(e)),
            }
        } else {
            StorageError::backend(message, transient, e)
        };
    }
    let cause = e.source();
    let is_io = cause.is_some_and(|c| c.is::<std::io::Error>());
    let is_decode = cause.is_some_and(|c| {
        c.is::<serde_json::Error>()
            || c.is::<tokio_postgres::types::WasNull>()
            || c.is::<tokio_postgres::types::WrongType>()
    });
    if is_decode {
        return StorageError::serialization(format!("stored record does not decode: {text}"), e);
    }
    if e.is_closed() || is_io || text.starts_with("error performing TLS handshake") {
        return StorageError::Connection {
            message: format!("connection to {target} failed: {text}"),
            source: Some(Box::new(e)),
        };
    }
    StorageError::backend(format!("postgres: {text}"), false, e)
}

/// Maps an error of opening a connection. No statement was sent on it, so whatever may
/// pass later is [`StorageError::Unavailable`], naming the target: a refused or failed
/// TCP connection, a name that does not resolve, a failed TLS handshake, a server
/// answering that it is starting, shutting down or out of connection slots. What will
/// not pass keeps its kind, as [`pg_error`] maps it: refused credentials
/// (`Authentication`), a database that does not exist (`Backend`, not transient).
pub(super) fn connect_error(e: tokio_postgres::Error, target: &str) -> StorageError {
    let text = describe(&e);
    let mapped = if e.code().is_some() {
        pg_error(e, target)
    } else {
        // Never a server's answer: the connection, the TLS handshake or the startup
        // exchange failed.
        return StorageError::Unavailable {
            message: format!("cannot connect to {target}: {text}"),
        };
    };
    if mapped.is_transient() {
        StorageError::Unavailable {
            message: format!("cannot connect to {target}: {text}"),
        }
    } else {
        mapped
    }
}

/// The timeouts a pool error may refer to, for its message.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolLimits {
    pub max_size: usize,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Maps an error of taking a connection from the pool. The caller's statement is not
/// sent yet, so every failure that may pass later is [`StorageError::Unavailable`].
pub(super) fn pool_error(e: PoolError, target: &str, limits: PoolLimits) -> StorageError {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => StorageError::Unavailable {
            message: format!(
                "all {} connections to {target} stayed busy for {:?}",
                limits.max_size, limits.acquire_timeout
            ),
        },
        PoolError::Timeout(TimeoutType::Create) => StorageError::Unavailable {
            message: format!(
                "cannot connect to {target}: timed out after {:?}",
                limits.connect_timeout
            ),
        },
        PoolError::Timeout(TimeoutType::Recycle) => StorageError::Unavailable {
            message: format!(
                "checking a pooled connection to {target} timed out after {:?}",
                limits.connect_timeout
            ),
        },
        PoolError::Backend(e) => connect_error(e, target),
        PoolError::Closed => StorageError::Closed,
        PoolError::NoRuntimeSpecified => StorageError::Backend {
            message: "connection pool has no runtime".into(),
            transient: false,
            source: None,
        },
        PoolError::PostCreateHook(e) => StorageError::Unavailable {
            message: format!("could not set up a connection to {target}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<ConnectOptions>) -> &'static str {
        match r {
            Err(StorageError::InvalidInput { field, .. }) => field,
            Err(other) => panic!("expected InvalidInput, got {other:?}"),
            Ok(o) => panic!("expected InvalidInput, got a config for {}", o.redacted),
        }
    }

    fn limits() -> PoolLimits {
        PoolLimits {
            max_size: 3,
            acquire_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// Taking a connection from the pool comes before any statement: every failure that
    /// may pass later is `Unavailable`, naming the target.
    #[test]
    fn pool_failures_before_any_statement_are_unavailable() {
        let target = "postgres://app:***@db/x";
        for e in [
            PoolError::Timeout(TimeoutType::Wait),
            PoolError::Timeout(TimeoutType::Create),
            PoolError::Timeout(TimeoutType::Recycle),
        ] {
            let e = pool_error(e, target, limits());
            assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
            assert!(!e.may_have_applied() && e.is_transient());
            assert!(e.to_string().contains(target), "{e}");
        }
        let e = pool_error(PoolError::Timeout(TimeoutType::Create), target, limits());
        assert_eq!(
            e.to_string(),
            "storage unavailable: cannot connect to postgres://app:***@db/x: timed out after 2s"
        );
        assert!(matches!(
            pool_error(PoolError::Closed, target, limits()),
            StorageError::Closed
        ));
    }

    #[test]
    fn change_feed_is_on_or_off() {
        let feed = |q: &str| parse_url(&format!("postgres://db/x{q}")).map(|o| o.change_feed);
        assert_eq!(feed("").unwrap(), None);
        for (q, want) in [
            ("on", true),
            ("true", true),
            ("off", false),
            ("false", false),
        ] {
            assert_eq!(
                feed(&format!("?change_feed={q}")).unwrap(),
                Some(want),
                "{q}"
            );
        }
        assert_eq!(field(parse_url("postgres://db/x?change_feed=no")), "url");
    }

    #[test]
    fn parses_the_parts_of_a_url() {
        let o = parse_url(
            "postgresql://app:p%40ss%2Fw0rd@db.example.com:6543/agents?sslmode=require\
             &application_name=worker&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(o.config.get_user(), Some("app"));
        assert_eq!(o.config.get_password(), Some(&b"p@ss/w0rd"[..]));
        assert_eq!(o.config.get_dbname(), Some("agents"));
        assert_eq!(o.config.get_ports(), &[6543]);
        assert_eq!(o.config.get_application_name(), Some("worker"));
        assert_eq!(
            o.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert_eq!(o.ssl_mode, SslMode::Require);
        assert_eq!(o.host, "db.example.com");
        assert_eq!(o.dbname, "agents");
        assert_eq!(
            o.redacted,
            "postgresql://app:***@db.example.com:6543/agents?sslmode=require\
             &application_name=worker&connect_timeout=3"
        );
    }

    #[test]
    fn defaults() {
        let o = parse_url("postgres://127.0.0.1/test").unwrap();
        assert_eq!(o.config.get_user(), Some("postgres"));
        assert_eq!(o.config.get_password(), None);
        assert_eq!(o.config.get_ports(), &[5432]);
        assert_eq!(
            o.config.get_application_name(),
            Some(DEFAULT_APPLICATION_NAME)
        );
        assert_eq!(o.ssl_mode, SslMode::Prefer);
        assert_eq!(o.redacted, "postgres://127.0.0.1/test");
        let o = parse_url("postgres://u@[::1]:5433/d?sslmode=disable").unwrap();
        assert_eq!(o.host, "::1");
        assert_eq!(o.ssl_mode, SslMode::Disable);
    }

    #[test]
    fn bad_urls_name_the_url_and_hide_the_password() {
        for bad in [
            "mysql://u:s3cr3t@h/db",
            "postgres://u:s3cr3t@h/db?sslmode=verify-full",
            "postgres://u:s3cr3t@h/db?password=s3cr3t",
            "postgres://u:s3cr3t@h/db?connect_timeout=soon",
            "postgres://u:s3cr3t@h:99999/db",
            "postgres://u:s3cr3t@h/a/b",
            "not a url s3cr3t",
            "postgres://u:s3cr3t?x@h/db",
            "postgres://u:1234?s3cr3t@h/db",
            "postgres://u:x#s3cr3t@h/db",
        ] {
            let e = parse_url(bad).err().expect(bad);
            assert!(!format!("{e}{e:?}").contains("s3cr3t"), "{bad}: {e}");
            assert_eq!(field(Err(e)), "url");
        }
    }
}
