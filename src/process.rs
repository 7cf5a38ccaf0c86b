//! Protections of the hookci process itself, set once at its start (the daemon's, and
//! each git worker's): what a step could otherwise read of it, and the file descriptor
//! limit its connections need.

/// Makes the process non-dumpable: no process of another user, and no process of its
/// own user without `CAP_SYS_PTRACE` either, may read its `/proc/PID/environ`,
/// `/proc/PID/mem` or attach to it. A step running as the daemon's own user would
/// otherwise find the secrets the daemon was started with there (unsetting a
/// variable does not clear the memory that file shows).
pub fn not_dumpable() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot make the process non-dumpable");
    }
}

/// Raises the soft limit on open files to the hard one: each connection takes one, and
/// `max_connections` defaults to 1024, the usual soft limit.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read or write the struct owned here.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
