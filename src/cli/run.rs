//! `presence run`: a command that runs only while its entry owns a topic,
//! as `flock(1)` runs one while it holds a lock.
//!
//! How the entry is tied to the command. The entry must belong to the
//! command's own process (`lifetime: "process"` naming its pid), so that
//! the daemon removes it the moment that process dies, whatever kills it.
//! But the pid exists only once the process does, and the command must not
//! start before the entry owns the topic. So the child is forked first and
//! held back before `exec`: in `pre_exec` it reports its pid on one pipe
//! and blocks reading a second one (the gate). `presence` tracks the entry
//! with that pid, waits in line, and writes one byte to the gate once the
//! entry owns the topic; only then does the child `exec` CMD, in the same
//! process, so the pid and the entry stay the same. If `presence` gives up
//! instead (`--no-wait`, `--timeout`, a signal, a lost daemon), it closes
//! the gate: the child reads end of file and exits without running CMD.
//!
//! `std::process::Command::spawn` returns only after the child has
//! `exec`ed, so the child is spawned on a thread of its own, which then
//! waits for it and reports its exit status. That thread lives as long as
//! the child, which matters: the child asks, with `PR_SET_PDEATHSIG`, for
//! SIGTERM when the thread that forked it ends. So a `kill -9` of
//! `presence` ends the command too, and with it the entry; a `kill -9` of
//! the command ends the entry at once, and `presence` exits 137.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::Signal as NixSignal;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;

use super::{NewEntryArgs, Outcome, Target, failed, render};
use crate::client::SessionEvent;
use crate::protocol::{Event, Lifetime, Role};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub entry: NewEntryArgs,

    /// Wait in line until the entry owns the topic (the default)
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,

    /// Exit 1 at once, without running CMD, if someone else owns the topic
    #[arg(long, overrides_with = "wait")]
    pub no_wait: bool,

    /// Give up waiting after this many seconds: leave the queue and exit 1
    /// without running CMD
    #[arg(long, value_name = "SECONDS", value_parser = super::seconds_up_to(365.0 * 86_400.0))]
    pub timeout: Option<Duration>,

    /// The command to run as the owner, and its arguments
    #[arg(last = true, required = true, value_name = "CMD", value_parser = clap::value_parser!(OsString))]
    pub command: Vec<OsString>,
}

/// A line on stderr; a stderr that is gone must not end `run` before it
/// has dealt with its command.
macro_rules! tell {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "presence: {}", format_args!($($arg)*));
    }};
}

/// The status `run` exits with when it gives up before running CMD, as
/// `flock -n` and `flock -w` do.
const EXIT_GAVE_UP: u8 = 1;

