//! `min_free_bytes`: how much room the state directory's file system has left. Below
//! the minimum no run starts (webhooks are still taken: a delivery is a few rows), so
//! a run's output cannot fill the disk that intake needs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct owned here.
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Why no run may start now, if so.
pub fn shortage(state_dir: &Path, min_free: u64) -> Option<String> {
    if min_free == 0 {
        return None;
    }
    match free_bytes(state_dir) {
        Ok(free) if free < min_free => Some(format!(
            "the state directory's file system has {free} bytes free, less than min_free_bytes ({min_free}): no run starts until space is freed"
        )),
        Ok(_) => None,
        Err(e) => Some(format!(
            "cannot tell how much space the state directory {} has left: {e}",
            state_dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(shortage(dir.path(), 0).is_none());
        assert!(shortage(dir.path(), u64::MAX)
            .unwrap()
            .contains("min_free_bytes"));
    }
}
