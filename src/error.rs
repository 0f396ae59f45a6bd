//! The library's error type. Every message names the file, key or line at fault, what was
//! expected, and how to fix it.

use std::path::PathBuf;

/// Errors returned by the wick library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run configuration is invalid. The message already names the file and key.
    #[error("{0}")]
    Config(String),

    /// A data file is missing, malformed or inconsistent with the configuration.
    #[error("{0}")]
    Data(String),

    /// A checkpoint or run directory is missing, torn or inconsistent.
    #[error("{0}")]
    Checkpoint(String),

    /// Training cannot go on (for example the loss became NaN).
    #[error("{0}")]
    Train(String),

    /// A data-parallel collective failed: a rank died, hung or disagreed.
    #[error("{0}")]
    Dist(String),

    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error raised by candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the wick library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
