//! A step's output, from its pipes to its log file: the runner gives each step two
//! pipes made here; [`pump`] reads each of them in large reads cut at line ends, and
//! [`write_log`], on a blocking thread of its own for the whole step, masks secrets,
//! applies the run's log budget, writes what is waiting with one call, then publishes
//! it on the run event stream and passes it to [`keep_batches`] when the store shares
//! logs. Nothing here knows about processes; the runner owns their lifetimes.
//!
//! Every byte is read once from a pipe and written once to the file: the buffer a read
//! filled is what is masked (unless a secret is in it), written, published and kept.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::run::events::OutputTap;
use crate::run::mask::Masker;
use crate::run::runner::LogBudget;
use crate::store::StoreError;

/// What one read of a pipe may take. A fast step fills its pipe while the daemon writes
/// the previous batch; taking it all at once keeps the reads (and the pieces written
/// and published) few.
const READ_BYTES: usize = 256 * 1024;
/// The size asked for each pipe instead of the kernel's 64 KiB, so that a step that
/// prints fast blocks less often while the daemon writes. Pages are only used as the
/// step fills them; the kernel refuses more than `/proc/sys/fs/pipe-max-size` (1 MiB
/// by default), and then the pipe keeps its size.
const PIPE_BYTES: libc::c_int = 1 << 20;
/// A line is held back until its end is read, so that stdout and stderr interleave by
/// line, but no longer than this: a line without newline cannot be held without bound,
/// and a follower sees a progress line of this size without waiting for the step's end.
const LINE_BYTES: usize = 8 * 1024;
/// How much of what waits for the writer goes into one write at most.
const BATCH_BYTES: usize = 1 << 20;
/// Pieces smaller than this, waiting together, are joined (copied) into one, so that a
/// chatty step's lines make one event, not one each.
const JOIN_BYTES: usize = 16 * 1024;
/// What one output event carries at most (a piece is published in slices of it, not
/// copied). The event stream keeps its last `events::CAPACITY` events while a
/// subscriber is behind (a follower whose client reads slowly), so this bounds what
/// such a follower holds in memory: 4096 × 16 KiB, 64 MiB at worst (twice what 8 KiB
/// events allowed), while each event still carries two of what 8 KiB reads gave.
const EVENT_BYTES: usize = 16 * 1024;

/// A pipe for one of a step's output streams: the end the daemon reads, and the end to
/// give the step (which the caller must close once the step is spawned).
pub fn pipe() -> io::Result<(pipe::Receiver, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors it opened into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened, and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl with integer arguments on a descriptor we own; a refusal leaves the
    // pipe as it was, which only costs speed.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    // The daemon's end is read through the runtime; the step's end stays blocking.
    Ok((pipe::Receiver::from_owned_fd(read)?, write))
}

/// Forwards one pipe to the writer, cut at line ends where possible so the two streams
/// interleave by line rather than mid-line.
pub async fn pump(mut pipe: pipe::Receiver, tx: mpsc::Sender<Bytes>) {
    let mut pending = BytesMut::with_capacity(READ_BYTES);
    loop {
        // The room a read needs; the space of pieces already written and dropped is
        // reused when nothing holds them any more, otherwise this is a new buffer.
        if pending.capacity() - pending.len() < READ_BYTES / 2 {
            pending.reserve(READ_BYTES);
        }
        let held = pending.len();
        match pipe.read_buf(&mut pending).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "reading step output failed");
                break;
            }
        }
        // What was held has no line end; only what was read now can have one.
        let cut = match memchr::memrchr(b'\n', &pending[held..]) {
            Some(i) if pending.len() - (held + i + 1) < LINE_BYTES => held + i + 1,
            _ if pending.len() >= LINE_BYTES => pending.len(),
            _ => continue,
        };
        if tx.send(pending.split_to(cut).freeze()).await.is_err() {
            // The writer failed; dropping the pipe lets the step see EPIPE.
            return;
        }
    }
    if !pending.is_empty() {
        let _ = tx.send(pending.freeze()).await;
    }
}

