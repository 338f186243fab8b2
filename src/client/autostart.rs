//! Starting a daemon on demand, when a client finds nobody listening.
//!
//! Clients that race to start one take a lock beside the socket; the first
//! runs the [`DaemonCommand`] it was given (`presence daemon`, with the
//! socket and database it is to serve) in a new session and waits for it
//! to say `ready`, the others wait on the lock and then find it running.
//! The daemon's own lock backs this up: a second daemon refuses to start.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::ClientError;
use crate::{paths, sys};

/// The program a client runs to start a daemon, with the arguments that
/// come before the daemon's own.
///
/// Starting a daemon for `SOCKET` runs
///
/// ```text
/// PROGRAM LEADING_ARGS… --socket=SOCKET daemon --db DB --ready-on-stdout --autostarted
/// ```
///
/// so the program is a `presence` binary, or one that ends up running
/// `presence` with the arguments after its own (`nice -n 10 presence`, say):
///
/// ```
/// use presenced::client::DaemonCommand;
///
/// // The `presence` on PATH, as installed.
/// let installed = DaemonCommand::installed();
/// // One at a path of its own, such as a build of presenced.
/// let built = DaemonCommand::new("/opt/presenced/bin/presence");
/// // The installed one, at a lower priority.
/// let niced = DaemonCommand::new("nice").args(["-n", "10", "presence"]);
/// # let _ = (installed, built, niced);
/// ```
///
/// A relative path is made absolute against the working directory when the
/// command is made, since the daemon may be started much later (after a
/// crash), when the working directory may be another. Nothing else is
/// looked up or checked until a daemon is started: a program that is
/// missing then makes that start fail with [`ClientError::Autostart`],
/// naming it.
///
/// A name without a `/` is looked up on `PATH` by the new process, after
/// it has changed to `/` (the daemon keeps no folder busy): a relative
/// entry of `PATH` (`bin`, or an empty one) is taken from `/`, not from the
/// client's working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonCommand {
    program: Program,
    leading_args: Vec<OsString>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Program {
    /// A name without a `/`, looked up on `PATH` when the daemon starts.
    OnPath(PathBuf),
    /// A path, absolute: made so when the command was made.
    Path(PathBuf),
    /// A relative path that could not be made absolute when the command
    /// was made (the working directory was gone), with why: starting a
    /// daemon with it fails, rather than take it from whatever the working
    /// directory is by then.
    Unresolved { path: PathBuf, error: String },
    /// The running executable: the `presence` binary starting its own
    /// daemon.
    CurrentExe,
}

impl DaemonCommand {
    /// Whatever `presence` comes first on `PATH` when the daemon is
    /// started (relative entries taken from `/`): what a program using
    /// this library starts, with presenced installed. Nothing checks that
    /// it is presenced's.
    pub fn installed() -> DaemonCommand {
        DaemonCommand::new("presence")
    }

    /// `program`: a name without a `/` is looked up on `PATH` when the
    /// daemon is started, as a shell would (relative entries from `/`); a
    /// relative path is made absolute now, against the working directory.
    pub fn new(program: impl Into<PathBuf>) -> DaemonCommand {
        let program = program.into();
        let program = if !has_slash(&program) {
            Program::OnPath(program)
        } else {
            match std::path::absolute(&program) {
                Ok(path) => Program::Path(path),
                Err(e) => Program::Unresolved {
                    path: program,
                    error: e.to_string(),
                },
            }
        };
        DaemonCommand {
            program,
            leading_args: Vec::new(),
        }
    }

    /// The executable of the running process, as `std::env::current_exe`
    /// finds it when the daemon is started: for the `presence` binary
    /// itself, which starts its own kind. Any other program would start
    /// itself, not a daemon.
    pub fn this_program() -> DaemonCommand {
        DaemonCommand {
            program: Program::CurrentExe,
            leading_args: Vec::new(),
        }
    }

    /// Adds arguments to pass ahead of the daemon's own.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> DaemonCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.leading_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The program to run: an absolute path, or a bare name for `PATH` to
    /// resolve.
    fn program(&self) -> Result<PathBuf, ClientError> {
        match &self.program {
            Program::CurrentExe => std::env::current_exe()
                .map_err(|e| ClientError::Autostart(format!("finding the presence binary: {e}"))),
            Program::OnPath(program) | Program::Path(program) => Ok(program.clone()),
            Program::Unresolved { path, error } => Err(ClientError::Autostart(format!(
                "daemon program {}: {error}",
                path.display()
            ))),
        }
    }
}

/// Whether `program` is a path rather than a name to look up on `PATH`:
/// the rule of `execvp(3)`, which runs it.
fn has_slash(program: &Path) -> bool {
    program.as_os_str().as_encoded_bytes().contains(&b'/')
}

/// Why running `program` failed, in words: for a name not on `PATH`, the
/// bare "No such file or directory" would not say which file.
fn spawn_failed(program: &Path, error: &std::io::Error) -> ClientError {
    ClientError::Autostart(
        if !has_slash(program) && error.kind() == ErrorKind::NotFound {
            let hint = if program == Path::new("presence") {
                "; is presenced installed?"
            } else {
                ""
            };
            format!(
                "no `{}` on PATH to run as the daemon{hint}",
                program.display()
            )
        } else {
            format!("running {} as the daemon: {error}", program.display())
        },
    )
}

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

/// Starts a daemon for `socket` by running `daemon`, unless one is already
/// listening, and returns once it accepts connections. The database is the
/// one the daemon would choose: `PRESENCE_DB`, else the default under the
/// state folder; its log (its stderr) goes beside the database, and when
/// it exits without listening, the error says the reason it logged last.
///
/// Clients that call this at once for the same socket take turns on a
/// lock beside it, so that only the first starts a daemon and the others
/// find it listening.
pub async fn start_daemon(socket: &Path, daemon: &DaemonCommand) -> Result<(), ClientError> {
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

    let program = daemon.program()?;
    // One argument, `--socket=PATH`, so that a path starting with `-` is
    // never read as a flag.
    let mut socket_arg = std::ffi::OsString::from("--socket=");
    socket_arg.push(socket);
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&daemon.leading_args)
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
    let mut child = command.spawn().map_err(|e| spawn_failed(&program, &e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_left_for_path_to_find_and_a_path_is_made_absolute() {
        let program = |daemon: DaemonCommand| daemon.program().expect("a program");
        assert_eq!(program(DaemonCommand::installed()), Path::new("presence"));
        let here = std::env::current_dir().expect("a working folder");
        assert_eq!(
            program(DaemonCommand::new("build/presence")),
            here.join("build/presence")
        );
        assert_eq!(
            program(DaemonCommand::new("./presence")),
            here.join("presence")
        );
        assert_eq!(
            program(DaemonCommand::this_program()),
            std::env::current_exe().expect("this test's executable")
        );
    }

    #[test]
    fn a_relative_path_is_made_absolute_when_the_command_is_made() {
        let here = std::env::current_dir().expect("a working folder");
        let made = DaemonCommand::new("build/presence");
        // Already the same command as one given the absolute path: nothing
        // is left to resolve against the working directory at the start.
        assert_eq!(made, DaemonCommand::new(here.join("build/presence")));
        assert_eq!(made.program, Program::Path(here.join("build/presence")));
        assert_eq!(
            DaemonCommand::new("presence").program,
            Program::OnPath("presence".into())
        );
    }
}
