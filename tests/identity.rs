//! A connection's process is the one pinned when the daemon accepted it:
//! a track without `pid` is tied to that process, never to whichever
//! process is given its pid later, and a pid named from another pid
//! namespace (a container) is never looked up in the daemon's.
//!
//! Some parts of these scenarios need a process of their own: a client
//! that connects, forks and exits, leaving its socket to its child; a
//! whole scenario run inside a new pid namespace. For those this test
//! binary runs the same test again, with [`ROLE`] saying which part it
//! plays; the test that started it checks what it did.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use crate::common::{
    self, DEADLINE, Daemon, NOBODY, RawConnection, as_nobody, binary_for_nobody, error_code,
    start_daemon, within,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Set when this binary runs again to play one part of a scenario.
const ROLE: &str = "PRESENCE_IDENTITY_ROLE";
/// The socket the part connects to.
const SOCKET: &str = "PRESENCE_IDENTITY_SOCKET";

/// A client that connects, forks, and exits; its child keeps the socket.
const CONNECT_THEN_FORK: &str = "connect-then-fork";
/// The whole pid-reuse scenario, inside a new pid namespace.
const PID_REUSE_INSIDE: &str = "pid-reuse-inside";
/// The pid-reuse scenario with a stranger that is watched and started
/// within the same clock tick, inside a new pid namespace.
const SAME_TICK_INSIDE: &str = "same-tick-inside";

/// The track the forked child sends once told to: a `process` entry with
/// no `pid`, so tied to the connection's own process.
const TRACK_WITHOUT_PID: &[u8] =
    b"{\"id\":1,\"op\":\"track\",\"topic\":\"doc\",\"key\":\"b\",\"lifetime\":\"process\"}\n";

/// The part this run plays, if it is not the test itself.
fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// `program` (this test binary, or a copy of it) running only `test`, a
/// test of this module, as the part `role`, with its output printed as it
/// comes.
fn this_test(program: &mut Command, test: &str, role: &str) {
    program
        .args([
            &test_path(test),
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .arg("--test-threads=1")
        .env(ROLE, role);
}

/// The name the test harness knows `test` of this module by: its path in
/// the test binary without the binary's own name (`identity::test`), as
/// `--exact` wants it.
fn test_path(test: &str) -> String {
    let module = module_path!()
        .split_once("::")
        .map_or("", |(_, module)| module);
    format!("{module}::{test}")
}

/// Asserts that a run of this binary passed its one test: a filter that
/// matched nothing would pass too, having run nothing.
fn assert_passed(output: &std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
}

/// The [`CONNECT_THEN_FORK`] part: connect, make sure the daemon has
/// accepted the connection (a `ping` answered), fork a child that keeps
/// the socket, and exit. The child waits for a byte on stdin, sends
/// [`TRACK_WITHOUT_PID`], prints the reply as `reply: LINE`, and ends.
fn connect_then_fork() {
    let socket = std::env::var_os(SOCKET).expect("the socket is given");
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .write_all(b"{\"id\":0,\"op\":\"ping\"}\n")
        .expect("send a ping");
    let mut pong = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut pong)
        .expect("read the ping's reply");
    assert!(pong.contains("\"ok\":true"), "ping refused: {pong}");
    // SAFETY: the child copies only this thread; it makes nothing but
    // system calls on memory that exists before the fork (no allocation,
    // no lock), and ends by SIGKILL.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Parent { child } => println!("forked {child}"),
        nix::unistd::ForkResult::Child => {
            use std::os::fd::BorrowedFd;
            // SAFETY: stdin and stdout stay open for the life of the process.
            let (stdin, stdout) = unsafe { (BorrowedFd::borrow_raw(0), BorrowedFd::borrow_raw(1)) };
            track_when_told(&stream, stdin, stdout)
        }
    }
}

/// The forked child of a client that has exited: waits for a byte on
/// `stdin`, sends [`TRACK_WITHOUT_PID`] on `stream`, writes the reply to
/// `stdout` as `reply: LINE`, and ends. End of input instead of the byte
/// ends it at once. Makes nothing but system calls, so that it may run in
/// the fork of a process with threads.
fn track_when_told(
    stream: impl std::os::fd::AsFd,
    stdin: std::os::fd::BorrowedFd<'_>,
    stdout: std::os::fd::BorrowedFd<'_>,
) -> ! {
    let stream = stream.as_fd();
    let mut go = [0u8; 1];
    // End of input: the test is over without needing us.
    if rustix::io::read(stdin, &mut go) == Ok(1) && write_all(stream, TRACK_WITHOUT_PID) {
        let mut reply = [0u8; 4096];
        let mut len = 0;
        while len < reply.len() && !reply[..len].contains(&b'\n') {
            match rustix::io::read(stream, &mut reply[len..]) {
                Ok(0) | Err(_) => break,
                Ok(read) => len += read,
            }
        }
        let _ = write_all(stdout, b"reply: ") && write_all(stdout, &reply[..len]);
    }
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    unreachable!("SIGKILL ends the process")
}

