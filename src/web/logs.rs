//! Where a step's log is read from: the file this instance wrote, or, when the store
//! shares logs between instances (`Store::shares_logs`, PostgreSQL) and the file is
//! not here because another instance ran the step, the pieces kept in the store. The
//! calls block: async callers run them on blocking threads.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::store::Store;

/// How much is asked of the store at once.
const STORE_PIECE: usize = 256 * 1024;

/// One step's log: its file on this instance, and its place in the store.
#[derive(Clone, Copy)]
pub struct StepLog<'a> {
    pub store: &'a dyn Store,
    pub path: &'a Path,
    pub run: i64,
    pub attempt: i64,
    pub step: i64,
}

impl StepLog<'_> {
    /// Up to `max` bytes from `offset`, as far as the log reaches now; `None` when this
    /// instance has no such log (no file, and a store that does not share logs).
    pub fn read_at(&self, offset: u64, max: usize) -> io::Result<Option<Vec<u8>>> {
        match std::fs::File::open(self.path) {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::with_capacity(max.min(STORE_PIECE));
                file.take(max as u64).read_to_end(&mut buf)?;
                Ok(Some(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.store.shares_logs() => self
                .store
                .read_log(self.run, self.attempt, self.step, offset, max)
                .map(Some)
                .map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last `tail` bytes of the log as the store has it, and where they begin; for
    /// a log this instance has no file of. `None` unless the store shares logs.
    pub fn stored_tail(&self, tail: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
        if !self.store.shares_logs() {
            return Ok(None);
        }
        let (mut start, mut kept) = (0u64, Vec::new());
        loop {
            let at = start + kept.len() as u64;
            let piece = self
                .store
                .read_log(self.run, self.attempt, self.step, at, STORE_PIECE)
                .map_err(io::Error::other)?;
            if piece.is_empty() {
                return Ok(Some((start, kept)));
            }
            kept.extend_from_slice(&piece);
            let over = (kept.len() as u64).saturating_sub(tail) as usize;
            kept.drain(..over);
            start += over as u64;
        }
    }
}
