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
//! the command ends the entry at once, and `presence` exits 137. The
//! kernel clears the parent-death signal when CMD is set-user-ID or
//! set-group-ID, or changes its own user: such a CMD outlives a `kill -9`
//! of `presence`, and owns the topic until it ends. Nothing left in
//! `presence` could end it then; the docs say so.
//!
//! Signals. A terminal sends Ctrl-C to its whole foreground process group,
//! `presence` and the child alike, while a `kill` of `presence`'s pid
//! reaches `presence` alone. CMD must get each signal once, so `presence`
//! reads its signals with the siginfo that tells the two apart (see
//! [`Signals`]) and passes on only those CMD did not get already. It passes
//! them through a pidfd opened before the child could be reaped, so that
//! no signal ever goes to another process given the child's pid since.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::{SigSet, SigmaskHow, Signal as NixSignal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::args::duration_up_to;
use super::entries::NewEntryArgs;
use super::errors::failed;
use super::join::{self, leave_within_bounds, wait_or_never};
use super::outcome::Outcome;
use super::render;
use super::target::Target;
use crate::client::SessionEvent;
use crate::protocol::{Event, Lifetime, Role, Standing};
use crate::sys::ExitWatch;

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

    /// Give up waiting after this long (seconds, or 30s, 5m): leave the
    /// queue and exit 1 without running CMD
    #[arg(long, value_name = "DURATION", value_parser = duration_up_to(365.0 * 86_400.0))]
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
    // First, while the runtime's thread is the only one: see [`Signals`].
    let mut signals = Signals::install()?;
    let mut child = Held::spawn(&args.command, signals.started_with).await?;
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
                // A Ctrl-C ends the held child too, and the join of a
                // process that is gone fails: the Ctrl-C is the news.
                if let Some(signal) = child.killed_by()
                    && signals.received_too(signal)
                {
                    return Ok(Outcome::Status(128 + signal as u8));
                }
                return Err(e);
            }
        },
        received = signals.recv() => {
            child.cancel().await;
            return Ok(Outcome::Status(128 + received.signal as u8));
        }
    };

    // Waiting in line. The child is still held at the gate.
    let mut role = tracked.standing.role;
    let mut give_up: Option<Pin<Box<tokio::time::Sleep>>> = args
        .timeout
        .map(|timeout| Box::pin(tokio::time::sleep(timeout)));
    let mut owner = render::owner(tracked.standing.owner.as_ref());
    let mut suspended = tracked.standing.suspended;
    let waited = loop {
        if role == Role::Owner {
            break Waited::Owner;
        }
        if args.no_wait {
            if suspended {
                tell!(
                    "the entry on {} is {}; not running {} (--no-wait)",
                    args.entry.topic,
                    render::SUSPENDED,
                    render::visible(&program)
                );
            } else {
                tell!(
                    "{} is owned by {}; not running {} (--no-wait)",
                    args.entry.topic,
                    owner,
                    render::visible(&program)
                );
            }
            break Waited::GaveUp;
        }
        tokio::select! {
            event = events.recv() => match news(event, &args.entry.topic) {
                Ok(News::Role(new_role, new_owner)) => {
                    role = new_role;
                    owner = new_owner;
                    suspended = false;
                }
                // First in line, but it may not own before etcd returns.
                Ok(News::Suspended) => {
                    role = Role::Spectator;
                    suspended = true;
                }
                Ok(News::Removed(by)) => {
                    tell!("the entry on {} was {by} before {} started", args.entry.topic, render::visible(&program));
                    break Waited::Removed;
                }
                Ok(News::Nothing) => {}
                Err(e) => break Waited::Failed(e),
            },
            received = signals.recv() => break Waited::Signal(received.signal),
            status = child.exited() => match child.killed_by() {
                Some(signal) => break Waited::Killed(signal),
                None => break Waited::Failed(anyhow::anyhow!(
                    "the process held for {} ended before it could run ({}); it was not run",
                    render::visible(&program),
                    describe(&status)
                )),
            },
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
        Waited::Killed(signal) => {
            // A Ctrl-C (or a kill of the process group) kills the held
            // child and tells `presence` alike, and the status is a
            // shell's for it whichever is heard first: the kernel queues
            // the signal for every member of the group before any of them
            // can finish dying, so `presence`'s copy is there to read by
            // the time the child's death is heard. A signal for the held
            // child alone is told.
            if !signals.received_too(signal) {
                tell!(
                    "the process held for {program} was killed by {} before it could run; \
                     {program} was not run",
                    signal.as_str(),
                    program = render::visible(&program)
                );
            }
            Some(Ok(Outcome::Status(128 + signal as u8)))
        }
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
                        Ok(Outcome::Status(cannot_exec_status(&e)))
                    }
                };
            }
            received = signals.recv() => {
                if !child.got_already(received) {
                    child.signal(received.signal);
                }
            }
            event = events.recv() => {
                let lost = match news(event, &args.entry.topic) {
                    Ok(News::Nothing) | Ok(News::Role(Role::Owner, _)) => continue,
                    Ok(News::Role(Role::Spectator, owner)) => Err(anyhow::anyhow!(
                        "the entry on {} lost ownership to {owner} while {} ran; it was sent SIGTERM",
                        args.entry.topic, render::visible(&program)
                    )),
                    // Still first in line, but not the owner until etcd
                    // returns: the command must not go on writing.
                    Ok(News::Suspended) => Err(anyhow::anyhow!(
                        "the entry on {} was {} while {} ran; it was sent SIGTERM",
                        args.entry.topic, render::SUSPENDED, render::visible(&program)
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
    /// The held child was killed by this signal.
    Killed(NixSignal),
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
    /// It is the owner of a shared topic held back while the daemon
    /// cannot reach etcd: a read-only spectator until it can.
    Suspended,
    /// Removed, by whom in words.
    Removed(String),
}

fn news(event: Option<SessionEvent>, topic: &str) -> anyhow::Result<News> {
    match event {
        Some(SessionEvent::Event(Event::Role { payload, .. })) => {
            Ok(standing_news(&payload.standing))
        }
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
        Some(SessionEvent::Retracked { reply, .. }) => Ok(standing_news(&reply.standing)),
        other => join::session_trouble(other, topic).map(|()| News::Nothing),
    }
}

/// What a standing the daemon gave means for the command.
fn standing_news(standing: &Standing) -> News {
    if standing.suspended {
        return News::Suspended;
    }
    News::Role(standing.role, render::owner(standing.owner.as_ref()))
}

/// The status for a CMD that could not be executed, as a shell gives it:
/// 127 when there is no such command, 126 when there is one that cannot be
/// run (not executable, not a program the kernel can run, a folder).
fn cannot_exec_status(error: &std::io::Error) -> u8 {
    match error.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

/// The child: forked, held at the gate until it may `exec` CMD.
struct Held {
    pid: u32,
    /// A pidfd on the child, opened before it could be reaped: a signal
    /// sent through it reaches the child or no one, never a process given
    /// the child's pid since. `None` where the kernel has no pidfds (Linux
    /// before 5.3); see [`Held::signal`].
    pidfd: Option<ExitWatch>,
    /// The gate's write end; dropping it without a byte sent makes the
    /// child exit without running CMD.
    gate: Option<std::io::PipeWriter>,
    /// The child's exit, from the thread that spawned and waits for it;
    /// an error if it could not be run.
    exit: Option<oneshot::Receiver<std::io::Result<ExitStatus>>>,
    /// The exit, once heard; an error kept as its kind and message, since
    /// `exited` hands it out each time it is asked.
    status: Option<Result<ExitStatus, (std::io::ErrorKind, String)>>,
}

impl Held {
    /// Forks the child for `argv`, which runs CMD with `signal_mask`.
    async fn spawn(argv: &[OsString], signal_mask: SigSet) -> anyhow::Result<Held> {
        let Some((program, rest)) = argv.split_first() else {
            anyhow::bail!("no command to run; give one after --");
        };
        let name = program.to_string_lossy();
        let cannot_start = |why: &std::io::Error| {
            let program = render::visible(&name);
            // What fork(2) says when a limit on processes is reached.
            let hint = if why.raw_os_error() == Some(nix::libc::EAGAIN) {
                ", too many processes (see ulimit -u)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "cannot start a process for {program}: {why}{hint}; {program} was not run"
            )
        };
        let (gate_read, gate_write) = std::io::pipe()?;
        let (mut pid_read, pid_write) = std::io::pipe()?;
        let fds = GateFds {
            gate_read: gate_read.as_raw_fd(),
            gate_write: gate_write.as_raw_fd(),
            pid_read: pid_read.as_raw_fd(),
            pid_write: pid_write.as_raw_fd(),
            parent: std::process::id(),
            signal_mask,
        };
        let mut command = std::process::Command::new(program);
        command.args(rest);
        // SAFETY: the closure makes only async-signal-safe system calls
        // (close, sigprocmask, prctl, getppid, getpid, write, read) and
        // allocates nothing: its errors are bare OS error codes, since a
        // boxed message could take the allocator's lock that another
        // thread held at the fork.
        unsafe {
            command.pre_exec(move || fds.hold());
        }
        let (tell, mut exit) = oneshot::channel();
        // Closed once `presence` holds a pidfd on the child. Until then the
        // child's pid is the only name for it, and reaping the child would
        // free that name for another process.
        let (pinned, wait_until_pinned) = std::sync::mpsc::channel::<()>();
        let child_ends: (OwnedFd, OwnedFd) = (gate_read.into(), pid_write.into());
        std::thread::Builder::new()
            .name("presence-run-child".to_owned())
            .spawn(move || {
                let spawned = command.spawn();
                drop(child_ends);
                if spawned.is_ok() {
                    let _ = wait_until_pinned.recv();
                }
                let _ = tell.send(spawned.and_then(|mut child| child.wait()));
            })
            .map_err(|e| cannot_start(&e))?;
        let mut pid = [0u8; 4];
        if pid_read.read_exact(&mut pid).is_err() {
            // No pid: the fork failed, or the child died before it could
            // send one. Nothing to pin, and the thread, which may be
            // waiting for the pin, says why. Awaited, not received
            // blocking: this runs inside the runtime.
            drop(pinned);
            let why = match (&mut exit).await {
                Ok(Err(e)) => e,
                Ok(Ok(status)) => std::io::Error::other(format!("it ended at once ({status})")),
                Err(_) => std::io::Error::other("its thread ended"),
            };
            return Err(cannot_start(&why));
        }
        let pid = u32::from_ne_bytes(pid);
        let pidfd = match ExitWatch::open_pid(pid) {
            Ok(pidfd) => Some(pidfd),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => None,
            Err(e) => return Err(cannot_start(&e)),
        };
        drop(pinned);
        Ok(Held {
            pid,
            pidfd,
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
                Ok(Err(e)) => Err((e.kind(), e.to_string())),
                Err(_) => Err((std::io::ErrorKind::Other, "its thread ended".to_owned())),
            });
        }
        match &self.status {
            Some(Ok(status)) => Ok(*status),
            Some(Err((kind, message))) => Err(std::io::Error::new(*kind, message.clone())),
            None => std::future::pending().await,
        }
    }

    /// The signal that killed the child, once its exit has been heard.
    fn killed_by(&self) -> Option<NixSignal> {
        match &self.status {
            Some(Ok(status)) => status
                .signal()
                .and_then(|signal| NixSignal::try_from(signal).ok()),
            _ => None,
        }
    }

    /// Passes a signal on to the child.
    fn signal(&self, signal: NixSignal) {
        match &self.pidfd {
            // Sent to a child that has exited, it reaches no one.
            Some(pidfd) => {
                if let Some(signal) = rustix::process::Signal::from_named_raw(signal as i32) {
                    let _ = pidfd.send_signal(signal);
                }
            }
            // No pidfds (Linux before 5.3): by pid, rather than refusing to
            // run there, unless the child's exit has been heard. In the
            // moment between the thread reaping the child and that being
            // heard, the pid could pass to another process: a race that
            // only such kernels leave open.
            None => {
                if self.status.is_none()
                    && let Some(exit) = &self.exit
                    && exit.is_empty()
                    && let Ok(pid) = i32::try_from(self.pid)
                {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                }
            }
        }
    }

    /// Whether the child got `received` itself, so that passing it on
    /// would deliver it twice.
    ///
    /// The kernel's own signals (si_code `SI_KERNEL`) are the terminal's:
    /// Ctrl-C, Ctrl-\ and the SIGHUP when the session's leader exits, each
    /// sent to the whole foreground process group, which the child shares
    /// with `presence` unless it moved to a group of its own. The SIGHUP of
    /// a terminal that hangs up is the exception: it goes to the session's
    /// leader alone, which `presence` is when it is the first process of
    /// its session (`ssh -t host presence run …`). A signal a process sent
    /// (`kill`: `SI_USER`) is passed on; one sent to the whole group
    /// (`kill -INT -PGID`, or a shell passing its hang-up on to its jobs)
    /// reaches CMD twice, since the siginfo does not say where it was
    /// sent.
    fn got_already(&self, received: Received) -> bool {
        use rustix::process::{Pid, getpgid, getpgrp, getpid, getsid};
        if !received.from_kernel {
            return false;
        }
        if received.signal == NixSignal::SIGHUP && getsid(None).is_ok_and(|sid| sid == getpid()) {
            return false;
        }
        // By pid: if the pid has passed to another process, the child is
        // gone and nothing is sent to it either way.
        i32::try_from(self.pid)
            .ok()
            .and_then(Pid::from_raw)
            .is_some_and(|pid| getpgid(Some(pid)).is_ok_and(|group| group == getpgrp()))
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
    /// The signal mask `presence` was started with, for CMD.
    signal_mask: SigSet,
}

impl GateFds {
    /// Runs in the child after fork: reports the pid, then blocks until
    /// `presence` opens the gate. An error keeps CMD from running.
    fn hold(self) -> std::io::Result<()> {
        // SAFETY: these descriptors are the child's copies, closed once;
        // the parent's copies stay open.
        unsafe {
            nix::libc::close(self.gate_write);
            nix::libc::close(self.pid_read);
        }
        // The mask survives exec: CMD gets the one `presence` was started
        // with, not the signals it blocks for its signalfd. Unblocked, they
        // act on the held child (a Ctrl-C or a `kill` of it ends it) and
        // on CMD as on any command, with the dispositions `presence` was
        // started with: an ignored SIGINT (a background job's) stays
        // ignored.
        self.signal_mask
            .thread_set_mask()
            .map_err(std::io::Error::from)?;
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

/// The signals `run` reacts to: Ctrl-C and Ctrl-\ at a terminal, `kill`,
/// and a hang-up; but not one that `presence` was started ignoring (under
/// `nohup`, or as a shell's background job), which stays ignored, by
/// `presence` and by CMD. A blocked signal is never discarded as ignored,
/// so reading it from the signalfd would undo that.
fn caught_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        NixSignal::SIGINT,
        NixSignal::SIGTERM,
        NixSignal::SIGHUP,
        NixSignal::SIGQUIT,
    ] {
        if !is_ignored(signal) {
            set.add(signal);
        }
    }
    set
}

/// Whether `signal`'s disposition is to be ignored.
fn is_ignored(signal: NixSignal) -> bool {
    // SAFETY: an all-zero sigaction is a valid value of the type, and with
    // no new action given, sigaction(2) only writes the current one there.
    unsafe {
        let mut current: nix::libc::sigaction = std::mem::zeroed();
        nix::libc::sigaction(signal as i32, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == nix::libc::SIG_IGN
    }
}

/// A signal `presence` received.
#[derive(Debug, Clone, Copy)]
struct Received {
    signal: NixSignal,
    /// Sent by the kernel itself (si_code `SI_KERNEL`), not by a process.
    from_kernel: bool,
}

/// The signals `run` reacts to, read from a signalfd with their siginfo.
///
/// Whether to pass a signal on depends on who sent it (its `si_code`),
/// which tokio's signal streams do not keep. A handler of our own could
/// see it too, but a signalfd needs none: no code of ours runs in signal
/// context, and the child inherits the dispositions `presence` was started
/// with rather than a handler to undo. A signalfd reads only signals that
/// every thread blocks (a thread that does not takes the signal's default
/// action, which ends `presence`): [`Signals::install`] blocks them before
/// any thread but the runtime's own exists (the runtime is
/// single-threaded, and `run` installs this first), and threads started
/// later inherit the mask. The child puts the mask back as it was
/// ([`GateFds::hold`]), and so does a daemon started on demand
/// (`client::autostart`): a blocked signal stays blocked across exec.
struct Signals {
    fd: AsyncFd<SignalFd>,
    /// The signals it reads.
    caught: SigSet,
    /// The signal mask before `install`, which CMD is to have.
    started_with: SigSet,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        let caught = caught_signals();
        let started_with = caught.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let fd = SignalFd::with_flags(&caught, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: the AsyncFd takes ownership of the SignalFd, whose
        // descriptor stays open and the same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Signals {
            fd,
            caught,
            started_with,
        })
    }

    async fn recv(&mut self) -> Received {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                break;
            };
            match ready.try_io(|fd| read_signal(fd.get_ref())) {
                Ok(Ok(info)) => {
                    if let Ok(signal) = NixSignal::try_from(info.ssi_signo as i32) {
                        return Received {
                            signal,
                            from_kernel: info.ssi_code == nix::libc::SI_KERNEL,
                        };
                    }
                }
                Ok(Err(_)) => break,
                Err(_would_block) => {}
            }
        }
        // A signalfd that fails would leave the signals blocked and unread
        // for good: unblocked, they take their default actions instead,
        // which end `presence` (and CMD with it, by its parent-death
        // signal).
        let _ = self.caught.thread_unblock();
        std::future::pending().await
    }

    /// Whether `signal` has arrived and is still unread. Reads every
    /// signal waiting: for a decision made on the way out.
    fn received_too(&mut self, signal: NixSignal) -> bool {
        let mut found = false;
        while let Ok(info) = read_signal(self.fd.get_ref()) {
            found |= info.ssi_signo == signal as u32;
        }
        found
    }
}

/// The next signal from a signalfd; `WouldBlock` when none is waiting.
fn read_signal(fd: &SignalFd) -> std::io::Result<nix::sys::signalfd::siginfo> {
    match fd.read_signal() {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
        Err(errno) => Err(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspended_owner_is_news_of_its_own_and_not_ownership() {
        let owning = Standing {
            role: Role::Owner,
            readonly: false,
            position: 0,
            owner: None,
            suspended: false,
        };
        assert!(matches!(standing_news(&owning), News::Role(Role::Owner, _)));
        let suspended = Standing {
            role: Role::Spectator,
            readonly: true,
            suspended: true,
            ..owning
        };
        assert!(matches!(standing_news(&suspended), News::Suspended));
    }
}
