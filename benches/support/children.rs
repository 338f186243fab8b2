//! The small processes the scenarios time. Each is this bench binary run
//! again with [`CHILD_ENV`] naming its part, so that the flock holder and
//! the topic owner are the same size of process, built the same way, and
//! neither starts a runtime it does not need.
//!
//! A child prints `ready` once it holds what it holds, releases it when a
//! byte arrives on its stdin, and exits when its stdin closes, so a bench
//! run that dies leaves no child behind.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use presenced::protocol::{Reply, Request, Role, TrackReply, TrackRequest, UntrackRequest};
use rustix::fs::{FlockOperation, flock};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use super::within;

/// Set in a child's environment to the part it plays.
pub const CHILD_ENV: &str = "PRESENCE_BENCH_CHILD";

/// The key the owner child tracks under.
pub const OWNER_KEY: &str = "owner";

/// Runs this process as the child [`CHILD_ENV`] names and exits, or
/// returns if this process is the bench itself.
pub fn run_if_child() {
    let Some(part) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match (part.to_str(), args.as_slice()) {
        (Some("flock"), [path]) => hold_flock(path),
        (Some("owner"), [socket, topic, how]) => own_topic(socket, topic, how),
        (Some("echo"), [socket]) => serve_echo(socket),
        (Some("ideal"), [socket, driver]) => super::ideal::serve(socket, driver, announce_ready),
        (Some("list-loop"), [socket]) => loop_list(socket),
        (Some("dbus-owner"), [socket, name]) => own_bus_name(socket, name),
        (Some("dbus-broker"), [dir]) => run_broker(dir),
        _ => Err(anyhow::anyhow!("unknown child {part:?} {args:?}")),
    };
    if let Err(e) = result {
        eprintln!("bench child {part:?}: {e:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Holds an exclusive flock on `path`; a byte on stdin unlocks it.
fn hold_flock(path: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    flock(&file, FlockOperation::LockExclusive)?;
    announce_ready()?;
    serve_stdin(|| Ok(flock(&file, FlockOperation::Unlock)?))
}

/// Owns `topic` over a plain blocking socket (no runtime, no client
/// library: the child stays as small as the flock holder); a byte on stdin
/// lets go of it `how`: `untrack`, or `close` (the connection closes while
/// the process lives on).
fn own_topic(socket: &str, topic: &str, how: &str) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    let track = Request::Track(TrackRequest::new(topic, OWNER_KEY));
    stream.write_all(&request_line(&track, 1)?)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    let reply: Reply = serde_json::from_str(&reply)?;
    if let Some(error) = reply.error {
        bail!("track refused: {error}");
    }
    let joined: TrackReply = serde_json::from_value(Value::Object(reply.fields))?;
    ensure!(
        joined.standing.role == Role::Owner,
        "the owner child is not the owner"
    );
    announce_ready()?;
    match how {
        "untrack" => {
            let untrack = Request::Untrack(UntrackRequest {
                topic: topic.to_owned(),
                phx_ref: Some(joined.phx_ref),
                key: None,
            });
            let untrack = request_line(&untrack, 2)?;
            // Its reply is never read: the timed moment is the spectator's event.
            serve_stdin(|| Ok(stream.write_all(&untrack)?))
        }
        "close" => {
            let mut stream = Some(stream);
            serve_stdin(|| {
                drop(stream.take());
                Ok(())
            })
        }
        other => bail!("the owner child cannot let go by {other:?}"),
    }
}

/// Owns the well-known `name` on the bus at `socket`; a byte on stdin
/// closes its bus connection while the process lives on.
fn own_bus_name(socket: &str, name: &str) -> anyhow::Result<()> {
    let mut bus = super::dbus::own_name(socket, name, announce_ready)?;
    serve_stdin(|| {
        drop(bus.take());
        Ok(())
    })
}

/// dbus-broker without systemd (see [`super::dbus::launch_broker`]): ready
/// once its socket listens; when stdin closes, the launcher is asked to
/// stop (it stops the broker) and waited for.
fn run_broker(dir: &str) -> anyhow::Result<()> {
    let mut launcher = super::dbus::launch_broker(std::path::Path::new(dir))?;
    announce_ready()?;
    let served = serve_stdin(|| Ok(()));
    let pid = Pid::from_raw(launcher.id() as i32);
    kill(pid, Signal::SIGTERM)?;
    launcher.wait()?;
    served
}

/// A request as the client library would write it: one line, with an id.
fn request_line(request: &Request, id: u64) -> anyhow::Result<Vec<u8>> {
    let mut fields = match serde_json::to_value(request)? {
        Value::Object(fields) => fields,
        other => bail!("request is not an object: {other}"),
    };
    fields.insert("id".into(), id.into());
    let mut line = serde_json::to_vec(&fields)?;
    line.push(b'\n');
    Ok(line)
}

/// The bare round trip baseline: a minimal tokio line echo on a Unix
/// socket, on a multi-threaded runtime as the daemon's io layer is.
fn serve_echo(socket: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(async { tokio::net::UnixListener::bind(socket) })?;
    announce_ready()?;
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo_lines(stream));
        }
    });
    // The runtime serves on its own threads; this one waits for stdin to close.
    serve_stdin(|| Ok(()))
}