/// Writes the step's interleaved output as it comes, secrets masked: a value split
/// across chunks is held back until it is known whether it is a secret.
/// Past the run's log budget, output is dropped (the step keeps running, its pipes
/// drained); the log of the step that reached the limit ends with a line saying how
/// much it dropped, and that everything after is dropped too. Returns that count.
///
/// Blocking: runs on a thread of its own for the whole step, so that a write costs a
/// system call and no hand-over to another thread. What waits in the channel when the
/// writer comes back for more is written with one call, then published in events of at
/// most EVENT_BYTES (small pieces joined), in the order the pumps sent it.
pub fn write_log(
    file: File,
    mut rx: mpsc::Receiver<Bytes>,
    mut mask: Masker,
    tap: Option<OutputTap>,
    keep: Option<mpsc::Sender<Bytes>>,
    budget: Arc<LogBudget>,
) -> io::Result<u64> {
    let mut log = TappedLog {
        file,
        offset: 0,
        tap,
        keep,
    };
    let mut dropped = 0u64;
    let mut batch = Batch::default();
    let mut add = |batch: &mut Batch, piece: Bytes| {
        let piece = mask.push(piece);
        batch.add(admitted(&budget, piece, &mut dropped));
    };
    while let Some(chunk) = rx.blocking_recv() {
        add(&mut batch, chunk);
        while batch.len < BATCH_BYTES {
            match rx.try_recv() {
                Ok(chunk) => add(&mut batch, chunk),
                Err(_) => break,
            }
        }
        log.write(batch.take())?;
    }
    batch.add(admitted(&budget, mask.finish(), &mut dropped));
    if dropped > 0 && budget.tell() {
        let line = format!(
            "\n[hookci] max_log_bytes ({} bytes per run) reached: {dropped} bytes of output dropped, and all output of later steps\n",
            budget.limit()
        );
        batch.add(Bytes::from(line));
    }
    log.write(batch.take())?;
    Ok(dropped)
}

/// What of `piece` the run's log budget still admits.
fn admitted(budget: &LogBudget, mut piece: Bytes, dropped: &mut u64) -> Bytes {
    let keep = budget.admit(&piece, dropped).len();
    piece.truncate(keep);
    piece
}

/// The pieces of one write, in order.
#[derive(Default)]
struct Batch {
    pieces: Vec<Bytes>,
    /// Small pieces that came one after the other, joined.
    joined: BytesMut,
    len: usize,
}

impl Batch {
    fn add(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        self.len += piece.len();
        if piece.len() < JOIN_BYTES {
            self.joined.extend_from_slice(&piece);
            if self.joined.len() >= JOIN_BYTES {
                self.pieces.push(self.joined.split().freeze());
            }
        } else {
            if !self.joined.is_empty() {
                self.pieces.push(self.joined.split().freeze());
            }
            self.pieces.push(piece);
        }
    }

    fn take(&mut self) -> Vec<Bytes> {
        if !self.joined.is_empty() {
            self.pieces.push(self.joined.split().freeze());
        }
        self.len = 0;
        std::mem::take(&mut self.pieces)
    }
}

/// A step's log file, and where what is written to it is published.
struct TappedLog {
    file: File,
    /// How much has been written.
    offset: u64,
    tap: Option<OutputTap>,
    /// To [`keep_batches`], when the store shares logs.
    keep: Option<mpsc::Sender<Bytes>>,
}

impl TappedLog {
    /// Writes `pieces`, then publishes them: once they are in the file, so that a
    /// follower who reads the file and then follows the events misses nothing in
    /// between (a plain file has no buffer of ours to flush first).
    fn write(&mut self, pieces: Vec<Bytes>) -> io::Result<()> {
        write_all_vectored(&mut self.file, &pieces)?;
        for piece in pieces {
            let at = self.offset;
            self.offset += piece.len() as u64;
            if let Some(keep) = &self.keep {
                // A keeper that is gone has failed for good; the file still has it all.
                let _ = keep.blocking_send(piece.clone());
            }
            if let Some(tap) = &self.tap {
                for start in (0..piece.len()).step_by(EVENT_BYTES) {
                    let end = piece.len().min(start + EVENT_BYTES);
                    tap.written(at + start as u64, piece.slice(start..end));
                }
            }
        }
        Ok(())
    }
}