pub async fn run(target: &Target, args: RunArgs) -> anyhow::Result<Outcome> {
    let mut signals = Signals::install()?;
    let mut child = Held::spawn(&args.command).await?;
    let program = args.command[0].to_string_lossy().into_owned();

    let joining = async {
        let (session, events) = target.session().await?;
        let tracked = session
            .track(args.entry.track_request(Some(child.pid), Lifetime::Process))
            .await
            .map_err(|e| failed(&format!("could not join {}", args.entry.topic), e))?;
        anyhow::Ok((session, events, tracked))
    };
    let (session, mut events, tracked) = tokio::select! {
        joined = joining => match joined {
            Ok(joined) => joined,
            Err(e) => {
                child.cancel().await;
                return Err(e);
            }
        },
        signal = signals.recv() => {
            child.cancel().await;
            return Ok(Outcome::Status(128 + signal as u8));
        }
    };

    // Waiting in line. The child is still held at the gate.
    let mut role = tracked.standing.role;
    let mut give_up: Option<Pin<Box<tokio::time::Sleep>>> = args
        .timeout
        .map(|timeout| Box::pin(tokio::time::sleep(timeout)));
    let mut owner = render::owner(tracked.standing.owner.as_ref());
    let waited = loop {
        if role == Role::Owner {
            break Waited::Owner;
        }
        if args.no_wait {
            tell!(
                "{} is owned by {}; not running {} (--no-wait)",
                args.entry.topic,
                owner,
                render::visible(&program)
            );
            break Waited::GaveUp;
        }
        tokio::select! {
            event = events.recv() => match news(event, &args.entry.topic) {
                Ok(News::Role(new_role, new_owner)) => {
                    role = new_role;
                    owner = new_owner;
                }
                Ok(News::Removed(by)) => {
                    tell!("the entry on {} was {by} before {} started", args.entry.topic, render::visible(&program));
                    break Waited::Removed;
                }
                Ok(News::Nothing) => {}
                Err(e) => break Waited::Failed(e),
            },
            signal = signals.recv() => break Waited::Signal(signal),
            status = child.exited() => {
                break Waited::Failed(anyhow::anyhow!(
                    "the process held for {} ended before it could run ({}); it was not run",
                    render::visible(&program),
                    describe(&status)
                ));
            }
            () = wait_or_never(&mut give_up) => {
                tell!(
                    "still not the owner of {} after {} s; not running {}",
                    args.entry.topic,
                    args.timeout.unwrap_or_default().as_secs_f64(),
                    render::visible(&program)
                );
                break Waited::GaveUp;
            }
        }
    };
    let gave_up = match waited {
        Waited::Owner => None,
        Waited::GaveUp => Some(Ok(Outcome::Status(EXIT_GAVE_UP))),
        Waited::Signal(signal) => Some(Ok(Outcome::Status(128 + signal as u8))),
        Waited::Removed => Some(Ok(Outcome::Removed)),
        Waited::Failed(e) => Some(Err(e)),
    };
    if let Some(outcome) = gave_up {
        child.cancel().await;
        leave_within_bounds(&session, &args.entry.topic).await;
        return outcome;
    }

    // The owner: let CMD start, and pass signals on until it ends.
    child.open_gate();
    loop {
        tokio::select! {
            status = child.exited() => {
                leave_within_bounds(&session, &args.entry.topic).await;
                return match status {
                    Ok(status) => Ok(Outcome::Status(exit_status(status))),
                    Err(e) => {
                        tell!("cannot run {}: {e}", render::visible(&program));
                        Ok(Outcome::Status(127))
                    }
                };
            }
            signal = signals.recv() => child.signal(signal),
            event = events.recv() => {
                let lost = match news(event, &args.entry.topic) {
                    Ok(News::Nothing) | Ok(News::Role(Role::Owner, _)) => continue,
                    Ok(News::Role(Role::Spectator, owner)) => Err(anyhow::anyhow!(
                        "the entry on {} lost ownership to {owner} while {} ran; it was sent SIGTERM",
                        args.entry.topic, render::visible(&program)
                    )),
                    Ok(News::Removed(by)) => {
                        tell!(
                            "the entry on {} was {by}; {} was sent SIGTERM",
                            args.entry.topic, render::visible(&program)
                        );
                        Ok(Outcome::Removed)
                    }
                    Err(e) => Err(e.context(format!("{} was sent SIGTERM", render::visible(&program)))),
                };
                child.signal(NixSignal::SIGTERM);
                // A command that ignores SIGTERM must not go on as an owner
                // it no longer is: it gets SIGKILL after a grace.
                if tokio::time::timeout(LOST_OWNER_GRACE, child.exited()).await.is_err() {
                    child.signal(NixSignal::SIGKILL);
                    let _ = child.exited().await;
                }
                leave_within_bounds(&session, &args.entry.topic).await;
                return lost;
            }
        }
    }
}

/// How long a command that lost its ownership has, after SIGTERM, to end
/// before it gets SIGKILL.
const LOST_OWNER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How waiting in line ended.
enum Waited {
    Owner,
    /// `--no-wait` or `--timeout`.
    GaveUp,
    Signal(NixSignal),
    Removed,
    Failed(anyhow::Error),
}

/// The exit status of the command, as a shell gives it: 128 + N for a
/// signal.
fn exit_status(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    }
}

/// What one session event means for the entry.
enum News {
    Nothing,
    /// Its role and the owner's name.
    Role(Role, String),
    /// Removed, by whom in words.
    Removed(String),
}

