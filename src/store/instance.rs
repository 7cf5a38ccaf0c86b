//! The name an instance records as the owner of the runs it claims: its host name and
//! a random part, made once and kept in `state_dir/instance`, so that a restart of the
//! same instance owns (and recovers) the runs it left, and two instances sharing a
//! database never take each other for themselves.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// This instance's name, from `state_dir/instance`, made there on the first start.
pub fn instance_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("instance");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut random = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let id = format!("{}-{}", host_name(), hex::encode(random));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&path)?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    Ok(id)
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated within it
    // when it fits, and the last byte stays 0 otherwise.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match (rc, std::str::from_utf8(&buf[..end])) {
        (0, Ok(name)) if !name.is_empty() => name.to_owned(),
        _ => "hookci".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_name_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = super::instance_id(dir.path()).unwrap();
        assert_eq!(super::instance_id(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(super::instance_id(other.path()).unwrap(), first);
    }
}
