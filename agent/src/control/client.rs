//! A blocking client of the control socket (what `tollgate top` uses).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{ErrorReply, PROTOCOL_VERSION, Request, Snapshot};

/// How long a snapshot may take to arrive before the agent counts as hung.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the agent, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no tollgate agent is listening on {} ({source}); is `tollgate run` running, and is [control] socket the same path in its config? (--socket PATH)",
        path.display()
    )]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "permission denied: {} is root-only; run `sudo tollgate top`",
        path.display()
    )]
    Permission { path: PathBuf },
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent closed the control connection")]
    Closed,
    #[error("the agent answered: {0}")]
    Refused(String),
    #[error(
        "the agent speaks control protocol version {found}; this tollgate speaks {PROTOCOL_VERSION}: use the same tollgate version"
    )]
    Version { found: u64 },
    #[error("cannot understand the agent's answer: {0}")]
    Decode(String),
}

impl ClientError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        use crate::exit::*;
        match self {
            ClientError::Permission { .. } => NOPERM,
            ClientError::Version { .. } => USAGE,
            _ => UNAVAILABLE,
        }
    }
}

/// A connection that receives snapshots.
#[derive(Debug)]
pub struct Connection {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Connection {
    /// Connects and sends `req`.
    pub fn open(path: &Path, req: &Request) -> Result<Connection, ClientError> {
        let p = || path.to_path_buf();
        let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::Permission { path: p() },
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning { path: p(), source }
            }
            _ => ClientError::Io { path: p(), source },
        })?;
        let io = |source| ClientError::Io { path: p(), source };
        stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(READ_TIMEOUT)).map_err(io)?;
        stream.write_all(req.to_line().as_bytes()).map_err(io)?;
        Ok(Connection {
            path: p(),
            reader: BufReader::new(stream),
        })
    }

    /// The next snapshot (blocks up to 10 s).
    pub fn next_snapshot(&mut self) -> Result<Snapshot, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        parse_line(&line)
    }
}

/// Decodes one server line: a snapshot, or the error the server sent.
pub fn parse_line(line: &str) -> Result<Snapshot, ClientError> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| ClientError::Decode(e.to_string()))?;
    let version = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(ClientError::Version { found: version });
    }
    if v.get("error").is_some() {
        let e: ErrorReply =
            serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))?;
        return Err(ClientError::Refused(e.error));
    }
    serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
}

/// One snapshot from the agent at `path`.
pub fn snapshot(path: &Path) -> Result<Snapshot, ClientError> {
    Connection::open(path, &Request::Snapshot)?.next_snapshot()
}
