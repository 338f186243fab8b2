//! The ideal daemon on tokio, a task per connection. Whichever thread runs
//! a connection's task when its read is ready takes the lock on the state
//! and runs the event to completion, writing every line it causes itself,
//! so nothing is handed to another thread:
//!
//! - on one thread (`tokio-current`), that is the one thread there is;
//! - on tokio's worker threads (`tokio-combining`), it is whichever worker
//!   heard the event: flat combining, with the lock as the combiner.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;

use super::{Outgoing, Topics};

/// Which threads run the connections' tasks.
pub enum Threads {
    One,
    Workers,
}

pub fn serve(
    socket: &str,
    threads: Threads,
    ready: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Workers => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async {
        let listener =
            tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
        ready()?;
        // Any byte on stdin is ignored; its end of file ends the daemon.
        let (stdin_closed_tx, mut stdin_closed) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = stdin_closed_tx.send(());
        });
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut next_conn = 0;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = accepted?;
                    let conn = next_conn;
                    next_conn += 1;
                    tokio::spawn(serve_connection(conn, stream, Arc::clone(&shared)));
                }
                _ = &mut stdin_closed => return Ok(()),
            }
        }
    })
}

#[derive(Default)]
struct Shared {
    topics: Topics,
    writers: HashMap<u64, Writer>,
}

/// A connection's write half, and what its socket has not taken yet.
#[derive(Clone)]
struct Writer {
    half: Arc<OwnedWriteHalf>,
    /// `Some` while a task of its own is writing the rest; later lines
    /// join it there, so that they keep their order.
    backlog: Arc<Mutex<Option<Vec<u8>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve_connection(conn: u64, stream: UnixStream, shared: Arc<Mutex<Shared>>) {
    {
        let mut state = lock(&shared);
        if state.topics.open(conn, &stream).is_err() {
            return;
        }
    }
    let (read, write) = stream.into_split();
    let writer = Writer {
        half: Arc::new(write),
        backlog: Arc::new(Mutex::new(None)),
    };
    lock(&shared).writers.insert(conn, writer);
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let whole = matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0)
            && line.ends_with(b"\n");
        let mut out = Outgoing::new();
        let mut state = lock(&shared);
        if !whole {
            state.writers.remove(&conn);
            state.topics.close(conn, &mut out);
            write_now(&state, out);
            return;
        }
        state.topics.line(conn, &line[..line.len() - 1], &mut out);
        write_now(&state, out);
    }
}

/// Writes each line to its connection's socket from this thread, under
/// the lock, so that the lines to one socket keep their order. What a
/// socket does not take at once is written by a task of its own.
fn write_now(state: &Shared, out: Outgoing) {
    for (conn, line) in out {
        let Some(writer) = state.writers.get(&conn) else {
            continue;
        };
        let mut backlog = lock(&writer.backlog);
        if let Some(waiting) = backlog.as_mut() {
            waiting.extend_from_slice(&line);
            continue;
        }
        let written = match writer.half.try_write(&line) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            // A broken socket: its end of file comes next.
            Err(_) => continue,
        };
        if written < line.len() {
            *backlog = Some(line[written..].to_vec());
            tokio::spawn(drain(writer.clone()));
        }
    }
}

/// Writes a connection's backlog as its socket takes it.
async fn drain(writer: Writer) {
    loop {
        if writer.half.writable().await.is_err() {
            return;
        }
        let mut backlog = lock(&writer.backlog);
        let Some(waiting) = backlog.as_mut() else {
            return;
        };
        match writer.half.try_write(waiting) {
            Ok(n) => {
                waiting.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => waiting.clear(),
        }
        if waiting.is_empty() {
            *backlog = None;
            return;
        }
    }
}
