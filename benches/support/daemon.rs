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
    db: PathBuf,
    args: Vec<String>,
    /// Killed when dropped, so that a failed run leaves no daemon behind.
    child: Child,
}

impl Daemon {
    /// Starts `presence --socket S daemon --db D --ready-on-stdout ARGS` in
    /// `dir` and waits for its `ready` line: from then on it listens.
    pub async fn start(dir: &Path, args: &[&str]) -> anyhow::Result<Daemon> {
        let socket = dir.join("run/presenced.sock");
        let db = dir.join("state/presence.db");
        let args: Vec<String> = args.iter().map(|&arg| arg.to_owned()).collect();
        let child = spawn(&socket, &db, &args).await?;
        Ok(Daemon {
            socket,
            db,
            args,
            child,
        })
    }

    /// The daemon's pid.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the daemon has exited")
    }

    /// SIGKILLs the daemon and reaps it: no shutdown, no final commit.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        within("the daemon to die", self.child.wait()).await??;
        Ok(())
    }

    /// Starts the daemon again on the same socket, database and arguments,
    /// and waits until it listens.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.socket, &self.db, &self.args).await?;
        Ok(())
    }
}

async fn spawn(socket: &Path, db: &Path, args: &[String]) -> anyhow::Result<Child> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_presence"))
        .arg("--socket")
        .arg(socket)
        .arg("daemon")
        .arg("--db")
        .arg(db)
        .arg("--ready-on-stdout")
        .args(args)
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
    Ok(child)
}
