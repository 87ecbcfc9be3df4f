//! The one error type of the crate.
//!
//! Every backend and layer returns [`StorageError`]. Retry and failover layers decide by
//! [`StorageError::kind`] and [`StorageError::is_transient`], never by message text, so a
//! new backend only has to map its native errors onto the right variant.

use std::time::Duration;

/// A boxed error kept as the source of a [`StorageError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, StorageError>`.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything that can go wrong in a storage call.
///
/// Messages never contain a password: backends strip credentials from URLs before they
/// build an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The caller passed a value the contract does not accept. `field` names the
    /// argument (for example `session_id` or `limit`); `reason` says what is wrong.
    #[error("invalid input for `{field}`: {reason}")]
    InvalidInput {
        /// The argument or field that was rejected.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The operation needs an entity that does not exist (for example adding a message
    /// to a session that was never created).
    #[error("{entity} `{id}` not found")]
    NotFound {
        /// What kind of entity: `session`, `thread`, ...
        entity: &'static str,
        /// The id that was looked up.
        id: String,
    },

    /// The connection broke while a call may have been on it (a reset, a broken pipe, an
    /// end of file while waiting for the reply), or the backend could not be reached and
    /// cannot tell whether the call was sent. Transient; the call may have applied. The
    /// Redis and PostgreSQL backends report a connection that was never made (refused,
    /// a name that does not resolve, a failed handshake) as
    /// [`StorageError::Unavailable`] instead.
    #[error("connection error: {message}")]
    Connection {
        /// What failed, without credentials.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// The server refused the credentials. Not transient: the same credentials fail
    /// again.
    #[error("authentication failed: {message}")]
    Authentication {
        /// Which server refused, without credentials.
        message: String,
    },

    /// The operation did not finish within its deadline. Transient.
    #[error("`{operation}` timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },

    /// A stored record could not be encoded or decoded. Not transient: retrying reads
    /// the same bytes again.
    #[error("serialization error: {message}")]
    Serialization {
        /// What could not be encoded or decoded.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// The backend was closed with `close()`; it accepts no further calls.
    #[error("storage backend is closed: no calls are accepted after close()")]
    Closed,

    /// The backend refuses work for now (a circuit breaker is open, a queue is full, the
    /// server is busy, no connection to the server could be made): the call was refused
    /// before it ran. Transient.
    #[error("storage unavailable: {message}")]
    Unavailable {
        /// Why the backend refused.
        message: String,
    },

    /// Any other error reported by the storage engine. `transient` is set by the
    /// backend that knows whether the same call may succeed later (a busy database)
    /// or not (a constraint violation, a corrupt file).
    #[error("backend error: {message}")]
    Backend {
        /// What the engine reported, without credentials.
        message: String,
        /// Whether retrying the same call may succeed.
        transient: bool,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

/// The kind of a [`StorageError`], without its payload: cheap to copy, compare and use as
/// a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`StorageError::InvalidInput`].
    InvalidInput,
    /// See [`StorageError::NotFound`].
    NotFound,
    /// See [`StorageError::Connection`].
    Connection,
    /// See [`StorageError::Authentication`].
    Authentication,
    /// See [`StorageError::Timeout`].
    Timeout,
    /// See [`StorageError::Serialization`].
    Serialization,
    /// See [`StorageError::Closed`].
    Closed,
    /// See [`StorageError::Unavailable`].
    Unavailable,
    /// See [`StorageError::Backend`].
    Backend,
}

impl ErrorKind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::InvalidInput,
        ErrorKind::NotFound,
        ErrorKind::Connection,
        ErrorKind::Authentication,
        ErrorKind::Timeout,
        ErrorKind::Serialization,
        ErrorKind::Closed,
        ErrorKind::Unavailable,
        ErrorKind::Backend,
    ];

    /// A stable snake_case name, suitable for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Connection => "connection",
            ErrorKind::Authentication => "authentication",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Closed => "closed",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Backend => "backend",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StorageError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::InvalidInput { .. } => ErrorKind::InvalidInput,
            StorageError::NotFound { .. } => ErrorKind::NotFound,
            StorageError::Connection { .. } => ErrorKind::Connection,
            StorageError::Authentication { .. } => ErrorKind::Authentication,
            StorageError::Timeout { .. } => ErrorKind::Timeout,
            StorageError::Serialization { .. } => ErrorKind::Serialization,
            StorageError::Closed => ErrorKind::Closed,
            StorageError::Unavailable { .. } => ErrorKind::Unavailable,
            StorageError::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// Whether the same call may succeed if tried again later.
    ///
    /// Connection failures, timeouts, unavailability and backend errors flagged
    /// transient are; bad input, missing entities, decoding failures and a closed
    /// backend are not.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Connection { .. }
            | StorageError::Timeout { .. }
            | StorageError::Unavailable { .. } => true,
            StorageError::Backend { transient, .. } => *transient,
            StorageError::InvalidInput { .. }
            | StorageError::NotFound { .. }
            | StorageError::Authentication { .. }
            | StorageError::Serialization { .. }
            | StorageError::Closed => false,
        }
    }

    /// Whether the failed call may have been applied all the same: after a timeout, a
    /// broken connection or a transient backend error the store may go on and apply a
    /// write (its outcome is unknown); [`StorageError::Unavailable`] means the call was
    /// refused before it ran, and permanent errors mean it was not applied. Layers use
    /// this to decide what may be repeated: a counter increment whose first try may have
    /// applied is never sent again.
    pub fn may_have_applied(&self) -> bool {
        self.is_transient() && !matches!(self, StorageError::Unavailable { .. })
    }

    /// An [`StorageError::InvalidInput`] for `field`.
    pub fn invalid_input(field: &'static str, reason: impl Into<String>) -> Self {
        StorageError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// A [`StorageError::NotFound`] for an entity and id.
    pub fn not_found(entity: &'static str, id: impl Into<String>) -> Self {
        StorageError::NotFound {
            entity,
            id: id.into(),
        }
    }

    /// A [`StorageError::Serialization`] with its source.
    pub fn serialization(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StorageError::Serialization {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A [`StorageError::Backend`] with its source.
    pub fn backend(
        message: impl Into<String>,
        transient: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        StorageError::Backend {
            message: message.into(),
            transient,
            source: Some(source.into()),
        }
    }
}

impl StorageError {
    /// A copy of this error for a second caller (one failed batch or shared load
    /// answers several callers): the same variant, fields and transience; the source
    /// chain is kept as its text, since a boxed source cannot be cloned.
    pub fn duplicate(&self) -> StorageError {
        let source = |source: &Option<BoxError>| -> Option<BoxError> {
            let first = source.as_deref()?;
            let mut chain = vec![first.to_string()];
            let mut next = first.source();
            while let Some(s) = next {
                chain.push(s.to_string());
                next = s.source();
            }
            Some(chain.join(": ").into())
        };
        match self {
            StorageError::InvalidInput { field, reason } => StorageError::InvalidInput {
                field,
                reason: reason.clone(),
            },
            StorageError::NotFound { entity, id } => StorageError::NotFound {
                entity,
                id: id.clone(),
            },
            StorageError::Connection { message, source: s } => StorageError::Connection {
                message: message.clone(),
                source: source(s),
            },
            StorageError::Authentication { message } => StorageError::Authentication {
                message: message.clone(),
            },
            StorageError::Timeout { operation, after } => StorageError::Timeout {
                operation,
                after: *after,
            },
            StorageError::Serialization { message, source: s } => StorageError::Serialization {
                message: message.clone(),
                source: source(s),
            },
            StorageError::Closed => StorageError::Closed,
            StorageError::Unavailable { message } => StorageError::Unavailable {
                message: message.clone(),
            },
            StorageError::Backend {
                message,
                transient,
                source: s,
            } => StorageError::Backend {
                message: message.clone(),
                transient: *transient,
                source: source(s),
            },
        }
    }
}

impl From<serde_json::Error> for StorageError {
    fn from(err: serde_json::Error) -> Self {
        StorageError::serialization("invalid JSON", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn duplicate_of_every_kind_is_equal_in_kind_text_transience_and_source() {
        let errors = [
            StorageError::invalid_input("role", "bad"),
            StorageError::not_found("session", "s1"),
            StorageError::Connection {
                message: "refused".into(),
                source: Some("io: reset".into()),
            },
            StorageError::Timeout {
                operation: "x",
                after: Duration::from_millis(3),
            },
            StorageError::Closed,
            StorageError::Backend {
                message: "busy".into(),
                transient: true,
                source: None,
            },
            StorageError::Backend {
                message: "constraint".into(),
                transient: false,
                source: None,
            },
        ];
        for e in &errors {
            let copy = StorageError::duplicate(e);
            assert_eq!(copy.kind(), e.kind());
            assert_eq!(copy.to_string(), e.to_string());
            assert_eq!(copy.is_transient(), e.is_transient());
            assert_eq!(
                copy.source().map(|s| s.to_string()),
                e.source().map(|s| s.to_string())
            );
        }
    }

    #[test]
    fn duplicate_keeps_kind_text_transience_and_source_text() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = StorageError::Connection {
            message: "redis at x".into(),
            source: Some(Box::new(inner)),
        };
        let d = e.duplicate();
        assert_eq!(d.kind(), e.kind());
        assert_eq!(d.to_string(), e.to_string());
        assert_eq!(d.is_transient(), e.is_transient());
        assert_eq!(
            std::error::Error::source(&d).map(|s| s.to_string()),
            Some("reset by peer".to_owned())
        );
        let b = StorageError::backend("busy", true, std::io::Error::other("x")).duplicate();
        assert!(b.is_transient());
    }

    #[test]
    fn transient_kinds() {
        assert!(StorageError::Unavailable {
            message: "x".into()
        }
        .is_transient());
        assert!(!StorageError::Closed.is_transient());
        assert!(!StorageError::invalid_input("limit", "must be > 0").is_transient());
        let e = StorageError::invalid_input("limit", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid input for `limit`: must be at least 1"
        );
        assert_eq!(e.kind().as_str(), "invalid_input");
    }
}
