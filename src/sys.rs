//! What the daemon and the CLI need from the operating system: process
//! identity from `/proc`, user names, waiting for a process to exit, and
//! a clock and an alarm that count through suspend.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, pidfd_open};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::process::ProcessId;

/// This boot's id; rows written under another boot belong to processes that
/// no longer exist.
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// The process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`). Together with the pid it names one process for good:
/// a pid can be reused, the pair cannot.
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    // Read as bytes: the command name is whatever the process chose, not
    // necessarily UTF-8.
    let stat = std::fs::read(format!("/proc/{pid}/stat"))?;
    start_time_from_stat(&stat)
}

/// The start time (field 22) of a `/proc/PID/stat` line.
fn start_time_from_stat(stat: &[u8]) -> io::Result<u64> {
    stat_field(stat, STAT_START_TIME).ok_or_else(|| invalid_data("no start time in /proc stat"))
}

/// Fields of `/proc/PID/stat`, counted from the state (field 3) as 0.
const STAT_STATE: usize = 0;
const STAT_FLAGS: usize = 6;
const STAT_START_TIME: usize = 19;

/// The fields of `/proc/PID/stat` after the command name, from the state
/// on. The command name (field 2) may hold spaces and parentheses; every
/// field after its closing parenthesis is plain ASCII.
fn stat_fields(stat: &[u8]) -> impl Iterator<Item = &[u8]> {
    let after_name = stat
        .iter()
        .rposition(|&b| b == b')')
        .map_or(&[][..], |i| &stat[i + 1..]);
    after_name
        .split(|b| b.is_ascii_whitespace())
        .filter(|field| !field.is_empty())
}

/// A numeric field of `/proc/PID/stat` (see [`stat_fields`]).
fn stat_field(stat: &[u8], index: usize) -> Option<u64> {
    stat_fields(stat)
        .nth(index)
        .and_then(|field| std::str::from_utf8(field).ok())
        .and_then(|field| field.parse().ok())
}

/// `PF_EXITING` in the flags of `/proc/PID/stat`: the process is exiting.
const PF_EXITING: u64 = 0x4;

/// Whether `process` is exiting or gone: its pid is free or another
/// process's, it is a zombie, or the kernel has flagged it `PF_EXITING`,
/// which it does before closing the process's files. So a connection that
/// closed because its process was killed is told at once from one that
/// the process closed itself. When `/proc` cannot tell, no.
pub fn is_exiting(process: ProcessId) -> bool {
    let stat = match std::fs::read(format!("/proc/{}/stat", process.pid)) {
        Ok(stat) => stat,
        Err(e) => return e.kind() == io::ErrorKind::NotFound,
    };
    if stat_field(&stat, STAT_START_TIME).is_some_and(|start| start != process.start_time) {
        return true;
    }
    matches!(stat_fields(&stat).nth(STAT_STATE), Some(b"Z" | b"X" | b"x"))
        || stat_field(&stat, STAT_FLAGS).is_some_and(|flags| flags & PF_EXITING != 0)
}

/// The process, pinned by its start time; `NotFound` when it is not running.
pub fn process_id(pid: u32) -> io::Result<ProcessId> {
    Ok(ProcessId {
        pid,
        start_time: process_start_time(pid)?,
    })
}

/// Whether this exact process (pid and start time) is still running. An
/// error means `/proc` could not tell (out of file descriptors, say); that
/// is never an answer, because taking it for an exit would reap a live
/// process's entries.
pub fn is_running(process: ProcessId) -> io::Result<bool> {
    match process_start_time(process.pid) {
        Ok(start) => Ok(start == process.start_time),
        Err(e) if is_gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a call failed because this process, or the whole system, has
/// no file descriptor to spare.
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// Whether reading `/proc/PID` failed because the process is gone.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error())
}

/// The effective uid of a running process.
pub fn process_uid(pid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_ascii_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| invalid_data("no Uid line in /proc status"))
}

/// The login name for a uid, or the uid as text when it has none.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// The effective uid of this process.
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A handle on a process that becomes readable when it exits.
pub struct ExitWatch {
    fd: OwnedFd,
}