async fn echo_lines(stream: tokio::net::UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    while read.read_until(b'\n', &mut line).await? > 0 {
        write.write_all(&line).await?;
        line.clear();
    }
    Ok(())
}

/// Asks for `list` of every topic again and again, reading each reply
/// whole and throwing it away: the load of a client that polls a large
/// daemon. Ready after the first reply; the loop runs on its own thread
/// until stdin closes.
fn loop_list(socket: &str) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut reply = Vec::new();
    let mut list = move |id: u64| -> anyhow::Result<()> {
        writer.write_all(format!("{{\"op\":\"list\",\"id\":{id}}}\n").as_bytes())?;
        reply.clear();
        reader.read_until(b'\n', &mut reply)?;
        ensure!(
            reply.starts_with(b"{\"id\":") && reply.ends_with(b"\n"),
            "not a whole list reply"
        );
        Ok(())
    };
    list(0)?;
    announce_ready()?;
    std::thread::spawn(move || {
        for id in 1.. {
            if let Err(e) = list(id) {
                eprintln!("bench child \"list-loop\": {e:#}");
                std::process::exit(1);
            }
        }
    });
    serve_stdin(|| Ok(()))
}

fn announce_ready() -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(b"ready\n")?;
    stdout.flush()
}

/// Calls `release` for each byte on stdin, and returns when stdin closes.
fn serve_stdin(mut release: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    for byte in std::io::stdin().lock().bytes() {
        byte?;
        release()?;
    }
    Ok(())
}

/// A child seen from the bench: started, and ready.
pub struct Helper {
    child: Child,
    stdin: ChildStdin,
    pid: Pid,
}

impl Helper {
    /// Starts this binary as child `part` with `args`, and waits until it
    /// says it is ready.
    pub async fn start(part: &str, args: &[&OsStr]) -> anyhow::Result<Helper> {
        Helper::spawn(Command::new(std::env::current_exe()?), part, args).await
    }

    async fn spawn(mut command: Command, part: &str, args: &[&OsStr]) -> anyhow::Result<Helper> {
        let mut child = command
            .args(args)
            .env(CHILD_ENV, part)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {part} child"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = within("a child to be ready", lines.next_line()).await??;
        ensure!(
            line.as_deref() == Some("ready"),
            "the {part} child did not start: {line:?}"
        );
        let stdin = child.stdin.take().context("child stdin")?;
        let pid = Pid::from_raw(child.id().context("child pid")? as i32);
        Ok(Helper { child, stdin, pid })
    }

    /// Starts this binary as child `part` with `args` under `wrapper` (a
    /// program and its arguments that run a command, as `unshare` does).
    pub async fn start_wrapped(
        wrapper: &[&str],
        part: &str,
        args: &[&OsStr],
    ) -> anyhow::Result<Helper> {
        let (program, wrapper_args) = wrapper.split_first().context("an empty wrapper")?;
        let mut command = Command::new(program);
        command.args(wrapper_args).arg(std::env::current_exe()?);
        Helper::spawn(command, part, args).await
    }

    /// SIGKILLs the child, and nothing else: the caller times what follows.
    pub fn kill(&self) -> anyhow::Result<()> {
        Ok(kill(self.pid, Signal::SIGKILL)?)
    }

    /// Asks the child to let go of what it holds, and returns at once.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        Ok(self.stdin.write_all(b"r").await?)
    }

    /// Closes the child's stdin, which ends it, and waits until it has
    /// cleaned up after itself and exited.
    pub async fn finish(self) -> anyhow::Result<()> {
        let Helper {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let status = within("a child to finish", child.wait()).await??;
        ensure!(status.success(), "a child exited with {status}");
        Ok(())
    }

    /// Ends the child, if it still runs, and reaps it.
    pub async fn reap(mut self) -> anyhow::Result<()> {
        Ok(within("a child to exit", self.child.kill()).await??)
    }
}
