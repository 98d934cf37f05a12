//! The main port's listener, with a cap on connections open at once.
//!
//! Every connection holds a file descriptor and a task, idle or not, and HTTP/1 keeps
//! them open between requests. Without a cap, a client opening connections (a thousand
//! idle sockets) would use up the process's descriptors, which the store needs too (the
//! reserve file it takes back, a PostgreSQL pool's connections). Past the cap the
//! listener stops accepting: new connections wait in the kernel's backlog until one
//! closes. The admin port (`--admin-port`) has a listener of its own, so health checks
//! are still answered.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A TCP listener that keeps at most a given number of its connections open.
pub(crate) struct Capped {
    inner: TcpListener,
    open: Arc<Semaphore>,
}

impl Capped {
    /// `inner`, accepting while fewer than `max` of its connections are open.
    pub(crate) fn new(inner: TcpListener, max: usize) -> Self {
        Self {
            inner,
            open: Arc::new(Semaphore::new(max)),
        }
    }
}

/// An accepted connection, holding its place under the cap until it is dropped.
pub(crate) struct CappedIo {
    io: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (CappedIo, Self::Addr) {
        // The semaphore is never closed: a failed acquire cannot happen, and would leave
        // the listener accepting nothing rather than panic.
        let place = match Arc::clone(&self.open).acquire_owned().await {
            Ok(place) => place,
            Err(_) => std::future::pending().await,
        };
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (CappedIo { io, _place: place }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
