//! An etcd cluster on loopback for the cluster tests: its members on free
//! ports, with data folders in a temporary folder, started together and
//! waited for until each says it is healthy (polled every [`POLL`] under
//! [`DEADLINE`]). Every member is SIGKILLed when the cluster is dropped,
//! and a member may be stopped, continued or killed meanwhile. The members
//! also die with the thread that started them (`PR_SET_PDEATHSIG`), so a
//! test binary that is killed leaves none behind.
//!
//! What the fixture itself asks of etcd (its health, its leader, a
//! compaction) it asks over a plain blocking HTTP/1.1 exchange, not
//! through the gateway under test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use super::{DEADLINE, POLL};

/// The election settings of the tests' clusters: short, so a lost leader
/// is replaced quickly. etcd's minimum lease TTL follows from them (1.5
/// election timeouts, rounded up to whole seconds: 1 s here).
pub const HEARTBEAT: Duration = Duration::from_millis(25);
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(250);

/// A running etcd cluster, killed when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    election_timeout: Duration,
    /// The members' data folders and logs, removed after the members.
    _dir: TempDir,
}

struct Member {
    child: Child,
    client: SocketAddr,
    log: PathBuf,
}

impl EtcdCluster {
    /// `size` members with [`HEARTBEAT`] and [`ELECTION_TIMEOUT`], healthy.
    pub fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, HEARTBEAT, ELECTION_TIMEOUT)
    }

    /// `size` members with these election settings, healthy.
    pub fn start_with(size: usize, heartbeat: Duration, election_timeout: Duration) -> EtcdCluster {
        // In memory where the machine has it: etcd syncs its log to disk
        // at every commit, and a slow disk on a busy machine makes for
        // elections nobody asked for, in tests that time elections.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary folder for etcd");
        let ports = free_ports(2 * size);
        let peer_url = |index: usize| format!("http://127.0.0.1:{}", ports[2 * index + 1]);
        let initial_cluster = (0..size)
            .map(|index| format!("m{index}={}", peer_url(index)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("presenced-test-{}-{}", std::process::id(), ports[0]);
        let members = (0..size)
            .map(|index| {
                let client = SocketAddr::from(([127, 0, 0, 1], ports[2 * index]));
                let log = dir.path().join(format!("m{index}.log"));
                let log_file = std::fs::File::create(&log).expect("an etcd log file");
                let mut command = Command::new("etcd");
                command
                    .arg("--name")
                    .arg(format!("m{index}"))
                    .arg("--data-dir")
                    .arg(dir.path().join(format!("m{index}")))
                    .arg("--listen-client-urls")
                    .arg(format!("http://{client}"))
                    .arg("--advertise-client-urls")
                    .arg(format!("http://{client}"))
                    .arg("--listen-peer-urls")
                    .arg(peer_url(index))
                    .arg("--initial-advertise-peer-urls")
                    .arg(peer_url(index))
                    .arg("--initial-cluster")
                    .arg(&initial_cluster)
                    .arg("--initial-cluster-state")
                    .arg("new")
                    .arg("--initial-cluster-token")
                    .arg(&token)
                    .arg("--heartbeat-interval")
                    .arg(heartbeat.as_millis().to_string())
                    .arg("--election-timeout")
                    .arg(election_timeout.as_millis().to_string())
                    .stdin(Stdio::null())
                    .stdout(log_file.try_clone().expect("the log, twice"))
                    .stderr(log_file);
                // SAFETY: between fork and exec the closure makes one
                // system call; it allocates nothing and takes no lock.
                unsafe {
                    command.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(Into::into)
                    });
                }
                let child = command.spawn().expect("etcd starts");
                Member { child, client, log }
            })
            .collect();
        let cluster = EtcdCluster {
            members,
            election_timeout,
            _dir: dir,
        };
        for index in 0..size {
            cluster.wait_healthy(index);
        }
        cluster
    }

    /// The client URL of every member, in order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|index| self.endpoint(index))
            .collect()
    }

    /// The client URL of member `index`.
    pub fn endpoint(&self, index: usize) -> String {
        format!("http://{}", self.members[index].client)
    }

    pub fn election_timeout(&self) -> Duration {
        self.election_timeout
    }

    /// SIGSTOPs member `index`: it holds its connections and answers nothing.
    pub fn stop(&self, index: usize) {
        self.signal(index, Signal::SIGSTOP);
    }

    /// SIGCONTs member `index`.
    pub fn resume(&self, index: usize) {
        self.signal(index, Signal::SIGCONT);
    }

    /// SIGKILLs member `index`, and waits until it is gone: its port
    /// refuses connections from then on.
    pub fn kill(&mut self, index: usize) {
        let member = &mut self.members[index];
        member
            .child
            .kill()
            .unwrap_or_else(|error| panic!("SIGKILL to etcd member {index}: {error}"));
        member.child.wait().expect("the killed member's status");
    }

    fn signal(&self, index: usize, signal: Signal) {
        let pid = Pid::from_raw(self.members[index].child.id() as i32);
        kill(pid, signal)
            .unwrap_or_else(|error| panic!("{signal} to etcd member {index}: {error}"));
    }

    /// Which member leads, as the members answering agree.
    pub fn leader(&self) -> usize {
        let started = Instant::now();
        loop {
            let ids: Vec<Option<(String, String)>> = (0..self.members.len())
                .map(|index| {
                    let status = self.post(index, "/v3/maintenance/status", "{}").ok()?;
                    let member = status["header"]["member_id"].as_str()?.to_owned();
                    let leader = status["leader"].as_str()?.to_owned();
                    Some((member, leader))
                })
                .collect();
            let leaders: Vec<&str> = ids.iter().flatten().map(|(_, l)| l.as_str()).collect();
            if let Some(first) = leaders.first()
                && leaders.iter().all(|leader| leader == first)
                && let Some(index) = ids
                    .iter()
                    .position(|id| id.as_ref().is_some_and(|(member, _)| member == first))
            {
                return index;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no agreed etcd leader after {DEADLINE:?}: {ids:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Compacts the key-value store up to `revision`, through member 0.
    pub fn compact(&self, revision: i64) {
        let body = serde_json::json!({ "revision": revision.to_string(), "physical": true });
        self.post(0, "/v3/kv/compaction", &body.to_string())
            .unwrap_or_else(|error| panic!("compaction to {revision}: {error}"));
    }

    /// Waits until member `index` says it is healthy (it has a leader).
    pub fn wait_healthy(&self, index: usize) {
        let started = Instant::now();
        loop {
            let last = match exchange(self.members[index].client, "GET", "/health", "") {
                Ok(reply) if reply["health"] == "true" => return,
                Ok(reply) => reply.to_string(),
                Err(error) => error,
            };
            if started.elapsed() > DEADLINE {
                let log = std::fs::read_to_string(&self.members[index].log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "etcd member {index} not healthy after {DEADLINE:?} ({last}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The key-value requests that write or may write (`Txn`, `Put`,
    /// `DeleteRange`) every member has handled so far, from their metrics:
    /// every write of an entry is one of these, whatever its outcome.
    pub fn kv_writes(&self) -> u64 {
        self.members
            .iter()
            .map(|member| {
                // HTTP/1.0: a reply never in chunks, whose boundaries could
                // cut a metric's line in two.
                let request = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", member.client);
                let metrics = send(member.client, &request)
                    .unwrap_or_else(|error| panic!("etcd's metrics: {error}"));
                metrics
                    .lines()
                    .filter(|line| {
                        line.starts_with("grpc_server_handled_total{")
                            && line.contains("grpc_service=\"etcdserverpb.KV\"")
                            && ["Txn", "Put", "DeleteRange"]
                                .iter()
                                .any(|method| line.contains(&format!("grpc_method=\"{method}\"")))
                    })
                    .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .map(|count| count as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    fn post(&self, index: usize, path: &str, body: &str) -> Result<Value, String> {
        exchange(self.members[index].client, "POST", path, body)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            // SIGKILL ends a stopped member too.
            let _ = member.child.kill();
            let _ = member.child.wait();
        }
    }
}

/// `count` distinct free ports on loopback, each held until all are found.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("its address").port())
        .collect()
}

/// One HTTP/1.1 exchange, the connection closed after it; the reply's JSON.
fn exchange(address: SocketAddr, method: &str, path: &str, body: &str) -> Result<Value, String> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = send(address, &request)?;
    // The JSON object of the body, whether or not it came in chunks (these
    // replies are small: one chunk).
    let (Some(start), Some(end)) = (reply.find('{'), reply.rfind('}')) else {
        return Err(format!("no JSON in {reply:?}"));
    };
    serde_json::from_str(&reply[start..=end]).map_err(|error| format!("{error} in {reply:?}"))
}

/// Sends `request` on a new connection and reads the reply until the
/// member closes it.
fn send(address: SocketAddr, request: &str) -> Result<String, String> {
    let timeout = Duration::from_secs(1);
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|error| error.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|error| error.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|error| error.to_string())?;
    Ok(reply)
}
