//! The reload socket, `state_dir/reload.sock`: `hookci reload --local` (the unit's
//! `ExecReload=`) asks here and waits for the outcome, so `systemctl reload` fails
//! when the reload does. A Unix socket of mode 0600 in the state directory: only the
//! daemon's own user (and root) may connect, which is the whole of its access
//! control, so it needs no API token. One request a connection: the line `reload`;
//! the answer is one line of JSON, as `POST /api/reload` answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::state::AppState;

/// The request line.
pub const REQUEST: &str = "reload";

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the reload socket of the daemon with state directory `state_dir` is.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("reload.sock")
}

/// Listens on the reload socket until `stop` turns true, then removes it. A socket
/// left by a daemon that died is replaced: the state directory's lock, held by this
/// daemon, says no other one uses it.
pub fn start(state: Arc<AppState>, stop: watch::Receiver<bool>) -> std::io::Result<PathBuf> {
    let path = path(&state.config().state_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(serve(state, listener, path.clone(), stop));
    Ok(path)
}

async fn serve(
    state: Arc<AppState>,
    listener: UnixListener,
    path: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(Arc::clone(&state), stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reload socket: cannot accept");
                    // Out of descriptors, say: give it a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

async fn answer(state: Arc<AppState>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // At most a short line: a request is one word.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 64));
    let asked = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let reply: Value = match asked {
        Ok(Ok(_)) if line.trim() == REQUEST => {
            match crate::reload::reload_to_end(state, "hookci reload").await {
                Ok(report) => json!({ "reloaded": true, "report": report }),
                Err(crate::reload::ReloadError::Invalid { problems }) => json!({
                    "error": "reload failed: nothing changed",
                    "problems": problems,
                }),
                Err(e) => json!({ "error": e.to_string() }),
            }
        }
        Ok(Ok(_)) => json!({ "error": format!("unknown request: expected {REQUEST:?}") }),
        Ok(Err(e)) => json!({ "error": format!("cannot read the request: {e}") }),
        Err(_) => json!({ "error": "no request within 5 s" }),
    };
    let mut text = reply.to_string();
    text.push('\n');
    if let Err(e) = write.write_all(text.as_bytes()).await {
        // The reload itself happened (or failed) all the same; only its answer is lost.
        tracing::warn!(error = %e, "reload socket: cannot answer the client");
    }
    let _ = write.shutdown().await;
}