impl ExitWatch {
    /// Opens a pidfd on whatever process has `pid` now. Fails with
    /// `NotFound` when no such process runs, and with `Unsupported` when the
    /// kernel has no pidfds.
    pub fn open_pid(pid: u32) -> io::Result<ExitWatch> {
        let not_found = || io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}"));
        let raw = i32::try_from(pid).map_err(|_| not_found())?;
        let pid = Pid::from_raw(raw).ok_or_else(not_found)?;
        let fd = pidfd_open(pid, PidfdFlags::empty()).map_err(|errno| match errno {
            // EINVAL also means "a thread, not a process" on older kernels.
            rustix::io::Errno::SRCH | rustix::io::Errno::INVAL => not_found(),
            rustix::io::Errno::NOSYS => {
                io::Error::new(io::ErrorKind::Unsupported, "pidfd_open is not available")
            }
            other => io::Error::from(other),
        })?;
        Ok(ExitWatch { fd })
    }

    /// Opens a pidfd on `process` and confirms it is that very process, so
    /// that a reused pid is never watched in its place.
    pub fn open(process: ProcessId) -> io::Result<ExitWatch> {
        let watch = ExitWatch::open_pid(process.pid)?;
        // The pidfd pins whichever process it opened. If that one still
        // runs, the start time read now is its own.
        let start_time = process_start_time(process.pid)?;
        if start_time != process.start_time || watch.has_exited() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {} has exited", process.pid),
            ));
        }
        Ok(watch)
    }

    /// The watched process's pidfs inode, which names it for the whole
    /// boot; `None` on a kernel whose pidfds have none (see
    /// [`pidfs_inode`]).
    pub fn pidfs_inode(&self) -> Option<u64> {
        pidfs_inode(&self.fd)
    }

    /// Whether the watched process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // An error here would be ours (a bad fd); treat it as exited so no
        // entry outlives a process we can no longer see.
        poll(&mut fds, Some(&now)).map_or(true, |ready| ready > 0)
    }

    /// Sends `signal` to the very process this pidfd names: never to
    /// another that was given its pid since.
    pub fn send_signal(&self, signal: rustix::process::Signal) -> io::Result<()> {
        rustix::process::pidfd_send_signal(&self.fd, signal).map_err(io::Error::from)
    }

    /// Resolves when the process has exited.
    pub async fn exited(self) -> io::Result<()> {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays
        // open and names the same pidfd until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(self.fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let _ready = fd.readable().await?;
        Ok(())
    }
}

/// Resolves when `process` has exited: through its pidfd when there is one,
/// else by looking at `/proc` every `poll` interval.
pub async fn exited(
    process: ProcessId,
    watch: Option<ExitWatch>,
    poll: Duration,
) -> io::Result<()> {
    match watch {
        Some(watch) => watch.exited().await,
        None => {
            // A look that cannot tell is tried again at the next poll.
            while is_running(process).unwrap_or(true) {
                tokio::time::sleep(poll).await;
            }
            Ok(())
        }
    }
}

/// Waits for a process to exit, by pidfd where the kernel has them.
pub async fn wait_for_exit(process: ProcessId, poll: Duration) -> io::Result<()> {
    match ExitWatch::open(process) {
        Ok(watch) => exited(process, Some(watch), poll).await,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => exited(process, None, poll).await,
        Err(e) => Err(e),
    }
}

/// The process at the other end of a connection, as it was when the
/// daemon accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerProcess {
    /// Running when pinned. Its start time names it for good: a process
    /// given the same pid later is never taken for it.
    Running(PinnedPeer),
    /// Gone before it could be pinned.
    Exited,
}

/// A connecting process that was running when it was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedPeer {
    pub process: ProcessId,
    /// The pid the process has in its own pid namespace, which is what it
    /// calls itself; `process.pid` unless it runs in a nested one.
    pub own_pid: u32,
    /// Whether it runs in a pid namespace below the daemon's (a
    /// container), where a pid names another process than it does here.
    pub in_nested_pid_namespace: bool,
    /// Its pidfs inode, where pidfds have one of their own (see the
    /// function `pidfs_inode`): a surer name than the start time, which
    /// counts in ticks of 10 ms, within which a pid can be handed out
    /// again where pids are few (a container's small `pid_max`).
    pub pidfs_inode: Option<u64>,
}

impl ExitWatch {
    /// Opens a pidfd on a connection's pinned process and confirms it is
    /// that very process. `NotFound` when it has exited, even if its pid
    /// belongs to another process now.
    pub fn open_peer(peer: &PinnedPeer) -> io::Result<ExitWatch> {
        let Some(inode) = peer.pidfs_inode else {
            return ExitWatch::open(peer.process);
        };
        let watch = ExitWatch::open_pid(peer.process.pid)?;
        if pidfs_inode(&watch.fd) != Some(inode) || watch.has_exited() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {} has exited", peer.process.pid),
            ));
        }
        Ok(watch)
    }
}

