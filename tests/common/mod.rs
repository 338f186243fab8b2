//! Shared harness for the end-to-end tests: a real daemon on a temporary
//! socket and database, real client processes, and waits that end on an
//! event or fail at a deadline. Nothing here sleeps and hopes.

#![allow(dead_code)] // each test binary uses a different part of this

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use presenced::client::{Client, Events};
use presenced::protocol::Event;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdout, Command};

/// How long a test's daemon may live. A daemon that hangs is killed then,
/// so a client call waiting on it fails instead of hanging the run.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// How long any single wait may take before the test fails. Generous,
/// because CI machines are small and noisy; a passing run never waits it out.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub fn presence_bin() -> &'static str {
    env!("CARGO_BIN_EXE_presence")
}

/// Awaits `future`, failing the test with `what` at the deadline.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// A daemon serving a socket and database in a private temporary folder.
pub struct Daemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub db: PathBuf,
    child: Child,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::start_with(&[]).await
    }

    /// Starts a daemon with extra `presence daemon` arguments and waits
    /// until it listens.
    pub async fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary folder");
        let socket = dir.path().join("run/presenced.sock");
        let db = dir.path().join("state/presence.db");
        let child = Daemon::spawn_daemon(&socket, &db, extra).await;
        Daemon {
            dir,
            socket,
            db,
            child,
        }
    }

    /// Stops the daemon with SIGTERM and starts a new one on the same
    /// socket and database.
    pub async fn restart(mut self, extra: &[&str]) -> Daemon {
        self.stop().await;
        self.start_again(extra).await;
        self
    }

    /// Stops the daemon with SIGTERM; it must exit 0.
    pub async fn stop(&mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        assert_eq!(self.wait().await, Some(0), "the daemon stops cleanly");
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub async fn crash(&mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGKILL);
        self.wait().await;
    }

    /// Starts a new daemon on the same socket and database, after `stop`
    /// or `crash`.
    pub async fn start_again(&mut self, extra: &[&str]) {
        self.child = Daemon::spawn_daemon(&self.socket, &self.db, extra).await;
    }

    async fn spawn_daemon(socket: &Path, db: &Path, extra: &[&str]) -> Child {
        let mut command = Command::new(presence_bin());
        command
            .arg("--socket")
            .arg(socket)
            .arg("daemon")
            .arg("--db")
            .arg(db)
            .arg("--ready-on-stdout")
            .args(extra)
            .env("PRESENCE_LOG", "warn");
        spawn_until_ready(command).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("daemon is running")
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        within("the daemon to exit", self.child.wait())
            .await
            .expect("wait")
            .code()
    }

    /// A `presence` command aimed at this daemon, never starting another.
    pub fn command(&self) -> Command {
        let mut command = Command::new(presence_bin());
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .env("PRESENCE_DB", &self.db)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Starts a `presence` subcommand and returns it with its stdout lines.
    pub fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(self.command().args(args))
    }

    pub async fn client(&self) -> (Client, Events) {
        within("connecting a client", Client::connect(&self.socket))
            .await
            .expect("client connects")
    }

    pub async fn raw(&self) -> RawConnection {
        RawConnection::connect(&self.socket).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Spawns a daemon command with stdout piped and waits for its `ready`.
/// A watchdog kills it after [`WATCHDOG`] if the test has not ended.
pub async fn spawn_until_ready(mut command: Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("daemon spawns");
    let stdout = child.stdout.take().expect("daemon stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = within("the daemon to listen", lines.next_line())
        .await
        .expect("daemon stdout is readable");
    assert_eq!(line.as_deref(), Some("ready"), "the daemon did not start");
    if let Some(pid) = child.id() {
        // The runtime, and this task with it, ends with the test.
        tokio::spawn(async move {
            tokio::time::sleep(WATCHDOG).await;
            eprintln!("watchdog: killing daemon {pid} after {WATCHDOG:?}");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
    }
    child
}

/// A running client process whose stdout is read line by line.
pub struct Running {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Running {
    pub fn spawn(command: &mut Command) -> Running {
        let mut child = command.spawn().expect("presence spawns");
        let stdout = child.stdout.take().expect("piped stdout");
        Running {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process is running")
    }

    /// The next line of output; fails the test at the deadline or on EOF.
    pub async fn line(&mut self) -> String {
        let line = within("a line of output", self.lines.next_line()).await;
        match line {
            Ok(Some(line)) => line,
            other => {
                let stderr = self.stderr_so_far().await;
                panic!("expected a line, got {other:?}; stderr: {stderr}")
            }
        }
    }

    /// The next line, parsed as JSON.
    pub async fn json(&mut self) -> serde_json::Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    pub fn sigkill(&mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGKILL);
    }

    pub fn sigterm(&mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        within("the process to exit", self.child.wait())
            .await
            .expect("wait")
            .code()
    }

    async fn stderr_so_far(&mut self) -> String {
        let Some(mut stderr) = self.child.stderr.take() else {
            return String::new();
        };
        let mut text = String::new();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text),
        )
        .await;
        text
    }
}

/// A small, long-lived process to own entries; killed when dropped.
pub fn spawn_sleeper() -> Child {
    Command::new("sleep")
        .arg("1000")
        .kill_on_drop(true)
        .spawn()
        .expect("sleep spawns")
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal sent");
}

/// A connection that speaks raw lines, for what the typed client will not
/// send: malformed JSON, over-long lines, forged fields.
pub struct RawConnection {
    reader: Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl RawConnection {
    pub async fn connect(socket: &Path) -> RawConnection {
        let stream = within("connecting", UnixStream::connect(socket))
            .await
            .expect("raw connect");
        let (read, writer) = stream.into_split();
        RawConnection {
            reader: BufReader::new(read).lines(),
            writer,
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The daemon may close mid-write once it has seen enough.
        let _ = self.writer.write_all(bytes).await;
    }

    /// The next line from the daemon, or `None` at EOF.
    pub async fn next(&mut self) -> Option<serde_json::Value> {
        let line = within("a line from the daemon", self.reader.next_line()).await;
        match line {
            Ok(Some(line)) => Some(serde_json::from_str(&line).expect("daemon sends JSON")),
            Ok(None) => None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Sends a request and returns the next line, which must be its reply.
    pub async fn request(&mut self, line: &str) -> serde_json::Value {
        self.send(line).await;
        self.next().await.expect("a reply")
    }
}

/// Waits for the next event that `select` picks out, skipping others.
pub async fn next_event<T>(events: &mut Events, mut select: impl FnMut(Event) -> Option<T>) -> T {
    within("an event", async {
        loop {
            let event = events.recv().await.expect("the event stream is open");
            if let Some(found) = select(event) {
                return found;
            }
        }
    })
    .await
}

/// The error code of a failed reply.
pub fn error_code(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["ok"], false, "expected an error reply: {reply}");
    reply["error"]["code"].as_str().expect("error code")
}
