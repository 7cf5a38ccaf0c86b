//! Speaking to the service manager. With `Type=notify`, systemd passes a datagram
//! socket in `$NOTIFY_SOCKET`; hookci says `READY=1` once it is listening and has
//! recovered its state directory, `RELOADING=1` (then `READY=1`) around a reload,
//! `STOPPING=1` when a stop begins, and the scheduler sends `WATCHDOG=1` and `STATUS=`
//! (`run::heartbeat`). Without the variable nothing is sent. A failure to notify is
//! logged, never fatal. Socket activation: a listening socket passed as fd 3 with
//! `LISTEN_FDS`/`LISTEN_PID` (sd_listen_fds(3)) is taken instead of binding.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Whether a service manager listens for notifications.
pub fn is_notifying() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells the service manager a reload begins; `READY=1` ends it. `MONOTONIC_USEC`
/// lets systemd tell this reload from an earlier one.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// The watchdog interval systemd set for this process (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a count of passed sockets")]
    BadCount(String),
    #[error(
        "{0} sockets were passed (LISTEN_FDS); hookci serves one: give its socket unit \
         a single ListenStream="
    )]
    TooMany(i32),
    #[error("the passed fd 3 is not a listening TCP socket: {0}")]
    NotAListener(String),
}

/// The listening socket systemd passed, if it passed one to this process. The
/// variables are removed, so nothing this process starts takes the socket for its
/// own, and the descriptor is made close-on-exec, so no step inherits it.
pub fn listener() -> Result<Option<std::net::TcpListener>, ActivationError> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Changing the environment races with threads that read it: `serve` calls
        // this before it starts the runtime's threads.
        std::env::remove_var(var);
    }
    let Some(count) = count.filter(|_| for_us) else {
        return Ok(None);
    };
    let n: i32 = count
        .parse()
        .map_err(|_| ActivationError::BadCount(count.clone()))?;
    match n {
        0 => return Ok(None),
        1 => {}
        n => return Err(ActivationError::TooMany(n)),
    }
    let fd = LISTEN_FDS_START;
    let not = |what: String| ActivationError::NotAListener(what);
    let mut kind: libc::c_int = 0;
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt and fcntl on a descriptor number, writing only into the
    // integers given; a descriptor that is not a socket makes them fail.
    unsafe {
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        ) != 0
        {
            return Err(not(std::io::Error::last_os_error().to_string()));
        }
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        ) != 0
        {
            return Err(not(std::io::Error::last_os_error().to_string()));
        }
        if kind != libc::SOCK_STREAM || accepting == 0 {
            return Err(not(
                "a stream socket in the listening state is needed (ListenStream=)".into(),
            ));
        }
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) != 0 {
            return Err(not(std::io::Error::last_os_error().to_string()));
        }
    }
    // SAFETY: fd 3 was passed to this process to own, and is a listening stream socket.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    if let Err(e) = listener.local_addr() {
        // A Unix stream socket (ListenStream=/path) has no TCP address.
        return Err(not(format!("it has no TCP address ({e})")));
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| not(e.to_string()))?;
    Ok(Some(listener))
}

/// Sends one state line (`READY=1`, `STOPPING=1`, ...) to the service manager, if any.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target, state) {
        tracing::warn!(socket = ?target, error = %e, state, "cannot notify the service manager");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<usize> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    match bytes.strip_prefix(b"@") {
        // An abstract socket name (Linux): '@' stands for the leading NUL byte.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        }
        None => socket.send_to(state.as_bytes(), target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("hookci-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