fn write_all(fd: impl std::os::fd::AsFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::io::write(&fd, bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// A running [`CONNECT_THEN_FORK`] part, seen from the test.
struct ForkedClient {
    parent: Child,
    /// Read by the forked child: a byte tells it to track.
    go: ChildStdin,
    /// What the parent printed, then the child.
    lines: Lines<BufReader<ChildStdout>>,
}

impl ForkedClient {
    /// Starts `program`, this test binary or a copy, as that part.
    fn spawn(mut program: Command, test: &str, socket: &Path) -> ForkedClient {
        this_test(&mut program, test, CONNECT_THEN_FORK);
        program
            .env(SOCKET, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut parent = program.spawn().expect("the client starts");
        let go = parent.stdin.take().expect("piped stdin");
        let stdout = parent.stdout.take().expect("piped stdout");
        ForkedClient {
            parent,
            go,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Waits until the parent has forked and exited (and been reaped, so
    /// its pid is free); returns the parent's pid, the one its
    /// connection's peer credentials name.
    async fn parent_gone(&mut self) -> u32 {
        let pid = self.parent.id().expect("the client runs");
        let forked = self.line_after("forked ").await;
        let status = within("the client to exit", self.parent.wait())
            .await
            .expect("wait");
        assert!(status.success(), "the client failed: {status}");
        eprintln!("client {pid} forked {forked} and exited");
        pid
    }

    /// Tells the child to track without `pid`, and returns the reply.
    async fn track(&mut self) -> Value {
        self.go.write_all(b"g").await.expect("tell the child");
        self.go.flush().await.expect("flush");
        let reply = self.line_after("reply: ").await;
        serde_json::from_str(&reply).expect("the reply is JSON")
    }

    /// What follows `prefix` on the next output line that holds it (the
    /// test harness may have begun the line with the test's name).
    async fn line_after(&mut self, prefix: &str) -> String {
        within(&format!("a line `{prefix}…`"), async {
            loop {
                match self.lines.next_line().await.expect("read") {
                    Some(line) => match line.split_once(prefix) {
                        Some((_, rest)) => return rest.to_owned(),
                        None => eprintln!("client: {line}"),
                    },
                    None => panic!("the client's output ended before `{prefix}`"),
                }
            }
        })
        .await
    }
}

fn assert_refused_as_exited(reply: &Value) {
    assert_eq!(error_code(reply), "not_found", "{reply}");
    let message = reply["error"]["message"].as_str().expect("a message");
    assert!(message.contains("has exited"), "{message}");
}

#[tokio::test]
async fn a_track_without_pid_is_refused_once_the_connecting_process_has_exited() {
    const TEST: &str = "a_track_without_pid_is_refused_once_the_connecting_process_has_exited";
    if role().as_deref() == Some(CONNECT_THEN_FORK) {
        return connect_then_fork();
    }
    let daemon = Daemon::start().await;
    let program = Command::new(std::env::current_exe().expect("this test binary"));
    let mut client = ForkedClient::spawn(program, TEST, &daemon.socket);
    client.parent_gone().await;
    assert_refused_as_exited(&client.track().await);
}

/// Copies this test binary into `dir` for uid 65534 to run.
fn this_binary_for_nobody(dir: &Path) -> PathBuf {
    let copy = dir.join("identity-test");
    common::runnable_copy(&std::env::current_exe().expect("this test binary"), &copy);
    copy
}

/// Starts a long-lived process of root that gets `pid`, by telling the
/// kernel which pid this pid namespace handed out last
/// (`ns_last_pid`, as checkpoint/restore tools do). Another task may take
/// the pid first: a thread starting, here or in the daemon. If that one
/// has already ended, the next try is made; if it lives on (a blocking
/// pool's thread idles for seconds), the pid is not to be had, and `None`
/// says so, for the caller to begin again with another pid.
fn spawn_with_pid(pid: u32) -> Option<std::process::Child> {
    loop {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("set ns_last_pid");
        let mut stranger = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .expect("sleep spawns");
        if stranger.id() == pid {
            return Some(stranger);
        }
        end(&mut stranger);
        if Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("pid {pid} was taken by another task that is still running");
            return None;
        }
    }
}

/// The [`PID_REUSE_INSIDE`] part: the scenario itself, run as pid 1 of a
/// new pid namespace with its own /proc, so that the daemon, the client
/// and the stranger all see the same pids.
async fn pid_reuse_inside(test: &str) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let presence = binary_for_nobody(dir.path());
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let _daemon = start_daemon(as_nobody(&presence), &socket, &db, &[]).await;

    // A client of uid 65534 connects, forks, and exits; root's process
    // then takes the departed client's pid.
    let copy = this_binary_for_nobody(dir.path());
    let deadline = Instant::now() + DEADLINE;
    let (mut client, gone, mut stranger) = loop {
        let mut client = ForkedClient::spawn(as_nobody(&copy), test, &socket);
        let gone = client.parent_gone().await;
        if let Some(stranger) = spawn_with_pid(gone) {
            break (client, gone, stranger);
        }
        // Closing its input ends the client's child; another client tries.
        drop(client);
        assert!(
            Instant::now() < deadline,
            "no free pid was taken over in time"
        );
    };
    assert_ne!(
        std::fs::read_to_string(format!("/proc/{gone}/status"))
            .expect("the stranger's status")
            .lines()
            .find(|line| line.starts_with("Uid:"))
            .and_then(|line| line.split_whitespace().nth(1)),
        Some(NOBODY.to_string().as_str()),
        "the stranger is another user"
    );

    // The child, still holding the connection, tracks without a pid: the
    // connection's process has exited, and the stranger is not it.
    assert_refused_as_exited(&client.track().await);
    let mut raw = RawConnection::connect(&socket).await;
    let listed = raw.request(r#"{"id":2,"op":"list","topic":"doc"}"#).await;
    assert_eq!(listed["presences"], serde_json::json!({}), "{listed}");
    end(&mut stranger);
}

/// Runs `test` of this binary again, in the role `role`, inside a pid
/// namespace of its own with its own /proc, and checks that it passed.
async fn in_new_pid_namespace(test: &str, role: &str) -> std::process::Output {
    let mut inside = Command::new("unshare");
    inside
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(std::env::current_exe().expect("this test binary"));
    this_test(&mut inside, test, role);
    inside
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(2 * DEADLINE, inside.output())
        .await
        .expect("the scenario ends in time")
        .expect("unshare runs");
    assert_passed(&output, "the scenario in a new pid namespace");
    output
}

#[tokio::test]
#[ignore = "needs root: unshare, setpriv"]
async fn a_track_without_pid_is_never_tied_to_another_users_process_that_reused_the_pid() {
    const TEST: &str =
        "a_track_without_pid_is_never_tied_to_another_users_process_that_reused_the_pid";
    match role().as_deref() {
        Some(CONNECT_THEN_FORK) => return connect_then_fork(),
        Some(PID_REUSE_INSIDE) => return pid_reuse_inside(TEST).await,
        _ => {}
    }
    common::needs_root();
    in_new_pid_namespace(TEST, PID_REUSE_INSIDE).await;
}

/// A client of uid 65534 that connected, had its connection accepted,
/// forked and exited, all within a few milliseconds: the fork of this
/// process, with no `exec` (which alone would take longer than a tick of
/// the clock that start times count in). Its child keeps the connection
/// and tracks without `pid` when told.
struct QuickClient {
    pid: u32,
    /// Its start time, read while it was a zombie, before it was reaped.
    start_time: u64,
    /// A byte tells the child to track; closing it ends the child.
    go: std::io::PipeWriter,
    /// The child writes the track's reply here.
    replies: std::io::PipeReader,
}

impl QuickClient {
    fn start(socket: &Path) -> QuickClient {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
        // Everything the fork needs is made first: after it, the child
        // makes only system calls.
        let address = UnixAddr::new(socket).expect("socket address");
        let stream = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        // Closed on exec, so that no other process started meanwhile holds
        // an end.
        let (go_read, go_write) = std::io::pipe().expect("pipe");
        let (replies_read, replies_write) = std::io::pipe().expect("pipe");
        // SAFETY: the child makes nothing but system calls on what exists
        // before the fork (no allocation, no lock), and ends by `_exit` or
        // SIGKILL.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                quick_client(&stream, &address, &go_read, &go_write, &replies_write)
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop((stream, go_read, replies_write));
                let pid = u32::try_from(child.as_raw()).expect("a pid");
                use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
                waitid(Id::Pid(child), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                    .expect("wait for the client");
                let start_time = presenced::sys::process_start_time(pid).expect("its start time");
                let status = waitpid(child, None).expect("reap the client");
                assert_eq!(status, WaitStatus::Exited(child, 0), "the client failed");
                QuickClient {
                    pid,
                    start_time,
                    go: go_write,
                    replies: replies_read,
                }
            }
        }
    }

    /// Tells the child to track without `pid`, and returns the reply.
    async fn track(mut self) -> Value {
        use std::io::Read as _;
        tokio::task::spawn_blocking(move || {
            self.go.write_all(b"g").expect("tell the child");
            let mut said = String::new();
            self.replies
                .read_to_string(&mut said)
                .expect("read the reply");
            let reply = said.strip_prefix("reply: ").expect("a reply line");
            serde_json::from_str(reply.trim_end()).expect("the reply is JSON")
        })
        .await
        .expect("the reply")
    }
}

/// The fork of [`QuickClient::start`]: becomes uid 65534, connects, waits
/// for the answer to a `ping` (the daemon has accepted and pinned it),
/// forks the child that keeps the connection, and exits 0. Any failure
/// exits 1.
fn quick_client(
    stream: &std::os::fd::OwnedFd,
    address: &nix::sys::socket::UnixAddr,
    go_read: &std::io::PipeReader,
    go_write: &std::io::PipeWriter,
    replies: &std::io::PipeWriter,
) -> ! {
    use nix::libc;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let nobody = libc::c_long::from(NOBODY);
    // SAFETY: raw system calls, which act on this thread alone: the only
    // one the fork has. None of them touches memory.
    let became_nobody = unsafe {
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
            && libc::syscall(libc::SYS_setresgid, nobody, nobody, nobody) == 0
            && libc::syscall(libc::SYS_setresuid, nobody, nobody, nobody) == 0
    };
    let mut answer = [0u8; 256];
    let mut len = 0;
    let pinged = became_nobody
        && nix::sys::socket::connect(stream.as_raw_fd(), address).is_ok()
        && write_all(stream, b"{\"id\":0,\"op\":\"ping\"}\n")
        && loop {
            match rustix::io::read(stream, &mut answer[len..]) {
                Ok(0) | Err(_) => break false,
                Ok(read) => len += read,
            }
            if answer[..len].contains(&b'\n') || len == answer.len() {
                break answer[..len].windows(9).any(|w| w == b"\"ok\":true");
            }
        };
    if !pinged {
        // SAFETY: ends this process at once, as a fork's child should.
        unsafe { libc::_exit(1) }
    }
    // SAFETY: as for the fork that made this process.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Only the test may hold the writing end, so that closing it
            // ends this child.
            let _ = nix::unistd::close(go_write.as_raw_fd());
            track_when_told(stream, go_read.as_fd(), replies.as_fd())
        }
        // SAFETY: as above.
        Ok(nix::unistd::ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
        Err(_) => unsafe { libc::_exit(1) },
    }
}

/// The [`SAME_TICK_INSIDE`] part, run as pid 1 of a new pid namespace:
/// a client of uid 65534 connects, forks and exits, and root's process
/// takes its pid within the same tick of the clock, so that the two have
/// the same pid and start time. Root has an entry for its process, so the
/// daemon watches it. The client's child, still holding the connection,
/// tracks without a pid: that must not find root's watched process and
/// pass it for the connection's own.
async fn same_tick_inside() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let presence = binary_for_nobody(dir.path());
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let _daemon = start_daemon(as_nobody(&presence), &socket, &db, &[]).await;
    let mut root = RawConnection::connect(&socket).await;

    let deadline = Instant::now() + DEADLINE;
    let mut attempts = 0;
    let (client, mut stranger) = loop {
        attempts += 1;
        let client = QuickClient::start(&socket);
        if let Some(stranger) = spawn_with_pid(client.pid) {
            let started = presenced::sys::process_start_time(client.pid).expect("its start time");
            if started == client.start_time {
                break (client, stranger);
            }
            end(stranger);
        }
        // The pid was taken, or not within the same tick: the child ends
        // with its input, and another client tries.
        drop(client);
        assert!(
            Instant::now() < deadline,
            "no stranger started within the client's tick in {attempts} attempts"
        );
    };
    eprintln!(
        "client {} and the stranger both started at tick {} (attempt {attempts})",
        client.pid, client.start_time
    );

    // Root's entry for its process: the daemon now watches it.
    let track = format!(
        r#"{{"id":1,"op":"track","topic":"doc","key":"stranger","lifetime":"process","pid":{}}}"#,
        client.pid
    );
    let tracked = root.request(&track).await;
    assert_eq!(tracked["ok"], true, "{tracked}");

    assert_refused_as_exited(&client.track().await);
    let listed = root.request(r#"{"id":2,"op":"list","topic":"doc"}"#).await;
    let keys: Vec<&String> = listed["presences"]
        .as_object()
        .expect("presences")
        .keys()
        .collect();
    assert_eq!(keys, ["stranger"], "{listed}");
    end(&mut stranger);
}

fn end(mut process: impl std::borrow::BorrowMut<std::process::Child>) {
    let process = process.borrow_mut();
    let _ = process.kill();
    let _ = process.wait();
}

#[tokio::test]
#[ignore = "needs root: unshare, setpriv, ns_last_pid"]
async fn a_track_without_pid_is_never_tied_to_a_watched_process_that_took_the_pid_within_a_tick() {
    const TEST: &str =
        "a_track_without_pid_is_never_tied_to_a_watched_process_that_took_the_pid_within_a_tick";
    if role().as_deref() == Some(SAME_TICK_INSIDE) {
        return same_tick_inside().await;
    }
    common::needs_root();
    let output = in_new_pid_namespace(TEST, SAME_TICK_INSIDE).await;
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
#[ignore = "needs root: unshare"]
async fn a_pid_named_from_a_container_is_refused_unless_it_is_the_client_itself() {
    common::needs_root();
    let daemon = Daemon::start().await;
    // In a pid namespace of its own the client is pid 1, and a `sleep` it
    // started is pid 2; to the daemon, pids 1 and 2 are other processes.
    let mut client = Command::new("unshare");
    client
        .args(["--pid", "--fork", "sh", "-c"])
        .arg(r#"sleep 1000 & exec "$0" --socket "$1" --no-autostart raw"#)
        .arg(common::presence_bin())
        .arg(&daemon.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut client = client.spawn().expect("unshare spawns");
    let unshare = client.id().expect("unshare runs");
    let mut stdin = client.stdin.take().expect("piped stdin");
    let mut replies = BufReader::new(client.stdout.take().expect("piped stdout")).lines();
    let requests = [
        r#"{"id":1,"op":"track","topic":"doc","key":"its-sleep","pid":2}"#,
        r#"{"id":2,"op":"track","topic":"doc","key":"itself","pid":1}"#,
        r#"{"id":3,"op":"track","topic":"doc","key":"by-default"}"#,
    ];
    let mut answered = Vec::new();
    for request in requests {
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("send");
        let reply = within("a reply", replies.next_line())
            .await
            .expect("read")
            .expect("a reply line");
        answered.push(serde_json::from_str::<Value>(&reply).expect("JSON"));
    }

    assert_eq!(error_code(&answered[0]), "bad_request", "{}", answered[0]);
    let message = answered[0]["error"]["message"].as_str().expect("message");
    assert!(message.contains("pid namespace"), "{message}");
    assert_eq!(answered[1]["ok"], true, "{}", answered[1]);
    assert_eq!(answered[2]["ok"], true, "{}", answered[2]);

    // Both entries belong to the client, as the daemon numbers it: the
    // child of `unshare`, pid 1 in its own namespace.
    let mut raw = daemon.raw().await;
    let listed = raw.request(r#"{"id":4,"op":"list","topic":"doc"}"#).await;
    let presences = listed["presences"].as_object().expect("presences");
    assert_eq!(presences.len(), 2, "{listed}");
    for key in ["itself", "by-default"] {
        let pid = presences[key]["metas"][0]["pid"].as_u64().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.split_whitespace().collect::<Vec<_>>())
        };
        assert_eq!(field("PPid:"), Some(vec![unshare.to_string().as_str()]));
        assert_eq!(
            field("NSpid:"),
            Some(vec![pid.to_string().as_str(), "1"]),
            "{key}: pid {pid} is the client"
        );
    }
    drop(stdin);
    let _ = within("the client to end", client.wait()).await;
}