/// The inode of a pidfd, where it names one process for the whole boot:
/// on pidfs (Linux 6.9 on), whose inode numbers on a 64-bit kernel are
/// never reused. `None` on older kernels, where every pidfd shares one.
fn pidfs_inode(pidfd: &OwnedFd) -> Option<u64> {
    /// `PID_FS_MAGIC` from linux/magic.h.
    const PIDFS_MAGIC: rustix::fs::FsWord = 0x5049_4446;
    if !cfg!(target_pointer_width = "64") {
        return None;
    }
    let on_pidfs = rustix::fs::fstatfs(pidfd).ok()?.f_type == PIDFS_MAGIC;
    on_pidfs.then(|| rustix::fs::fstat(pidfd).ok().map(|stat| stat.st_ino))?
}

/// Pins the process that connected on `socket`, whose pid its peer
/// credentials gave as `pid`.
///
/// Where the kernel has it (Linux 6.5 on), `SO_PEERPIDFD` hands over a
/// pidfd of the very process that called `connect`, so the pid cannot
/// have passed to another process in between. An older kernel gets a
/// pidfd opened by pid here, which leaves open the moments between the
/// client's connect and this accept.
///
/// The pidfd is closed once the pin is read. Keeping it would halve how
/// many connections fit in the descriptor limit, for every connection,
/// while only those that track their own process need one; those open
/// a pidfd again at their first track and check it against the pin's
/// inode ([`ExitWatch::open_peer`]).
pub fn pin_peer(socket: BorrowedFd<'_>, pid: u32) -> io::Result<PeerProcess> {
    let watch = match peer_pidfd(socket) {
        Ok(fd) => Some(ExitWatch { fd }),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => match ExitWatch::open_pid(pid) {
            Ok(watch) => Some(watch),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => None,
            Err(e) if is_gone(&e) => return Ok(PeerProcess::Exited),
            Err(e) => return Err(e),
        },
        Err(e) if is_gone(&e) => return Ok(PeerProcess::Exited),
        Err(e) => return Err(e),
    };
    let pidfs_inode = watch.as_ref().and_then(|watch| pidfs_inode(&watch.fd));
    let read = process_start_time(pid).and_then(|start_time| {
        let pids = namespace_pids(pid, watch.as_ref())?;
        Ok((start_time, pids))
    });
    // Until the pinned process is reaped its pid cannot pass to another,
    // so what was read under a pidfd that is still open and not exited is
    // that process's own.
    if watch.as_ref().is_some_and(ExitWatch::has_exited) {
        return Ok(PeerProcess::Exited);
    }
    let (start_time, pids) = match read {
        Ok(read) => read,
        Err(e) if is_gone(&e) => return Ok(PeerProcess::Exited),
        Err(e) => return Err(e),
    };
    Ok(PeerProcess::Running(PinnedPeer {
        process: ProcessId { pid, start_time },
        own_pid: pids.last().copied().unwrap_or(pid),
        in_nested_pid_namespace: pids.len() > 1,
        pidfs_inode,
    }))
}

/// The kernel's pidfd of the process that connected on `socket`.
/// `Unsupported` on a kernel without `SO_PEERPIDFD`, `NotFound` when the
/// process has exited and the kernel will not give a pidfd for it.
fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::errno::Errno;
    use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
    getsockopt(&socket, PeerPidfd).map_err(|errno| match errno {
        // An unknown option (before 6.5), or no peer pid recorded.
        Errno::ENOPROTOOPT | Errno::ENODATA => {
            io::Error::new(io::ErrorKind::Unsupported, "SO_PEERPIDFD is not available")
        }
        // No pidfd for a process that has exited, before Linux 6.16.
        Errno::ESRCH | Errno::EINVAL => {
            io::Error::new(io::ErrorKind::NotFound, "the connecting process has exited")
        }
        other => io::Error::from_raw_os_error(other as i32),
    })
}

