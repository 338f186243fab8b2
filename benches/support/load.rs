//! Many connections at once: closed-loop load for throughput, idle
//! connections for scale, subscribers for fan-out. These speak raw lines
//! rather than go through the client library, so that the load generator
//! costs the same against the daemon as against the echo baseline.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A raw connection: request lines out, reply and event lines in.
pub struct Line {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    buffer: String,
}

impl Line {
    pub async fn connect(socket: &Path) -> anyhow::Result<Line> {
        let (read, write) = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?
            .into_split();
        Ok(Line {
            read: BufReader::new(read),
            write,
            buffer: String::new(),
        })
    }

    pub async fn send(&mut self, line: &[u8]) -> anyhow::Result<()> {
        Ok(self.write.write_all(line).await?)
    }

    /// The next line, without its newline.
    pub async fn next(&mut self) -> anyhow::Result<&str> {
        self.buffer.clear();
        if self.read.read_line(&mut self.buffer).await? == 0 {
            bail!("the connection closed");
        }
        Ok(self.buffer.trim_end())
    }

    /// Sends `line` and returns the next line that is a reply (events in
    /// between are skipped); fails unless it says `"ok":true`.
    pub async fn request(&mut self, line: &[u8]) -> anyhow::Result<&str> {
        self.send(line).await?;
        loop {
            self.buffer.clear();
            if self.read.read_line(&mut self.buffer).await? == 0 {
                bail!("the connection closed");
            }
            if !self.buffer.starts_with("{\"event\"") {
                break;
            }
        }
        ensure!(
            self.buffer.contains("\"ok\":true"),
            "refused: {}",
            self.buffer.trim_end()
        );
        Ok(self.buffer.trim_end())
    }
}

/// How many topics the throughput scenario's clients spread over.
pub const TOPICS: usize = 256;

/// The requests client `client` sends in the throughput scenario, in turn:
/// a track on one of its topics, then the untrack of it, cycling through
/// `TOPICS / clients` topics so that all of them are used.
pub fn cycle_line(client: usize, n: u64, clients: usize) -> Vec<u8> {
    let round = (n / 2) as usize;
    let topic = (client + clients * (round % (TOPICS / clients).max(1))) % TOPICS;
    let op = if n.is_multiple_of(2) {
        "track"
    } else {
        "untrack"
    };
    format!("{{\"op\":\"{op}\",\"id\":{n},\"topic\":\"load-{topic}\",\"key\":\"c{client}\"}}\n")
        .into_bytes()
}

/// How much a closed loop got done.
pub struct Throughput {
    pub requests: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` connections to `socket`, each sending `line(client, n)` and
/// waiting for its answer (an echo must be the line itself; a daemon's
/// must say ok), over and over for `duration` once all are connected.
pub async fn closed_loop(
    socket: &Path,
    clients: usize,
    duration: Duration,
    echo: bool,
    line: fn(usize, u64, usize) -> Vec<u8>,
) -> anyhow::Result<Throughput> {
    let mut lines = Vec::with_capacity(clients);
    for _ in 0..clients {
        lines.push(Line::connect(socket).await?);
    }
    let requests = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (client, mut connection) in lines.into_iter().enumerate() {
        let requests = Arc::clone(&requests);
        tasks.spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let request = line(client, n, clients);
                if echo {
                    connection.send(&request).await?;
                    let echoed = connection.next().await?;
                    ensure!(echoed.as_bytes() == request.trim_ascii_end(), "bad echo");
                } else {
                    connection.request(&request).await?;
                }
                n += 1;
                requests.fetch_add(1, Ordering::Relaxed);
            }
            // Leave nothing behind for the next scenario: an odd count
            // ended on a track.
            if !echo && n % 2 == 1 {
                connection.request(&line(client, n, clients)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(Throughput {
        requests: requests.load(Ordering::Relaxed),
        elapsed: deadline - start,
    })
}

/// Raises this process's open-files limit to its hard limit, for the
/// scenarios that hold thousands of connections.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    Ok(limit.maximum.unwrap_or(u64::MAX))
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS in /proc status")
}
