//! The control socket server: a background task that answers `snapshot`
//! and `watch` requests (see [`super::protocol`]) from [`LiveState`].
//!
//! The socket is created under a temporary name, set to mode 0600 and then
//! renamed into place, so it is never reachable with looser permissions;
//! every connection's peer must also be root (or the agent's own user).

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::protocol::{ErrorReply, MAX_REQUEST_LINE, PROTOCOL_VERSION, Request};
use super::{ControlConfig, ControlError, LiveState};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one snapshot line may take to write (a client that does not
/// read is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most clients served at once; more are closed at once.
const MAX_CLIENTS: usize = 32;

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// Inode of the socket we created: removed at exit only if unchanged.
    ino: u64,
}

/// Binds `cfg.socket` and serves it until `shutdown` turns true.
pub async fn serve(
    cfg: ControlConfig,
    state: Arc<LiveState>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    ControlServer::bind(&cfg)?.run(state, shutdown).await
}

impl ControlServer {
    /// Creates the socket's directory (0755) when missing, replaces a stale
    /// socket (one nobody answers on), and binds the socket with mode 0600.
    /// Synchronous and runtime-free: call it early to report errors.
    pub fn bind(cfg: &ControlConfig) -> Result<ControlServer, ControlError> {
        let path = cfg.socket.clone();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("/"));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| ControlError::Directory {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let bind_err = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(ControlError::InUse { path });
                }
                debug!(path = %path.display(), "removing a stale control socket");
                std::fs::remove_file(&path).map_err(bind_err)?;
            }
            Ok(_) => return Err(ControlError::NotASocket { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "control.sock".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let made = (|| {
            let l = std::os::unix::net::UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            std::fs::rename(&tmp, &path)?;
            let ino = std::fs::symlink_metadata(&path)?.ino();
            Ok((l, ino))
        })();
        match made {
            Ok((listener, ino)) => Ok(ControlServer {
                listener,
                path,
                ino,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(bind_err(e))
            }
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until `shutdown` turns true, then closes them and
    /// removes the socket file.
    pub async fn run(
        self,
        state: Arc<LiveState>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ControlError> {
        let ControlServer {
            listener,
            path,
            ino,
        } = self;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|source| ControlError::Bind {
                path: path.clone(),
                source,
            })?;
        info!(socket = %path.display(), "control socket ready");
        let me = nix::unistd::geteuid().as_raw();
        let mut clients = JoinSet::new();
        while !*shutdown.borrow() {
            while clients.try_join_next().is_some() {}
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let uid = stream.peer_cred().map(|c| c.uid()).ok();
                        if !matches!(uid, Some(u) if u == 0 || u == me) {
                            debug!(?uid, "control client refused: not root");
                            continue;
                        }
                        if clients.len() >= MAX_CLIENTS {
                            debug!("control client refused: too many clients");
                            continue;
                        }
                        clients.spawn(client(stream, state.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        clients.shutdown().await;
        drop(listener);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line)).await,
        Ok(Ok(()))
    )
}

fn json_line<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Reads one request line (bounded in size and time).
async fn read_request<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *rd).take(MAX_REQUEST_LINE as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("no request line within 10 s".into()),
        Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST_LINE {
        return Err(format!("request line longer than {MAX_REQUEST_LINE} bytes"));
    }
    serde_json::from_slice::<Request>(line.trim_ascii()).map_err(|e| {
        format!(
            "bad request ({e}); send {{\"cmd\":\"snapshot\"}} or {{\"cmd\":\"watch\"}} on one line"
        )
    })
}

async fn client(stream: UnixStream, state: Arc<LiveState>, mut shutdown: watch::Receiver<bool>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let req = match read_request(&mut rd).await {
        Ok(r) => r,
        Err(error) => {
            debug!(%error, "control client sent a bad request");
            let reply = ErrorReply {
                version: PROTOCOL_VERSION,
                error,
            };
            let _ = write_line(&mut wr, &json_line(&reply)).await;
            return;
        }
    };
    if !write_line(&mut wr, &json_line(&state.snapshot())).await {
        return;
    }
    if req == Request::Snapshot {
        let _ = wr.shutdown().await;
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(req.interval_ms()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut sink = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !write_line(&mut wr, &json_line(&state.snapshot())).await {
                    return;
                }
            }
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
            // Later input is ignored; end of input means the client left.
            r = rd.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}
