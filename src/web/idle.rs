//! The idle keep-alive timeout (`keep_alive_timeout`): a connection with no request in
//! flight that sends and receives nothing for that long is closed. hyper has no such
//! timeout of its own (its header-read timeout also runs while a kept-alive connection
//! waits, but that one is 30 s and is for slow headers), so the connection's socket is
//! wrapped: once it is idle past the timeout, its next read reports end of input, and
//! hyper closes an idle connection whose client has gone. A request is in flight from
//! the moment hyper hands it to the service until its response body is dropped, so a
//! slow upload or a followed log that says nothing for a while is never cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What one connection is doing: how many requests are in flight, when bytes last
/// went either way, and who to wake when the last request ends.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
    reader: Mutex<Option<Waker>>,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            reader: Mutex::new(None),
        })
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight; dropped with its response body.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The idle clock starts now, and the reader parked without one must arm it.
            self.0.touch();
            if let Some(waker) = self
                .0
                .reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                waker.wake();
            }
        }
    }
}

/// A connection's socket that reports end of input once the connection has been idle
/// for `timeout`.
pub struct IdleIo<T> {
    io: T,
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    pub fn new(io: T, activity: Arc<Activity>, timeout: Duration) -> IdleIo<T> {
        let sleep = Box::pin(tokio::time::sleep(timeout));
        IdleIo {
            io,
            activity,
            timeout,
            sleep,
        }
    }

    /// Whether the connection has now been idle for the timeout; if not, the task is
    /// woken when it may have been.
    fn idle_past(&mut self, cx: &mut Context<'_>) -> bool {
        if self.activity.in_flight.load(Ordering::SeqCst) > 0 {
            *self
                .activity
                .reader
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            // The last request may have ended between the load and the store.
            if self.activity.in_flight.load(Ordering::SeqCst) > 0 {
                return false;
            }
        }
        let deadline = self.activity.last() + self.timeout;
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(read) => {
                if buf.filled().len() > before {
                    self.activity.touch();
                }
                Poll::Ready(read)
            }
            Poll::Pending if self.idle_past(cx) => {
                tracing::debug!("closing a connection idle past keep_alive_timeout");
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until it is dropped.
pub struct Guarded<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Guarded<B> {
    pub fn new(body: B, in_flight: InFlight) -> Guarded<B> {
        Guarded {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Guarded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