/// The pids of a process in each pid namespace from the daemon's down to
/// its own (the `NSpid` line): one pid when it runs in the daemon's.
/// Read from its pidfd where there is one, so it is that process's.
fn namespace_pids(pid: u32, watch: Option<&ExitWatch>) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let gone = || io::Error::new(io::ErrorKind::NotFound, format!("process {pid} has exited"));
    if let Some(watch) = watch {
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", watch.fd.as_raw_fd()))?;
        // Kernels before 5.10 show no `NSpid` for a pidfd; /proc/PID says it.
        if let Some(pids) = nspid_line(&fdinfo) {
            // -1: the process has exited.
            return pids.ok_or_else(gone);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    match nspid_line(&status) {
        Some(pids) => pids.ok_or_else(gone),
        // A kernel without pid namespaces has one.
        None => Ok(vec![pid]),
    }
}

/// The pids of an `NSpid:` line, if the text has one; `Some(None)` when
/// they are not all pids (`-1` for a process that has exited).
fn nspid_line(text: &str) -> Option<Option<Vec<u32>>> {
    let line = text.lines().find_map(|line| line.strip_prefix("NSpid:"))?;
    let pids: Option<Vec<u32>> = line
        .split_ascii_whitespace()
        .map(|pid| pid.parse().ok().filter(|&pid| pid > 0))
        .collect();
    Some(pids.filter(|pids| !pids.is_empty()))
}

/// Unix milliseconds now, by the wall clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A moment on `CLOCK_BOOTTIME`: like [`std::time::Instant`], but it keeps
/// counting while the machine is suspended, as other hosts' clocks do. A
/// promise that must end a fixed time after a moment (a lease in etcd)
/// is timed on it: `Instant`, on `CLOCK_MONOTONIC`, stops during suspend,
/// so a deadline on it would fall late by the time the machine slept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        // The clock counts from boot, so it is never negative; a value that
        // does not fit a Duration would be a kernel bug, read as boot.
        BootInstant(Duration::try_from(now).unwrap_or_default())
    }

    /// How long after boot this moment is.
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// `self - duration`, or boot itself when that would be before it.
    pub fn saturating_sub(self, duration: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(duration))
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;

    fn add(self, duration: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(duration))
    }
}

/// A timer on `CLOCK_BOOTTIME` (a timerfd) that goes off at a
/// [`BootInstant`]. It goes off on time through a suspend, and at once on
/// resume when its moment passed meanwhile; a tokio timer would wait out
/// the slept time again.
pub struct BootAlarm {
    fd: AsyncFd<OwnedFd>,
}

impl BootAlarm {
    /// An alarm, unset.
    pub fn new() -> io::Result<BootAlarm> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Boottime,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: the AsyncFd owns the timerfd, which stays open and names
        // the same timer until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(BootAlarm { fd })
    }

    /// Sets the alarm to go off at `at` (at once if `at` has passed),
    /// replacing whatever moment it was set to, gone off or not.
    pub fn set(&self, at: BootInstant) -> io::Result<()> {
        // A zero it_value would disarm it: the first nanosecond after boot
        // stands for boot itself.
        self.settime(at.0.max(Duration::from_nanos(1)))
    }

    /// Unsets the alarm; it goes off again only once it is set.
    pub fn unset(&self) -> io::Result<()> {
        self.settime(Duration::ZERO)
    }

    fn settime(&self, value: Duration) -> io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        let value = Timespec::try_from(value)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "an alarm beyond time"))?;
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            it_value: value,
        };
        // Setting it also clears a going-off not yet waited for.
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::ABSTIME, &spec)?;
        Ok(())
    }

    /// Resolves when the alarm goes off; pends while it is unset.
    pub async fn gone_off(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut expirations).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                // Readiness was stale (the alarm was set again since); the
                // guard cleared it.
                Err(_would_block) => continue,
            }
        }
    }
}

/// The outcome of [`open_private_file`].
pub enum PrivateFile {
    Opened(std::fs::File),
    /// Something at the path that this user did not make, and that is not
    /// to be written: a symbolic link, a FIFO or other special file, a
    /// file of another user, or one with a second name (a hard link). What
    /// it is, in a sentence naming the path.
    NotOurs(String),
}

