//! The real daemon, built by `cargo bench` beside this binary, on a socket
//! and database in the run's temporary folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::within;

pub struct Daemon {
    pub socket: PathBuf,
    /// Killed when dropped, so that a failed run leaves no daemon behind.
    _child: Child,
}

impl Daemon {
    /// Starts `presence --socket S daemon --db D --ready-on-stdout` in
    /// `dir` and waits for its `ready` line: from then on it listens.
    pub async fn start(dir: &Path) -> anyhow::Result<Daemon> {
        let socket = dir.join("run/presenced.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_presence"))
            .arg("--socket")
            .arg(&socket)
            .arg("daemon")
            .arg("--db")
            .arg(dir.join("state/presence.db"))
            .arg("--ready-on-stdout")
            .env("PRESENCE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the daemon")?;
        let stdout = child.stdout.take().context("the daemon's stdout")?;
        let line = within(
            "the daemon to listen",
            BufReader::new(stdout).lines().next_line(),
        )
        .await??;
        ensure!(
            line.as_deref() == Some("ready"),
            "the daemon did not start: it said {line:?}"
        );
        Ok(Daemon {
            socket,
            _child: child,
        })
    }
}
