//! What the cluster part stands on: a 3-member etcd on loopback (the
//! integration tests' own fixture, compiled here as well), daemons in
//! cluster mode, and `etcdctl elect` campaigns as the baseline handoff.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use presenced::client::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

use super::daemon::Daemon;
use super::{POLL, within};

/// How long the etcd fixture waits for a member to be healthy or a leader
/// to be agreed, as in the tests.
pub const DEADLINE: Duration = Duration::from_secs(15);

// The tests' fixture, not a copy of it: the bench's etcd is the one the
// cluster tests run against. The bench uses only starting it and its
// endpoints; the rest (stopping, killing, compacting members) is for the
// tests.
#[allow(dead_code)]
#[path = "../../tests/common/etcd.rs"]
pub mod etcd;

use etcd::{ELECTION_TIMEOUT, EtcdCluster};

/// The topics the cluster part's daemons share. No local scenario's topic
/// matches it.
pub const SHARED_TOPICS: &str = "shared:*";

/// Whether `program` can be run from the `PATH`.
pub fn installed(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// Starts a 3-member etcd on loopback, healthy, and waits for it on the
/// calling thread. The members die with the thread that started them
/// (`PR_SET_PDEATHSIG`), so it must be one that lives as long as the
/// run, the bench's own, never one of tokio's blocking pool, which end
/// when idle. The fixture panics on failure (it is the tests'); the panic
/// comes back as an error of the run.
pub fn start_etcd() -> anyhow::Result<EtcdCluster> {
    std::panic::catch_unwind(|| EtcdCluster::start(3))
        .map_err(|_| anyhow::anyhow!("a 3-member etcd on loopback did not start"))
}

/// A daemon in cluster mode as `host`, on the members of `etcd`, once its
/// lease is live (its host name claimed on it) so that its entries may
/// own. The cluster settings are the defaults but etcd's election
/// timeout, which the daemon must be told.
pub async fn start_host(dir: &Path, etcd: &EtcdCluster, host: &str) -> anyhow::Result<Daemon> {
    let endpoints = etcd.endpoints().join(",");
    let election_timeout = ELECTION_TIMEOUT.as_secs_f64().to_string();
    let args = [
        "--etcd",
        &endpoints,
        "--cluster-topics",
        SHARED_TOPICS,
        "--host",
        host,
        "--etcd-election-timeout",
        &election_timeout,
    ];
    let daemon = Daemon::start(dir, &args).await?;
    let (client, _events) = Client::connect(&daemon.socket).await?;
    // Nothing announces the lease; its state is polled once, at start.
    let what = format!("host {host}'s lease to be live");
    within(&what, async {
        loop {
            let status = client.status().await?;
            let cluster = status
                .cluster
                .context("a daemon given --etcd has no cluster")?;
            if cluster.lease == "live" {
                return anyhow::Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await??;
    Ok(daemon)
}

/// One `etcdctl elect NAME PROPOSAL` campaign: it prints the election's
/// key once it leads, and resigns when sent SIGINT.
pub struct Campaign {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    pid: Pid,
}

impl Campaign {
    /// Starts campaigning for `name` on `endpoint`; returns at once.
    pub fn start(endpoint: &str, name: &str, proposal: &str) -> anyhow::Result<Campaign> {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoint)
            .arg("elect")
            .arg(name)
            .arg(proposal)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting etcdctl elect")?;
        let stdout = child.stdout.take().context("etcdctl's stdout")?;
        let pid = Pid::from_raw(child.id().context("etcdctl's pid")? as i32);
        Ok(Campaign {
            child,
            lines: BufReader::new(stdout).lines(),
            pid,
        })
    }

    /// Waits until the campaign leads, as its first line of output says,
    /// and returns when that line was read.
    pub async fn leading(&mut self) -> anyhow::Result<Instant> {
        match self.lines.next_line().await? {
            Some(_) => Ok(Instant::now()),
            None => bail!("etcdctl elect exited before it led"),
        }
    }

    /// Asks the leader to resign, as Ctrl-C does; returns at once.
    pub fn resign(&self) -> anyhow::Result<()> {
        Ok(kill(self.pid, Signal::SIGINT)?)
    }

    /// Waits until the campaign has exited; after resigning, it exits 0.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        let status = within("etcdctl elect to exit", self.child.wait()).await??;
        ensure!(status.success(), "etcdctl elect exited with {status}");
        Ok(())
    }
}

/// The watches one etcd member serves, from its metrics.
#[derive(Debug, Clone, Copy)]
pub struct Watchers {
    pub total: u64,
    /// Those still catching up from a past revision. etcd moves them among
    /// the current ones only every 100 ms; until then an event for them
    /// waits for that sweep rather than going out as it is committed.
    pub catching_up: u64,
}

/// The watches the member at `endpoint` (`http://host:port`) serves, read
/// from its `/metrics` over one plain HTTP/1.0 exchange: a 1.0 reply is
/// never in chunks, whose boundaries could cut a metric's line in two.
pub async fn watchers(endpoint: &str) -> anyhow::Result<Watchers> {
    let address = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("{endpoint} is not an http:// URL"))?;
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    let gauge = |name: &str| -> anyhow::Result<u64> {
        let line = reply
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("etcd's metrics have no {name}"))?;
        // Gauges are written as floats; these count watches.
        let value: f64 = line.trim().parse()?;
        Ok(value as u64)
    };
    Ok(Watchers {
        total: gauge("etcd_debugging_mvcc_watcher_total")?,
        catching_up: gauge("etcd_debugging_mvcc_slow_watcher_total")?,
    })
}