fn news(event: Option<SessionEvent>, topic: &str) -> anyhow::Result<News> {
    match event {
        Some(SessionEvent::Event(Event::Role { payload, .. })) => Ok(News::Role(
            payload.standing.role,
            render::owner(payload.standing.owner.as_ref()),
        )),
        // The session's only entry is this one: any removal is of it.
        Some(SessionEvent::Event(Event::Removed { topic: on, payload })) if on == topic => {
            Ok(News::Removed(format!(
                "removed by {} (uid {}, pid {})",
                render::visible(&payload.by.user),
                payload.by.uid,
                payload.by.pid
            )))
        }
        Some(SessionEvent::Event(_)) => Ok(News::Nothing),
        Some(SessionEvent::Retracked { reply, .. }) => Ok(News::Role(
            reply.standing.role,
            render::owner(reply.standing.owner.as_ref()),
        )),
        Some(SessionEvent::Dropped { error, .. }) => {
            anyhow::bail!("lost the presence on {topic}: {error}")
        }
        Some(SessionEvent::Lost { reason }) => anyhow::bail!("{reason}"),
        Some(
            SessionEvent::Disconnected { .. }
            | SessionEvent::Reconnected
            | SessionEvent::Unsubscribed { .. }
            | SessionEvent::ResubscribedToAll { .. },
        ) => Ok(News::Nothing),
        None => anyhow::bail!("the session with the daemon ended"),
    }
}

/// How long leaving may take before the command gives up on it.
const LEAVE_DEADLINE: Duration = Duration::from_secs(2);

/// Leaves the topic, so that the next in line is promoted now rather than
/// when the daemon sees the process go.
async fn leave_within_bounds(session: &crate::client::Session, topic: &str) {
    if tokio::time::timeout(LEAVE_DEADLINE, session.leave_all())
        .await
        .is_err()
    {
        let _ = writeln!(
            std::io::stderr(),
            "presence: could not leave {topic} in time; `presence list {topic}` shows \
             whether the entry is still there"
        );
    }
}

