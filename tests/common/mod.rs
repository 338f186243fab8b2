//! Shared harness for the end-to-end tests: a real daemon on a temporary
//! socket and database, real client processes, and waits that end on an
//! event or fail at a deadline. What announces itself nowhere (a file the
//! daemon puts back, a count in `status`) is polled every [`POLL`], still
//! under the deadline. Nothing here sleeps and hopes.

pub mod cluster;
pub mod etcd;
pub mod shared;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use presenced::client::{Client, Events};
use presenced::protocol::Event;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// How long a test's daemon may live. A daemon that hangs is killed then,
/// so a client call waiting on it fails instead of hanging the run.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// How long any single wait may take before the test fails. Generous,
/// because CI machines are small and noisy; a passing run never waits it out.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often [`eventually`] and [`connect_when_ready`] look again.
pub const POLL: Duration = Duration::from_millis(20);

/// The unprivileged uid (and gid) the tests that need a second user run as.
pub const NOBODY: u32 = 65534;

/// Fails the test unless it runs as root. A test marked `#[ignore =
/// "needs root…"]` calls it first: such a test runs only when asked for
/// (`cargo test -- --ignored`, as `.ci/run` does, as root and with every
/// tool installed), and asked for without what it needs it fails here,
/// saying so. No test returns early and passes for want of root or a
/// program.
///
/// This is also the one word on the `CI` environment variable: no test
/// reads it. Whether a test runs is `#[ignore]`'s and the runner's choice
/// alone (`--ignored`, `--include-ignored`), and a test does the same
/// under `CI=true` as on a developer's machine. A test that would need to
/// know belongs behind `#[ignore = "needs …"]` and these checks instead.
pub fn needs_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root; run it as root, as .ci/run does"
    );
}

/// [`needs_root`] for a program: fails the test, naming `program` and the
/// Debian package that has it, unless `program` is on `PATH`.
pub fn needs_program(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|folder| {
        std::fs::metadata(folder.join(program))
            .is_ok_and(|file| file.is_file() && file.permissions().mode() & 0o111 != 0)
    });
    assert!(
        found,
        "this test needs {program} on PATH (Debian: {package}); .ci/run installs it"
    );
}

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

