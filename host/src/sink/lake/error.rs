//! What goes wrong in the lake, and whether trying again can help: storage that is
//! unreachable or busy, I/O and commit races are transient; bad data, bad schemas and
//! denied access are definite. Classified from deltalake's and object_store's typed
//! errors, never from their text.

use deltalake::DeltaTableError;
use deltalake::kernel::transaction::TransactionError;

use super::arrow;
use crate::sink::SinkError;

/// What went wrong in the lake, before it is classified for the sink contract.
#[derive(Debug, thiserror::Error)]
pub(super) enum LakeError {
    #[error("table {table}: {action} failed: {source}")]
    Delta {
        table: String,
        action: &'static str,
        #[source]
        source: DeltaTableError,
    },
    #[error("table {table}: {source}")]
    Convert {
        table: String,
        #[source]
        source: arrow::ConvertError,
    },
    #[error("the compaction lock: {0}")]
    Lock(#[source] object_store::Error),
    #[error(
        "another compaction holds the lock {path} ({holder}); wait for it, or delete the lock object if no compactor is running"
    )]
    Locked { path: String, holder: String },
    #[error(
        "table {table}: its directory {dir} holds the Delta table {holds}; nothing is written there (does the store compare names without case?)"
    )]
    Occupied {
        table: String,
        dir: String,
        holds: String,
    },
    #[error("table {table}: compaction refused: {message}")]
    Compaction { table: String, message: String },
    #[cfg(test)]
    #[error("injected crash: {0}")]
    Crash(&'static str),
}

impl LakeError {
    pub(super) fn delta<'a>(
        table: &'a str,
        action: &'static str,
    ) -> impl FnOnce(DeltaTableError) -> LakeError + 'a {
        move |source| LakeError::Delta {
            table: table.to_owned(),
            action,
            source,
        }
    }

    pub(super) fn convert(table: &str) -> impl FnOnce(arrow::ConvertError) -> LakeError + '_ {
        move |source| LakeError::Convert {
            table: table.to_owned(),
            source,
        }
    }

    pub(super) fn lock(source: object_store::Error) -> LakeError {
        LakeError::Lock(source)
    }

    pub(super) fn into_sink_error(self, sink: &str) -> SinkError {
        let transient = match &self {
            LakeError::Delta { source, .. } => is_transient(source),
            LakeError::Lock(source) => object_store_transient(source),
            LakeError::Locked { .. } => true,
            LakeError::Convert { .. }
            | LakeError::Compaction { .. }
            | LakeError::Occupied { .. } => false,
            #[cfg(test)]
            LakeError::Crash(_) => true,
        };
        let message = match &self {
            LakeError::Delta { source, .. } if transient => {
                format!(
                    "{self} (will retry; check that the lake is reachable: {})",
                    root_cause(source)
                )
            }
            _ => self.to_string(),
        };
        let sink = sink.to_owned();
        if transient {
            SinkError::Transient { sink, message }
        } else {
            SinkError::Definite { sink, message }
        }
    }
}

pub(super) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Whether a Delta error is worth retrying: storage unreachable or busy, I/O, or a race
/// with another commit. Bad data, bad schemas and denied access are definite.
pub(super) fn is_transient(error: &DeltaTableError) -> bool {
    match error {
        DeltaTableError::Io { .. } | DeltaTableError::VersionAlreadyExists(_) => return true,
        DeltaTableError::Transaction { source } => match source {
            TransactionError::VersionAlreadyExists(_)
            | TransactionError::MaxCommitAttempts(_)
            | TransactionError::LogStoreError { .. } => return true,
            TransactionError::ObjectStore { source } => return object_store_transient(source),
            _ => return false,
        },
        _ => {}
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(store) = error.downcast_ref::<object_store::Error>() {
            return object_store_transient(store);
        }
        if error.is::<std::io::Error>() {
            return true;
        }
        cause = error.source();
    }
    false
}

pub(super) fn object_store_transient(error: &object_store::Error) -> bool {
    !matches!(
        error,
        object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}
