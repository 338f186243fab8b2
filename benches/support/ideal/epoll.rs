//! The ideal daemon on one thread and one epoll set, level-triggered:
//! dbus-broker's design, with nothing between the kernel's wake-up and
//! the write of the lines it causes.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};

use anyhow::Context;
use rustix::event::epoll::{self, EventData, EventFlags};

use super::{Outgoing, Topics};

/// Epoll data of the listener and of stdin; connections count up from 0.
const LISTENER: u64 = u64::MAX;
const STDIN: u64 = u64::MAX - 1;

/// How much one read takes from a socket.
const READ_CHUNK: usize = 64 * 1024;

pub fn serve(socket: &str, ready: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<()> {
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
    listener.set_nonblocking(true)?;
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &epoll,
        &listener,
        EventData::new_u64(LISTENER),
        EventFlags::IN,
    )?;
    let stdin = std::io::stdin();
    epoll::add(
        &epoll,
        stdin.as_fd(),
        EventData::new_u64(STDIN),
        EventFlags::IN,
    )?;
    ready()?;

    let mut daemon = EpollDaemon {
        epoll,
        conns: HashMap::new(),
        next_conn: 0,
        topics: Topics::default(),
    };
    let mut events = Vec::with_capacity(256);
    let mut chunk = vec![0; READ_CHUNK];
    loop {
        events.clear();
        epoll::wait(
            &daemon.epoll,
            rustix::buffer::spare_capacity(&mut events),
            None,
        )?;
        for event in &events {
            let (token, flags) = (event.data.u64(), event.flags);
            match token {
                LISTENER => daemon.accept(&listener)?,
                STDIN => {
                    // Any byte is ignored; end of file ends the daemon.
                    if stdin.lock().read(&mut chunk)? == 0 {
                        return Ok(());
                    }
                }
                conn => {
                    if flags.contains(EventFlags::OUT) {
                        daemon.flush(conn);
                    }
                    if flags.intersects(EventFlags::IN | EventFlags::HUP | EventFlags::ERR) {
                        daemon.read(conn, &mut chunk);
                    }
                }
            }
        }
    }
}

struct EpollDaemon {
    epoll: std::os::fd::OwnedFd,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    topics: Topics,
}

struct Conn {
    stream: UnixStream,
    /// Bytes read after the last whole line.
    input: Vec<u8>,
    /// Bytes the socket has not taken yet; EPOLLOUT is armed while any.
    output: Vec<u8>,
}

impl EpollDaemon {
    fn accept(&mut self, listener: &UnixListener) -> anyhow::Result<()> {
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            stream.set_nonblocking(true)?;
            let conn = self.next_conn;
            self.next_conn += 1;
            self.topics.open(conn, &stream)?;
            epoll::add(
                &self.epoll,
                &stream,
                EventData::new_u64(conn),
                EventFlags::IN,
            )?;
            let conn_state = Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
            };
            self.conns.insert(conn, conn_state);
        }
    }

    /// Reads what `conn` sent, answers every whole line, and on end of
    /// file (or an error) closes it and promotes where it owned.
    fn read(&mut self, conn: u64, chunk: &mut [u8]) {
        let mut closed = false;
        let mut lines = Vec::new();
        {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            loop {
                match c.stream.read(chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if let Some(end) = c.input.iter().rposition(|&b| b == b'\n') {
                let rest = c.input.split_off(end + 1);
                lines = std::mem::replace(&mut c.input, rest);
            }
        }
        let mut out = Outgoing::new();
        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            self.topics.line(conn, line, &mut out);
        }
        if closed {
            // The descriptor leaves the epoll set when it is closed (dropped).
            self.conns.remove(&conn);
            self.topics.close(conn, &mut out);
        }
        for (to, line) in out {
            self.send(to, &line);
        }
    }

    /// Writes `line` to `conn` at once if nothing is queued before it;
    /// what the socket does not take waits for EPOLLOUT.
    fn send(&mut self, conn: u64, line: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.output.is_empty() {
            c.output.extend_from_slice(line);
            return;
        }
        let written = write_some(&mut c.stream, line);
        if written < line.len() {
            c.output.extend_from_slice(&line[written..]);
            let _ = epoll::modify(
                &self.epoll,
                &c.stream,
                EventData::new_u64(conn),
                EventFlags::IN | EventFlags::OUT,
            );
        }
    }

    fn flush(&mut self, conn: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let written = write_some(&mut c.stream, &c.output);
        c.output.drain(..written);
        if c.output.is_empty() {
            let _ = epoll::modify(
                &self.epoll,
                &c.stream,
                EventData::new_u64(conn),
                EventFlags::IN,
            );
        }
    }
}

/// Writes as much of `bytes` as the socket takes now. A broken socket
/// takes everything (the bytes are dropped): its end of file comes next.
fn write_some(stream: &mut UnixStream, bytes: &[u8]) -> usize {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return bytes.len(),
        }
    }
    written
}