fn write_all_vectored(file: &mut File, pieces: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long written output may wait before it is kept in a store that shares logs.
const KEEP_AFTER: Duration = Duration::from_millis(150);
/// How much written output is kept in the store at once at most, before KEEP_AFTER.
const KEEP_BYTES: usize = 64 * 1024;

/// Keeps what the writer wrote in the store that shares logs, one row a batch, never one
/// a line: a batch goes once it holds KEEP_BYTES or is KEEP_AFTER old, also while the
/// step is quiet. Ends when the writer has, once all of it is kept (or the store failed
/// for longer than the tap's patience): before the step's end is recorded, so that a
/// reader elsewhere who sees the end has the whole log.
pub async fn keep_batches(tap: OutputTap, mut rx: mpsc::Receiver<Bytes>) {
    let mut kept = Kept::default();
    loop {
        let piece = match kept.due() {
            Some(due) => tokio::select! {
                piece = rx.recv() => piece,
                () = tokio::time::sleep_until(due) => {
                    kept.keep(&tap).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(piece) = piece else {
            break;
        };
        if kept.bytes.is_empty() {
            kept.since = Some(Instant::now());
        }
        kept.bytes.extend_from_slice(&piece);
        if kept.full() {
            kept.keep(&tap).await;
        }
    }
    // The step has ended: what is left goes before its end is recorded, so it is tried
    // again with growing pauses while the store fails, for as long as the tap's
    // patience (the file on this instance has it all the while).
    let give_up = Instant::now() + tap.patience();
    let mut pause = KEEP_AFTER;
    loop {
        kept.keep(&tap).await;
        if kept.bytes.is_empty() {
            break;
        }
        if Instant::now() + pause > give_up {
            tracing::error!(
                bytes = kept.bytes.len(),
                "the end of the step's output could not be kept in the store: only this instance's log file has it"
            );
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(KEEP_PAUSE_MAX);
    }
}

/// The longest pause between tries of the end of a step's output (see `keep_batches`).
const KEEP_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Written output the store that shares logs has not had yet.
#[derive(Default)]
struct Kept {
    /// Where the batch begins in the log.
    at: u64,
    bytes: Vec<u8>,
    /// When the batch's first byte was written.
    since: Option<Instant>,
    /// How many bytes the last try, which failed, sent: the next sends the same.
    failed: Option<usize>,
    /// A try given up while the store still had it: the next try waits for its
    /// answer rather than send the batch again beside it.
    pending: Option<JoinHandle<Result<(), StoreError>>>,
}

impl Kept {
    fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + KEEP_AFTER)
    }

    /// Whether the batch is big enough to go before it is due. Not after a failure:
    /// the failed batch goes again when due, not at every piece that comes meanwhile.
    fn full(&self) -> bool {
        self.failed.is_none() && self.bytes.len() >= KEEP_BYTES
    }

    /// Keeps the batch in the store. A failure is logged and the batch kept for the next
    /// try: the file has it, and the run's log budget bounds what can pile up.
    async fn keep(&mut self, tap: &OutputTap) {
        if self.bytes.is_empty() {
            self.since = None;
            return;
        }
        // A failed batch goes again as it was, never grown: it may have been stored with
        // only the answer lost, and the store keeps the first piece at an offset (a
        // longer one there would be dropped, bytes and all).
        let len = self.failed.unwrap_or(self.bytes.len());
        let mut job = match self.pending.take() {
            Some(job) => job,
            None => {
                let (at, bytes) = (self.at, self.bytes[..len].to_vec());
                let tap = tap.clone();
                tokio::task::spawn_blocking(move || tap.keep(at, bytes))
            }
        };
        // A store that does not answer must not hold the step's output, and with it
        // the run's end, past the patience.
        let limit = tap.patience();
        let Ok(answer) = tokio::time::timeout(limit, &mut job).await else {
            warn!(
                bytes = len,
                ?limit,
                "the store does not answer to keep step output, trying again"
            );
            self.pending = Some(job);
            self.failed = Some(len);
            self.since = Some(Instant::now());
            return;
        };
        match answer {
            Ok(Ok(())) => {
                self.bytes.drain(..len);
                self.at += len as u64;
                self.failed = None;
                self.since = (!self.bytes.is_empty()).then(Instant::now);
            }
            Ok(Err(e)) => {
                warn!(error = %e, bytes = len, "cannot keep step output in the store, trying again");
                self.failed = Some(len);
                self.since = Some(Instant::now());
            }
            Err(e) => {
                warn!(error = %e, "keeping step output in the store failed");
                self.failed = Some(len);
                self.since = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::run::RunEvent;

    #[test]
    fn a_failed_batch_waits_until_due_however_much_output_comes_meanwhile() {
        let mut kept = Kept {
            bytes: vec![b'x'; KEEP_BYTES],
            since: Some(Instant::now()),
            ..Kept::default()
        };
        assert!(kept.full(), "a full batch goes at once");
        kept.failed = Some(KEEP_BYTES);
        kept.bytes.extend_from_slice(&[b'y'; KEEP_BYTES]);
        assert!(!kept.full(), "after a failure it goes again only when due");
        assert_eq!(kept.due(), kept.since.map(|since| since + KEEP_AFTER));
    }

    #[test]
    fn a_batch_keeps_the_order_and_joins_only_small_neighbours() {
        let big = |c: u8| Bytes::from(vec![c; JOIN_BYTES + 3]);
        let pieces = [
            Bytes::from_static(b"one\n"),
            Bytes::from_static(b"two\n"),
            big(b'a'),
            Bytes::new(),
            Bytes::from_static(b"three\n"),
            big(b'b'),
            big(b'c'),
            Bytes::from_static(b"four"),
        ];
        let mut batch = Batch::default();
        for piece in &pieces {
            batch.add(piece.clone());
        }
        assert_eq!(batch.len, pieces.iter().map(Bytes::len).sum::<usize>());
        let out = batch.take();
        assert_eq!(out.concat(), pieces.concat());
        let lens: Vec<usize> = out.iter().map(Bytes::len).collect();
        let b = JOIN_BYTES + 3;
        assert_eq!(lens, [8, b, 6, b, b, 4]);
        // A big piece is passed on as it came, not copied.
        assert_eq!(out[1].as_ptr(), pieces[2].as_ptr());
        assert_eq!(batch.len, 0);
        assert!(batch.take().is_empty());
    }

    #[test]
    fn small_pieces_are_joined_up_to_a_bound() {
        let mut batch = Batch::default();
        let line = Bytes::from(vec![b'x'; 1000]);
        for _ in 0..40 {
            batch.add(line.clone());
        }
        let out = batch.take();
        assert_eq!(out.concat(), vec![b'x'; 40_000]);
        assert!(
            out.iter().all(|p| p.len() < 2 * JOIN_BYTES),
            "{}",
            out.len()
        );
        assert!(out.len() < 4, "{}", out.len());
    }

    #[test]
    fn what_is_written_is_published_in_order_in_bounded_events_once_in_the_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("1.log");
        let events = crate::run::Events::new();
        let mut rx = events.subscribe();
        let mut log = TappedLog {
            file: File::create(&path).unwrap(),
            offset: 0,
            tap: Some(events.output_of(7, 1)),
            keep: None,
        };
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        log.write(vec![
            Bytes::from_static(b"first\n"),
            Bytes::from(big.clone()),
        ])
        .unwrap();
        log.write(vec![Bytes::from_static(b"last\n")]).unwrap();
        let file = std::fs::read(&path).unwrap();
        let mut published = Vec::new();
        while let Ok(event) = rx.try_recv() {
            let RunEvent::Output {
                run,
                step,
                offset,
                bytes,
            } = &*event
            else {
                panic!("{event:?}");
            };
            assert_eq!((*run, *step), (7, 1));
            assert_eq!(*offset, published.len() as u64, "contiguous, in order");
            assert!(bytes.len() <= EVENT_BYTES);
            published.extend_from_slice(bytes);
        }
        assert_eq!(published, file);
        assert_eq!(file.len(), 6 + big.len() + 5);
        assert_eq!(log.offset, file.len() as u64);
    }

    /// The read ends of a pipe, fed by a thread, cut as `pump` cuts them.
    async fn pumped(write: impl FnOnce(File) + Send + 'static) -> Vec<Bytes> {
        let (read, theirs) = pipe().unwrap();
        let writer = std::thread::spawn(move || write(File::from(theirs)));
        let (tx, mut rx) = mpsc::channel(4);
        let pump = tokio::spawn(pump(read, tx));
        let mut got = Vec::new();
        while let Some(piece) = rx.recv().await {
            got.push(piece);
        }
        pump.await.unwrap();
        writer.join().unwrap();
        got
    }

    #[tokio::test]
    async fn pieces_end_at_line_ends_and_a_long_line_is_cut() {
        let got = pumped(|mut f| {
            f.write_all(b"first li").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            f.write_all(b"ne\nsecond line\nthird").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            f.write_all(&vec![b'y'; 3 * LINE_BYTES]).unwrap();
        })
        .await;
        let all = got.concat();
        let mut want = b"first line\nsecond line\nthird".to_vec();
        want.extend(vec![b'y'; 3 * LINE_BYTES]);
        assert_eq!(all, want);
        // The first piece ends at a line end however the reads fell.
        assert!(got[0].ends_with(b"\n"), "{:?}", got[0]);
        for piece in &got[..got.len() - 1] {
            assert!(
                piece.ends_with(b"\n") || piece.len() >= LINE_BYTES,
                "{} bytes",
                piece.len()
            );
        }
    }

    #[tokio::test]
    async fn a_pipe_is_read_in_reads_larger_than_the_default_pipe() {
        let (read, theirs) = pipe().unwrap();
        // SAFETY: F_GETPIPE_SZ on a descriptor we own.
        let size = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(size, PIPE_BYTES);
        let mut f = File::from(theirs);
        // One write the pipe holds whole, before the reader looks: one piece.
        let line = b"0123456789abcdef".repeat(16 * 1024 / 16);
        let burst: Vec<u8> = std::iter::repeat_n(&line[..], 12)
            .flat_map(|l| l.iter().copied().chain(std::iter::once(b'\n')))
            .collect();
        assert!(burst.len() > 64 * 1024 && burst.len() <= READ_BYTES);
        f.write_all(&burst).unwrap();
        drop(f);
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(pump(read, tx));
        let first = rx.recv().await.unwrap();
        assert_eq!(first, burst);
        assert!(rx.recv().await.is_none());
    }
}