/// Waits until `condition` holds, looking again every [`POLL`]; fails the
/// test with `what` at the deadline. For what the daemon announces nowhere.
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !condition().await {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

/// Connects a client to `socket`, failing at the deadline.
pub async fn connect(socket: &Path) -> (Client, Events) {
    within("connecting a client", Client::connect(socket))
        .await
        .expect("client connects")
}

/// Connects a client to `socket` as soon as a daemon listens there, trying
/// again every [`POLL`] until the deadline.
pub async fn connect_when_ready(socket: &Path) -> (Client, Events) {
    within("a daemon to listen on the socket", async {
        loop {
            if let Ok(connected) = Client::connect(socket).await {
                return connected;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// How a test's daemon starts, beyond [`Daemon::start_with`]'s arguments.
#[derive(Default)]
pub struct Options<'a> {
    /// The database; by default `state/presence.db` in the daemon's folder.
    pub db: Option<&'a Path>,
    /// A `PRESENCE_LOG` filter: the daemon's stderr is then read by the
    /// test (see [`Daemon::wait_for_log`]) instead of passed through at
    /// `warn`.
    pub log: Option<&'a str>,
    /// Extra `presence daemon` arguments.
    pub args: &'a [&'a str],
    /// A hard limit on the daemon's open files (`RLIMIT_NOFILE`), to run
    /// it out of descriptors.
    pub open_files: Option<u64>,
}

/// A daemon serving a socket and database in a private temporary folder.
pub struct Daemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub db: PathBuf,
    child: Child,
    /// The `PRESENCE_LOG` filter of a daemon whose log the test reads.
    log_filter: Option<String>,
    /// The log lines of the running daemon process, not yet waited past.
    log: Option<Mutex<UnboundedReceiver<String>>>,
    open_files: Option<u64>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::start_with(&[]).await
    }

    /// Starts a daemon with extra `presence daemon` arguments and waits
    /// until it listens.
    pub async fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_with_options(Options {
            args: extra,
            ..Options::default()
        })
        .await
    }

    /// Starts a daemon, logging at `warn`, whose log the test reads with
    /// [`Daemon::wait_for_log`].
    pub async fn start_logged(extra: &[&str]) -> Daemon {
        Daemon::start_with_options(Options {
            log: Some("warn"),
            args: extra,
            ..Options::default()
        })
        .await
    }

    /// Starts a daemon as `options` say and waits until it listens.
    pub async fn start_with_options(options: Options<'_>) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary folder");
        let socket = dir.path().join("run/presenced.sock");
        let db = match options.db {
            Some(db) => db.to_owned(),
            None => dir.path().join("state/presence.db"),
        };
        let log_filter = options.log.map(str::to_owned);
        let (child, log) = Daemon::spawn_child(
            &socket,
            &db,
            log_filter.as_deref(),
            options.open_files,
            options.args,
        )
        .await;
        Daemon {
            dir,
            socket,
            db,
            child,
            log_filter,
            log,
            open_files: options.open_files,
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
    /// or `crash`. If the test reads the log, it reads the new daemon's
    /// from its start.
    pub async fn start_again(&mut self, extra: &[&str]) {
        (self.child, self.log) = Daemon::spawn_child(
            &self.socket,
            &self.db,
            self.log_filter.as_deref(),
            self.open_files,
            extra,
        )
        .await;
    }

    async fn spawn_child(
        socket: &Path,
        db: &Path,
        log_filter: Option<&str>,
        open_files: Option<u64>,
        extra: &[&str],
    ) -> (Child, Option<Mutex<UnboundedReceiver<String>>>) {
        let mut command = daemon_command(Command::new(presence_bin()), socket, db);
        command.arg("--ready-on-stdout").args(extra);
        if let Some(limit) = open_files {
            limit_open_files(&mut command, limit);
        }
        let Some(filter) = log_filter else {
            return (spawn_ready(command, Stdio::inherit()).await, None);
        };
        command.env("PRESENCE_LOG", filter);
        let mut child = spawn_ready(command, Stdio::piped()).await;
        // Read all along, so that a full pipe can never stall the daemon.
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let (sender, receiver) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("daemon: {line}");
                let _ = sender.send(line);
            }
        });
        (child, Some(Mutex::new(receiver)))
    }

    /// Reads the daemon's log, from where the last wait stopped, until a
    /// line contains every one of `needles`, and returns that line. Fails
    /// at the deadline, or if the daemon's log ends first. Only for a
    /// daemon started with a log ([`Daemon::start_logged`],
    /// [`Options::log`]).
    pub async fn wait_for_log(&self, needles: &[&str]) -> String {
        let log = self
            .log
            .as_ref()
            .expect("wait_for_log needs a daemon started with a log");
        let what = format!("the daemon to log a line with {needles:?}");
        within(&what, async {
            let mut log = log.lock().await;
            loop {
                match log.recv().await {
                    Some(line) if needles.iter().all(|needle| line.contains(needle)) => {
                        return line;
                    }
                    Some(_) => {}
                    None => panic!("the daemon's log ended before {what}"),
                }
            }
        })
        .await
    }

    /// Every line the daemon logged since the last wait or read, without
    /// waiting for more. Only for a daemon started with a log.
    pub async fn log_so_far(&self) -> Vec<String> {
        let log = self
            .log
            .as_ref()
            .expect("log_so_far needs a daemon started with a log");
        let mut log = log.lock().await;
        std::iter::from_fn(|| log.try_recv().ok()).collect()
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
        let mut command = presence_command(&self.socket, &self.db);
        command.arg("--no-autostart");
        command
    }

    /// Starts a `presence` subcommand and returns it with its stdout lines.
    pub fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(self.command().args(args))
    }

    pub async fn client(&self) -> (Client, Events) {
        connect(&self.socket).await
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

/// Runs `command` with at most `limit` open files, soft and hard.
fn limit_open_files(command: &mut Command, limit: u64) {
    set_limit(command, rustix::process::Resource::Nofile, limit);
}

/// Runs `command` with at most `limit` processes and threads of its real
/// user (`RLIMIT_NPROC`), soft and hard: the kernel counts those the user
/// has already, wherever they run, and exempts root.
pub fn limit_processes(command: &mut Command, limit: u64) {
    set_limit(command, rustix::process::Resource::Nproc, limit);
}

fn set_limit(command: &mut Command, resource: rustix::process::Resource, limit: u64) {
    use rustix::process::{Rlimit, setrlimit};
    let rlimit = Rlimit {
        current: Some(limit),
        maximum: Some(limit),
    };
    // SAFETY: between fork and exec the closure only makes one system
    // call; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || setrlimit(resource, rlimit).map_err(Into::into));
    }
}