/// Opens (or creates, 0600) a file of this user's own that it writes: a
/// lock, a log. Never through a symbolic link at its name, never blocking
/// on a FIFO planted there, and only if what is there is a plain file
/// owned by this user with no other name: a link or a hard link would
/// otherwise have the caller write over whatever file it names, and a
/// FIFO would hold its open forever.
pub fn open_private_file(
    path: &std::path::Path,
    options: &mut std::fs::OpenOptions,
) -> io::Result<PrivateFile> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let opened = options
        .mode(0o600)
        // O_NONBLOCK only so that a FIFO cannot hold the open; a plain
        // file ignores it. (std adds O_CLOEXEC itself.)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Ok(PrivateFile::NotOurs(format!(
                "{} is a symbolic link, which presenced never makes; refusing to follow it \
                 (remove it)",
                path.display()
            )));
        }
        // A FIFO with no reader, opened for writing without blocking.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
            return Ok(PrivateFile::NotOurs(format!(
                "{} is a special file, which presenced never makes; refusing to write to it \
                 (remove it)",
                path.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let uid = current_uid();
    if !meta.file_type().is_file() || meta.uid() != uid || meta.nlink() != 1 {
        return Ok(PrivateFile::NotOurs(format!(
            "{} is not a file of this user's (a {}, owned by uid {}, with {} names); \
             refusing to write to it (remove it)",
            path.display(),
            if meta.file_type().is_file() {
                "file"
            } else {
                "special file"
            },
            meta.uid(),
            meta.nlink()
        )));
    }
    Ok(PrivateFile::Opened(file))
}

/// The outcome of [`take_pid_lock`].
pub enum PidLock {
    /// Ours for as long as the file stays open.
    Taken(std::fs::File),
    /// Another process holds it; its pid, or `unknown` if not written yet.
    HeldBy(String),
    /// Something at the path that this daemon did not make, and will not
    /// write (see [`open_private_file`]). What it is, in a sentence naming
    /// the path.
    NotOurs(String),
}

/// Takes an exclusive lock on `path` (created 0600) without waiting, and
/// writes our pid into it so that whoever finds it taken can say by whom.
///
/// The pid is written over the file's contents, so the file is opened by
/// [`open_private_file`]: a link planted there would otherwise have this
/// daemon overwrite whatever it names, and then find its own lock "held"
/// through the other name.
pub fn take_pid_lock(path: &std::path::Path) -> io::Result<PidLock> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut lock = match open_private_file(
        path,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )? {
        PrivateFile::Opened(lock) => lock,
        PrivateFile::NotOurs(what) => return Ok(PidLock::NotOurs(what)),
    };
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown".to_owned(),
                pid => pid.to_owned(),
            };
            return Ok(PidLock::HeldBy(holder));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // A lock left by an older build, or made under another umask, is
    // made private like a new one.
    if lock.metadata()?.mode() & 0o777 != 0o600 {
        lock.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    // The lock is the flock, held from here on; the pid is only there to
    // name the holder to whoever finds it taken. Writing it can fail on a
    // full disk (ext4 may not have freed the old block yet when the new
    // one is asked for), and that must not stop a start: the holder is
    // then named `unknown`.
    let written = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|_| writeln!(lock, "{}", std::process::id()));
    if let Err(e) = written {
        tracing::warn!(
            "could not write this daemon's pid into {} ({e}); the lock is held all the same",
            path.display()
        );
    }
    Ok(PidLock::Taken(lock))
}