async fn wait_or_never(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The child: forked, held at the gate until it may `exec` CMD.
struct Held {
    pid: u32,
    /// The gate's write end; dropping it without a byte sent makes the
    /// child exit without running CMD.
    gate: Option<std::io::PipeWriter>,
    /// The child's exit, from the thread that spawned and waits for it;
    /// an error if it could not be run.
    exit: Option<oneshot::Receiver<std::io::Result<ExitStatus>>>,
    /// The exit, once heard.
    status: Option<Result<ExitStatus, String>>,
}

impl Held {
    async fn spawn(argv: &[OsString]) -> anyhow::Result<Held> {
        let Some((program, rest)) = argv.split_first() else {
            anyhow::bail!("no command to run; give one after --");
        };
        let (gate_read, gate_write) = std::io::pipe()?;
        let (mut pid_read, pid_write) = std::io::pipe()?;
        let fds = GateFds {
            gate_read: gate_read.as_raw_fd(),
            gate_write: gate_write.as_raw_fd(),
            pid_read: pid_read.as_raw_fd(),
            pid_write: pid_write.as_raw_fd(),
            parent: std::process::id(),
        };
        let mut command = std::process::Command::new(program);
        command.args(rest);
        // SAFETY: the closure makes only async-signal-safe system calls
        // (close, prctl, getppid, getpid, write, sigaction, read) and
        // allocates nothing: its errors are bare OS error codes, since a
        // boxed message could take the allocator's lock that another
        // thread held at the fork.
        unsafe {
            command.pre_exec(move || fds.hold());
        }
        let (tell, mut exit) = oneshot::channel();
        let child_ends: (OwnedFd, OwnedFd) = (gate_read.into(), pid_write.into());
        std::thread::Builder::new()
            .name("presence-run-child".to_owned())
            .spawn(move || {
                let spawned = command.spawn();
                drop(child_ends);
                let _ = tell.send(spawned.and_then(|mut child| child.wait()));
            })?;
        let mut pid = [0u8; 4];
        match pid_read.read_exact(&mut pid) {
            Ok(()) => {}
            Err(_) => {
                // The fork failed: the thread says why. Awaited, not
                // received blocking: this runs inside the runtime.
                let why = (&mut exit)
                    .await
                    .map_or_else(|_| "unknown".to_owned(), |r| describe(&r));
                anyhow::bail!("cannot start {}: {why}", program.to_string_lossy());
            }
        }
        Ok(Held {
            pid: u32::from_ne_bytes(pid),
            gate: Some(gate_write),
            exit: Some(exit),
            status: None,
        })
    }

    /// Lets the child `exec` CMD.
    fn open_gate(&mut self) {
        if let Some(mut gate) = self.gate.take() {
            // A child that is gone is reported by `exited`.
            let _ = gate.write_all(b"1");
        }
    }

    /// Resolves when the child has exited (again and again once it has).
    async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        if self.status.is_none() {
            let heard = match self.exit.as_mut() {
                Some(exit) => exit.await,
                None => return std::future::pending().await,
            };
            self.exit = None;
            self.status = Some(match heard {
                Ok(Ok(status)) => Ok(status),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("its thread ended".to_owned()),
            });
        }
        match &self.status {
            Some(Ok(status)) => Ok(*status),
            Some(Err(e)) => Err(std::io::Error::other(e.clone())),
            None => std::future::pending().await,
        }
    }

    /// Passes a signal on, unless the child has been reaped (its pid may
    /// be someone else's by now).
    fn signal(&mut self, signal: NixSignal) {
        if self.status.is_none()
            && let Some(exit) = &self.exit
            && exit.is_empty()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Closes the gate without letting CMD run, and waits for the child to
    /// go.
    async fn cancel(&mut self) {
        self.gate = None;
        let _ = self.exited().await;
    }
}

/// The pipe ends, as the child sees them between fork and exec.
#[derive(Clone, Copy)]
struct GateFds {
    gate_read: RawFd,
    gate_write: RawFd,
    pid_read: RawFd,
    pid_write: RawFd,
    parent: u32,
}

impl GateFds {
    /// Runs in the child after fork: reports the pid, then blocks until
    /// `presence` opens the gate. An error keeps CMD from running.
    fn hold(self) -> std::io::Result<()> {
        use nix::sys::signal::{SigHandler, signal};
        // SAFETY: these descriptors are the child's copies, closed once;
        // the parent's copies stay open.
        unsafe {
            nix::libc::close(self.gate_write);
            nix::libc::close(self.pid_read);
        }
        // The signals `presence` catches have its handlers here until
        // exec; a `kill` of the waiting child must end it.
        for caught in [
            NixSignal::SIGINT,
            NixSignal::SIGTERM,
            NixSignal::SIGHUP,
            NixSignal::SIGQUIT,
        ] {
            // SAFETY: restoring the default disposition is always sound.
            unsafe { signal(caught, SigHandler::SigDfl) }.map_err(std::io::Error::from)?;
        }
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
        if std::os::unix::process::parent_id() != self.parent {
            return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        let pid = std::process::id().to_ne_bytes();
        // SAFETY: a write of a local buffer to a descriptor we own.
        let wrote = unsafe { nix::libc::write(self.pid_write, pid.as_ptr().cast(), pid.len()) };
        if wrote != 4 {
            return Err(std::io::Error::last_os_error());
        }
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: a read into a local buffer from a descriptor we own.
            let read = unsafe { nix::libc::read(self.gate_read, byte.as_mut_ptr().cast(), 1) };
            match read {
                1 => return Ok(()),
                -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
                }
                // Not the owner: the gate closed unopened.
                _ => return Err(std::io::Error::from_raw_os_error(nix::libc::ECANCELED)),
            }
        }
    }
}

/// The signals `run` passes on to CMD.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    quit: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn recv(&mut self) -> NixSignal {
        tokio::select! {
            _ = self.interrupt.recv() => NixSignal::SIGINT,
            _ = self.terminate.recv() => NixSignal::SIGTERM,
            _ = self.hangup.recv() => NixSignal::SIGHUP,
            _ = self.quit.recv() => NixSignal::SIGQUIT,
        }
    }
}