/// `presence --socket SOCKET`, with `PRESENCE_DB` set to `db`, its output
/// piped, and killed when dropped. Unlike [`Daemon::command`] it may start
/// a daemon itself.
pub fn presence_command(socket: &Path, db: &Path) -> Command {
    let mut command = Command::new(presence_bin());
    command
        .arg("--socket")
        .arg(socket)
        .env("PRESENCE_DB", db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// `PROGRAM --socket SOCKET daemon --db DB`, logging at `warn`. `program`
/// is `presence`, or [`as_nobody`] for a copy of it.
fn daemon_command(mut program: Command, socket: &Path, db: &Path) -> Command {
    program
        .arg("--socket")
        .arg(socket)
        .arg("daemon")
        .arg("--db")
        .arg(db)
        .env("PRESENCE_LOG", "warn");
    program
}

/// Starts `PROGRAM --socket SOCKET daemon --db DB --ready-on-stdout EXTRA`
/// and waits until it listens, for a daemon [`Daemon`] cannot be: another
/// uid's ([`as_nobody`]), or one on a socket path made beforehand.
pub async fn start_daemon(program: Command, socket: &Path, db: &Path, extra: &[&str]) -> Child {
    let mut command = daemon_command(program, socket, db);
    command.arg("--ready-on-stdout").args(extra);
    spawn_until_ready(command).await
}

/// Spawns a daemon command with stdout piped and waits for its `ready`.
/// A watchdog kills it after [`WATCHDOG`] if the test has not ended.
pub async fn spawn_until_ready(command: Command) -> Child {
    spawn_ready(command, Stdio::inherit()).await
}

/// [`spawn_until_ready`], with the daemon's stderr sent to `stderr`.
async fn spawn_ready(mut command: Command, stderr: Stdio) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = command.spawn().expect("daemon spawns");
    let stdout = child.stdout.take().expect("daemon stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = within("the daemon to listen", lines.next_line())
        .await
        .expect("daemon stdout is readable");
    if line.as_deref() != Some("ready") {
        let mut stderr = String::new();
        if let Some(mut piped) = child.stderr.take() {
            let read = tokio::io::AsyncReadExt::read_to_string(&mut piped, &mut stderr);
            let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
        }
        panic!("the daemon did not start: stdout {line:?}, stderr {stderr:?}");
    }
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

/// Runs `presence --socket SOCKET daemon --db DB` where it must refuse to
/// start, and returns what it said on stderr: exit status 1 and one line.
pub async fn refused_start(socket: &Path, db: &Path) -> String {
    refused_start_by(Command::new(presence_bin()), socket, db).await
}

/// [`refused_start`], run by `program`: `presence`, or [`as_nobody`].
pub async fn refused_start_by(program: Command, socket: &Path, db: &Path) -> String {
    let mut command = daemon_command(program, socket, db);
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = within("the daemon to refuse to start", command.output())
        .await
        .expect("presence runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(1),
        "the daemon should refuse: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

/// Gives `dir` to uid 65534 and puts the binary in it, so that uid can
/// run it wherever the checkout lives. Returns its path there.
pub fn binary_for_nobody(dir: &Path) -> PathBuf {
    binary_for(dir, NOBODY)
}

/// Gives `dir` to `uid` and group nogroup and puts the binary in it, so
/// that `uid` can run it wherever the checkout lives. Returns its path
/// there.
pub fn binary_for(dir: &Path, uid: u32) -> PathBuf {
    std::os::unix::fs::chown(dir, Some(uid), Some(NOBODY)).expect("chown");
    let binary = dir.join("presence");
    runnable_copy(Path::new(presence_bin()), &binary);
    binary
}

/// Puts `program` at `path`, mode 0755, for another uid to run where the
/// original is out of its reach. A hard link, or where the folders are on
/// different file systems a copy that `cp` writes: never a file written by
/// this process. The tests share it, and a child another test forks holds
/// every descriptor of this process until that child execs; running a
/// file open for writing fails (ETXTBSY).
pub fn runnable_copy(program: &Path, path: &Path) {
    if std::fs::hard_link(program, path).is_err() {
        let copied = std::process::Command::new("cp")
            .arg(program)
            .arg(path)
            .status()
            .expect("cp runs");
        assert!(
            copied.success(),
            "cp {} {}: {copied}",
            program.display(),
            path.display()
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `binary`, run through `setpriv` as uid and gid 65534 with no other
/// groups; arguments for `binary` follow.
pub fn as_nobody(binary: &Path) -> Command {
    as_user(binary, NOBODY)
}

/// `binary`, run through `setpriv` as `uid` with group nogroup (gid 65534)
/// and no other; arguments for `binary` follow.
pub fn as_user(binary: &Path, uid: u32) -> Command {
    needs_program("setpriv", "util-linux");
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(binary);
    command
}

/// A new pseudo-terminal: its master and its other end, to be a command's
/// terminal. Both are opened close-on-exec, as openpty(3) does not: a
/// child another test starts meanwhile (a daemon, a sleeper) would keep
/// an inherited end for its whole life, and reading the master would not
/// end when the command on its other end does.
pub fn pseudo_terminal() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags).expect("a pseudo-terminal");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let other_end = ioctl_tiocgptpeer(&master, flags).expect("the terminal's other end");
    (master, other_end)
}

/// The permission bits of `path` itself, not of what a symlink names.
pub fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// How many rows the database holds, as a fresh connection sees it.
pub fn rows_on_disk(db: &Path) -> i64 {
    let connection = rusqlite::Connection::open(db).expect("open the database");
    connection
        .query_row("SELECT count(*) FROM presences", [], |row| row.get(0))
        .expect("count the rows")
}

/// Whether a Unix socket is bound at `socket` and listening, as the
/// kernel's `/proc/net/unix` says: the file appears at `bind`, before
/// `listen`, and a connect in between is refused. Looking does not
/// connect, so a socket-activated service is not started by it.
pub fn listening(socket: &Path) -> bool {
    /// `__SO_ACCEPTCON`: the socket listens.
    const ACCEPTS: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let socket = socket.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(3) == Some(&ACCEPTS) && fields.get(7) == Some(&socket.as_ref())
    })
}

/// Pids of running `presence daemon` processes serving `socket`.
pub fn daemons_serving(socket: &Path) -> Vec<u32> {
    let socket = socket.to_string_lossy();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        // A zombie has an empty cmdline, so it does not count. Clients
        // start a daemon with `--socket=PATH`; tests with `--socket PATH`.
        let given_socket =
            |arg: &String| *arg == socket || arg.strip_prefix("--socket=") == Some(socket.as_ref());
        if args.iter().any(|a| a == "daemon") && args.iter().any(given_socket) {
            found.push(pid);
        }
    }
    found
}

/// Kills, when the test ends, pass or fail, every daemon serving a socket:
/// those clients started run in their own session, beyond the reach of
/// [`Daemon`] and the watchdog.
pub struct KillDaemonsOnDrop(pub PathBuf);

impl Drop for KillDaemonsOnDrop {
    fn drop(&mut self) {
        for pid in daemons_serving(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
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

    /// Bytes sent on this connection that the daemon has not read yet
    /// (`SIOCOUTQ`: a Unix socket's sender is charged for them until the
    /// receiver takes them).
    pub fn unread_by_daemon(&self) -> usize {
        use rustix::ioctl::{Getter, Opcode, ioctl};
        const SIOCOUTQ: Opcode = 0x5411;
        let stream: &UnixStream = self.writer.as_ref();
        // SAFETY: SIOCOUTQ writes one int.
        let queued = unsafe { ioctl(stream, Getter::<SIOCOUTQ, std::ffi::c_int>::new()) };
        usize::try_from(queued.expect("SIOCOUTQ")).unwrap_or(0)
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

/// Runs a command to its end, with its output captured.
pub async fn finish(command: &mut Command) -> std::process::Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    within("presence to finish", command.output())
        .await
        .expect("presence runs")
}

/// A finished command's standard output, as text.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Daemon {
    /// Runs `presence ARGS` against this daemon to its end.
    pub async fn output(&self, args: &[&str]) -> std::process::Output {
        finish(self.command().args(args)).await
    }

    /// A script's queue on `topic`: key `a` joins for `owner_pid` and owns
    /// it, then key `b` joins for `waiter_pid` with `--detach
    /// --wait-owner` and is returned still waiting for its turn, its first
    /// line unread.
    pub async fn detached_owner_and_waiter(
        &self,
        topic: &str,
        owner_pid: &str,
        waiter_pid: &str,
    ) -> Running {
        let owner = self
            .output(&["join", topic, "--detach", "--key", "a", "--pid", owner_pid])
            .await;
        assert_eq!(owner.status.code(), Some(0), "{owner:?}");
        self.spawn(&[
            "join",
            topic,
            "--detach",
            "--wait-owner",
            "--key",
            "b",
            "--pid",
            waiter_pid,
        ])
    }
}

/// A subscriber's view of one topic, rebuilt from the events it was sent
/// (raw lines or `watch --json`) the way a client applies `presence_state`
/// and `presence_diff`: ref → seq, and the owner's ref.
#[derive(Debug, Default, PartialEq)]
pub struct View {
    pub seqs: BTreeMap<String, u64>,
    pub owner: Option<String>,
}

impl View {
    pub fn apply(&mut self, event: &Value) {
        let metas = |presences: &Value| -> Vec<(String, u64)> {
            presences
                .as_object()
                .into_iter()
                .flat_map(|keys| keys.values())
                .flat_map(|presence| presence["metas"].as_array().cloned().unwrap_or_default())
                .map(|meta| {
                    let phx_ref = meta["phx_ref"].as_str().expect("phx_ref").to_owned();
                    (phx_ref, meta["seq"].as_u64().expect("seq"))
                })
                .collect()
        };
        match event["event"].as_str() {
            Some("presence_state") => self.seqs = metas(&event["payload"]).into_iter().collect(),
            Some("presence_diff") => {
                for (phx_ref, _) in metas(&event["payload"]["leaves"]) {
                    self.seqs.remove(&phx_ref);
                }
                self.seqs.extend(metas(&event["payload"]["joins"]));
            }
            other => panic!("not a presence event: {other:?} in {event}"),
        }
        self.owner = event["owner"]["phx_ref"].as_str().map(str::to_owned);
    }

    /// What the daemon's `list` says right now, in the same shape.
    pub async fn listed(daemon: &Daemon, topic: &str) -> View {
        let (client, _events) = daemon.client().await;
        let listed = client.list(topic).await.expect("list");
        View {
            seqs: listed
                .state
                .presences
                .values()
                .flat_map(|presence| &presence.metas)
                .map(|meta| (meta.phx_ref.clone(), meta.seq))
                .collect(),
            owner: listed.state.owner.map(|owner| owner.phx_ref),
        }
    }
}

/// A process's resident memory (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_ascii_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

/// Runs `systemd-analyze verify` on the units of `scope` (`user` or
/// `system`), in the environment `configure` sets, and fails unless it
/// passes without a word: a misspelt key is only a warning to verify, and
/// an error here.
pub fn assert_units_verify(
    scope: &str,
    units: &[PathBuf],
    configure: impl FnOnce(&mut std::process::Command),
) {
    needs_program("systemd-analyze", "systemd");
    let mut verify = std::process::Command::new("systemd-analyze");
    if scope == "user" {
        verify.arg("--user");
    }
    verify.arg("verify").args(units);
    configure(&mut verify);
    let output = verify.output().expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "the {scope} units: {said}"
    );
}