fn invalid_data(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long the alarm tests give an alarm that must not go off, and
    /// the longest they wait for one that must.
    const QUIET: Duration = Duration::from_millis(150);
    const DUE: Duration = Duration::from_secs(10);

    /// Waits for `alarm` to go off, within [`DUE`].
    async fn goes_off(alarm: &BootAlarm) {
        tokio::time::timeout(DUE, alarm.gone_off())
            .await
            .expect("it went off")
            .expect("read");
    }

    #[tokio::test]
    async fn an_alarm_goes_off_at_its_moment_and_not_before() {
        let alarm = BootAlarm::new().expect("a timerfd");
        let set_at = BootInstant::now();
        let at = set_at + Duration::from_millis(80);
        alarm.set(at).expect("set");
        goes_off(&alarm).await;
        assert!(BootInstant::now() >= at);
    }

    #[tokio::test]
    async fn an_alarm_set_again_goes_off_at_the_new_moment_only() {
        let alarm = BootAlarm::new().expect("a timerfd");
        // Set in the past, it goes off at once...
        alarm
            .set(BootInstant::now().saturating_sub(DUE))
            .expect("set");
        goes_off(&alarm).await;
        // ...and set again before it is waited for, only the new moment counts.
        alarm
            .set(BootInstant::now().saturating_sub(DUE))
            .expect("set");
        let later = BootInstant::now() + QUIET;
        alarm.set(later).expect("set");
        goes_off(&alarm).await;
        assert!(BootInstant::now() >= later);
    }

    #[tokio::test]
    async fn an_unset_alarm_stays_quiet() {
        let alarm = BootAlarm::new().expect("a timerfd");
        alarm.set(BootInstant::now() + QUIET / 2).expect("set");
        alarm.unset().expect("unset");
        let quiet = tokio::time::timeout(QUIET, alarm.gone_off()).await;
        assert!(quiet.is_err(), "an unset alarm went off: {quiet:?}");
    }

    #[test]
    fn the_boot_clock_moves_forward_and_counts_from_boot() {
        let first = BootInstant::now();
        let second = BootInstant::now();
        assert!(second >= first);
        assert!(first.since_boot() > Duration::ZERO);
        assert_eq!(
            first.saturating_duration_since(second + DUE),
            Duration::ZERO
        );
    }

    #[test]
    fn own_start_time_is_stable_and_names_this_process() {
        let me = std::process::id();
        let first = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me).unwrap(), first);
        assert!(
            is_running(ProcessId {
                pid: me,
                start_time: first
            })
            .unwrap()
        );
        assert!(
            !is_running(ProcessId {
                pid: me,
                start_time: first + 1
            })
            .unwrap()
        );
    }

    #[test]
    fn a_command_name_of_any_bytes_does_not_hide_the_start_time() {
        let mut stat = b"4242 (odd) \xff) name) S".to_vec();
        for field in 4..=22 {
            stat.extend_from_slice(format!(" {field}").as_bytes());
        }
        stat.extend_from_slice(b" 23 24\n");
        assert_eq!(start_time_from_stat(&stat).unwrap(), 22);
        assert!(start_time_from_stat(b"4242 (cut").is_err());
    }

    #[test]
    fn only_a_missing_process_counts_as_gone() {
        use rustix::io::Errno;
        let error = |errno: Errno| io::Error::from_raw_os_error(errno.raw_os_error());
        assert!(is_gone(&error(Errno::NOENT)));
        assert!(is_gone(&error(Errno::SRCH)));
        // Out of descriptors, /proc cannot tell; the process may well live.
        assert!(!is_gone(&error(Errno::MFILE)));
        assert!(!is_gone(&error(Errno::NFILE)));
        assert!(is_out_of_fds(&error(Errno::MFILE)));
        assert!(is_out_of_fds(&error(Errno::NFILE)));
    }

    #[test]
    fn a_pid_nobody_has_is_not_running_rather_than_unknown() {
        // Above any pid_max Linux allows.
        let nobody = ProcessId {
            pid: 999_999_999,
            start_time: 1,
        };
        assert!(!is_running(nobody).unwrap());
    }

    #[test]
    fn a_connection_pins_the_process_that_made_it() {
        use std::os::fd::AsFd;
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = std::process::id();
        let PeerProcess::Running(pinned) = pin_peer(ours.as_fd(), me).unwrap() else {
            panic!("this process runs");
        };
        assert_eq!(pinned.process, process_id(me).unwrap());
        assert_eq!(pinned.own_pid, me);
        assert!(!pinned.in_nested_pid_namespace);
        // Opened again by pid, it is still this process.
        assert!(ExitWatch::open_peer(&pinned).is_ok());
        if let Some(inode) = pinned.pidfs_inode {
            let other = PinnedPeer {
                pidfs_inode: Some(inode + 1),
                ..pinned
            };
            assert_eq!(
                ExitWatch::open_peer(&other).err().map(|e| e.kind()),
                Some(io::ErrorKind::NotFound),
                "another process's inode is not ours, whatever the start time"
            );
        }
    }

    #[test]
    fn nspid_lines_give_every_level_and_tell_an_exit() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nPid:\t4242\nNSpid:\t4242\t7\t1\n";
        assert_eq!(nspid_line(fdinfo), Some(Some(vec![4242, 7, 1])));
        assert_eq!(nspid_line("Pid:\t-1\nNSpid:\t-1\n"), Some(None));
        assert_eq!(nspid_line("Pid:\t12\n"), None);
    }

    #[test]
    fn own_uid_matches_proc() {
        assert_eq!(process_uid(std::process::id()).unwrap(), current_uid());
    }
}
