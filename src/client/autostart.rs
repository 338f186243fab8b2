//! Starting a daemon on demand, when a client finds nobody listening.
//!
//! Clients that race to start one take a lock beside the socket; the first
//! starts `presence daemon` in a new session and waits for it to say
//! `ready`, the others wait on the lock and then find it running. The
//! daemon's own lock backs this up: a second daemon refuses to start.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::ClientError;
use crate::{paths, sys};

/// How long a new daemon may take to listen.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How long to wait for another client that is starting a daemon. It
/// holds the lock for at most its own ready deadline, unless it is stopped.
const LOCK_DEADLINE: Duration = Duration::from_secs(15);

/// Whether a failed connect means nobody is serving the socket.
pub(super) fn worth_starting(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::NotFound | ErrorKind::ConnectionRefused
    )
}

/// Opens a file of ours beside the socket or the database through
/// [`sys::open_private_file`]: what another user planted there (a link, a
/// FIFO, a hard link) is refused in one line, never written through.
fn open_private_file(options: &mut OpenOptions, path: &Path) -> Result<std::fs::File, ClientError> {
    match sys::open_private_file(path, options) {
        Ok(sys::PrivateFile::Opened(file)) => Ok(file),
        Ok(sys::PrivateFile::NotOurs(what)) => Err(ClientError::Autostart(what)),
        Err(e) => Err(ClientError::Autostart(format!("{}: {e}", path.display()))),
    }
}

/// Starts a daemon for `socket` unless one is already listening, and
/// returns once it accepts connections. The database is the one the
/// daemon would choose: `PRESENCE_DB`, else the default under the state
/// folder; its log goes beside the database.
pub async fn start_daemon(socket: &Path) -> Result<(), ClientError> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| ClientError::Autostart(format!("{what}: {e}"));
    // The daemon runs from `/`, so it is given absolute paths.
    let socket = &std::path::absolute(socket).map_err(|e| failed("socket path", &e))?;
    let dir = paths::parent_dir(socket);
    paths::ensure_socket_dir(dir, &paths::SocketAccess::Owner)
        .map_err(|e| failed("socket folder", &e))?;

    let lock_path = paths::autostart_lock(socket);
    let lock = open_private_file(
        OpenOptions::new().write(true).create(true).truncate(false),
        &lock_path,
    )?;
    // Wait for a racer ahead of us to finish starting its daemon.
    let waiting = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock));
    let lock = tokio::time::timeout(LOCK_DEADLINE, waiting)
        .await
        .map_err(|_| failed("another client holds the start lock", &lock_path.display()))?
        .map_err(|e| failed("waiting for the start lock", &e))?
        .map_err(|e| failed("waiting for the start lock", &e))?;

    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Ok(());
    }

    let db =
        std::path::absolute(paths::configured_db()).map_err(|e| failed("database path", &e))?;
    let db_dir = paths::parent_dir(&db);
    paths::ensure_private_dir(db_dir).map_err(|e| failed("database folder", &e))?;
    let log_path = paths::autostart_log(&db);
    let log = open_private_file(OpenOptions::new().create(true).append(true), &log_path)?;
    // Where this daemon's lines begin: an earlier daemon's are not its reason.
    let log_start = log.metadata().map_or(0, |m| m.len());

    let exe = std::env::current_exe().map_err(|e| failed("finding the presence binary", &e))?;
    // One argument, `--socket=PATH`, so that a path starting with `-` is
    // never read as a flag.
    let mut socket_arg = std::ffi::OsString::from("--socket=");
    socket_arg.push(socket);
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(socket_arg)
        .arg("daemon")
        .arg("--db")
        .arg(&db)
        .arg("--ready-on-stdout")
        .arg("--autostarted")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid and sigprocmask are async-signal-safe and touch no
    // memory of ours; they run in the child between fork and exec. A new
    // session detaches the daemon from the terminal, so the user's Ctrl-C
    // or hang-up is not its. The signal mask survives exec, and the daemon
    // must not inherit the signals its client blocks (`presence run`
    // reads its own from a signalfd): a blocked SIGTERM would never stop it.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| failed("spawning presence daemon", &e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ClientError::Autostart("the daemon's stdout is missing".into()))?;

    let mut first_line = String::new();
    let read = tokio::time::timeout(
        READY_DEADLINE,
        BufReader::new(stdout).read_line(&mut first_line),
    )
    .await;
    drop(lock);
    match read {
        Ok(Ok(_)) if first_line.trim() == "ready" => Ok(()),
        Ok(_) => {
            // The daemon exited without listening. Another may have won a
            // race we could not see; if so, use it.
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            let status = tokio::time::timeout(READY_DEADLINE, child.wait())
                .await
                .ok()
                .and_then(Result::ok);
            let status = status.map_or_else(|| "unknown status".to_owned(), |s| s.to_string());
            Err(ClientError::Autostart(
                match last_error_line(&log_path, log_start) {
                    Some(reason) => format!(
                        "{reason} (the daemon exited, {status}; log: {})",
                        log_path.display()
                    ),
                    None => format!(
                        "the daemon exited ({status}) before listening; see {}",
                        log_path.display()
                    ),
                },
            ))
        }
        Err(_) => Err(ClientError::Autostart(format!(
            "the daemon did not listen within {READY_DEADLINE:?}; see {}",
            log_path.display()
        ))),
    }
}

/// The most a reason read back from the daemon's log may be, in bytes.
const MOST_LOG_BYTES: u64 = 64 * 1024;

/// The daemon's own last error, from what it wrote to `log` after
/// `start`: the line it ends with when it refuses to start (`presence:
/// REASON`, without the prefix), else its last ERROR line, else its last
/// line. `None` when it wrote nothing.
fn last_error_line(log: &Path, start: u64) -> Option<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let end = file.metadata().ok()?.len();
    let from = start.max(end.saturating_sub(MOST_LOG_BYTES));
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.take(MOST_LOG_BYTES).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("presence: "))
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|line| line.contains("ERROR"))
                .copied()
        })
        .or_else(|| lines.last().copied())?;
    Some(line.chars().take(1000).collect())
}
