//! Why the main job stopped: each cause names the part and says what to do.

use crate::pipeline::runtime::RuntimeError;
use crate::sink::SinkError;
use crate::source::SourceError;

/// Why the main job stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the plugin folder could not be loaded: {0}")]
    Plugins(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the policy stopped the run: {0}; nothing of the transaction left airlock")]
    Policy(#[from] crate::policy::GateError),
    #[error("admin API: cannot listen on {addr}: {error} (set [admin] listen to a free address)")]
    Admin { addr: String, error: std::io::Error },
    #[error(
        "{part} panicked: {message} (see the log above); nothing it had not made durable was acknowledged"
    )]
    Panicked { part: String, message: String },
    #[error("{0}")]
    Internal(String),
}
