//! A client's socket as the daemon holds it: watched by the io driver for
//! reading only, written by non-blocking sends, and watched for room only
//! while a writer waits for it.
//!
//! tokio's own `UnixStream` registers a socket with its epoll for reading
//! and writing, edge-triggered. Then every time a client reads a line the
//! daemon sent, the kernel raises EPOLLOUT on the daemon's side of the
//! socket, and a fan-out of one `presence_diff` to 1,000 subscribers wakes
//! the io driver for up to 1,000 edges that nobody waits for. So here:
//! - the socket is registered for [`Interest::READABLE`] alone, and the
//!   connection's reader reads through that registration
//!   ([`SocketReader`]);
//! - every write is a non-blocking `send` ([`Socket::send`]), from the
//!   thread running the core or the writer task alike, which answers
//!   [`io::ErrorKind::WouldBlock`] when the socket is full and an error
//!   (`EPIPE`, without a signal) when the client has gone;
//! - only a writer that must wait for room arms the socket for writing
//!   ([`Socket::arm_for_writing`]): a second registration, of a duplicate
//!   of the descriptor, for [`Interest::WRITABLE`], dropped once its queue
//!   is drained. epoll keys what it watches by file and descriptor, so
//!   the duplicate is watched beside the original, and tokio deregisters
//!   it before the duplicate is closed (epoll forgets a registration by
//!   itself only once every descriptor of the file is closed).
//!
//! Registrations are edge-triggered: an armed writer must try its write
//! again after arming and before it waits, or an edge that came before
//! the registration would be lost to it; and each wait consumes the edge
//! it woke for ([`Armed::writable`]), so the next wait is for a new one.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use interprocess::os::unix::uds_local_socket::tokio::Stream;
use rustix::net::{RecvFlags, SendFlags, Shutdown};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// A connected client socket, registered with the runtime for reading
/// only. Shared by the connection's reader, its writer and its queue.
pub struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    /// Takes `fd`, a connected stream socket, non-blocking from now on,
    /// and registers it for reading. Must be called within the runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Socket> {
        // A send or a read must never block a thread, the core's least.
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Socket {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// Takes an accepted connection from tokio's registration (for reading
    /// and writing) to one of its own (for reading).
    pub fn from_stream(stream: Stream) -> io::Result<Socket> {
        let stream = tokio::net::UnixStream::from(stream).into_std()?;
        Socket::new(OwnedFd::from(stream))
    }

    /// Sends as much of `bytes` as the socket takes now, without blocking:
    /// [`io::ErrorKind::WouldBlock`] when it takes nothing, an error
    /// (never `SIGPIPE`) when the client has gone.
    pub fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            match rustix::net::send(
                self.fd.get_ref(),
                bytes,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Err(rustix::io::Errno::INTR) => {}
                sent => return sent.map_err(io::Error::from),
            }
        }
    }

    /// Shuts down one or both directions of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        rustix::net::shutdown(self.fd.get_ref(), how).map_err(io::Error::from)
    }

    /// Watches the socket for room to write until the returned [`Armed`]
    /// is dropped. Costs a descriptor meanwhile. Write again after arming,
    /// before waiting: room that came before the registration raises no
    /// edge the wait would see.
    pub fn arm_for_writing(&self) -> io::Result<Armed> {
        let duplicate = self.fd.get_ref().try_clone()?;
        Ok(Armed {
            fd: register(duplicate, Interest::WRITABLE)?,
        })
    }

    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let received = guard.try_io(|fd| {
                rustix::net::recv(fd.get_ref(), &mut *unfilled, RecvFlags::DONTWAIT)
                    .map(|(received, _)| received)
                    .map_err(io::Error::from)
            });
            match received {
                Ok(Ok(received)) => {
                    buf.advance(received);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing to read after all: the readiness is cleared, and
                // the next poll waits for a new edge.
                Err(_would_block) => {}
            }
        }
    }
}

/// Registers `fd` with the runtime's io driver for `interest` alone.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the descriptor, so it stays open, and the
    // same file, until the `AsyncFd` deregisters it and closes it on drop;
    // nothing here takes it out (`get_mut`, `into_inner`) or replaces it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// The socket watched for room to write, for as long as this lives: a
/// registration of a duplicate descriptor, deregistered, then closed,
/// when dropped.
pub struct Armed {
    fd: AsyncFd<OwnedFd>,
}

impl Armed {
    /// Waits until the kernel says the socket has room (or will never have
    /// any: the client has gone, and the next send says so), and takes
    /// that edge, so that the next call waits for another.
    pub async fn writable(&self) -> io::Result<()> {
        let mut guard = self.fd.writable().await?;
        // Taken before the write it allows: room that comes after this is
        // a new edge, which the next call sees.
        guard.clear_ready();
        Ok(())
    }
}

/// The reading side of a [`Socket`], for a `BufReader`.
pub struct SocketReader(Arc<Socket>);

impl SocketReader {
    pub fn new(socket: Arc<Socket>) -> SocketReader {
        SocketReader(socket)
    }
}

impl AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_recv(cx, buf)
    }
}
