//! `presence daemon`: its options, and the daemon's configuration made of
//! them. The daemon itself is [`crate::daemon`]'s.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::daemon::{ClusterConfig, LeaseSettings};
use crate::protocol::Limits;

use super::args::duration_up_to;

/// The heading of the cluster options.
const CLUSTER: &str = "Cluster";

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The SQLite database [default: $XDG_STATE_HOME/presenced/presence.db,
    /// else ~/.local/state/presenced/presence.db]
    #[arg(long, env = "PRESENCE_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// How long a restored connection entry keeps its place, waiting for
    /// its client to resume it (seconds, or 10s, 2m)
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_up_to(86_400.0))]
    pub resume_grace: Duration,

    /// Longest request line, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_line_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_line: usize,

    /// Longest topic or key, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_name_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_name: usize,

    /// Largest meta, serialized, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_meta_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_meta: usize,

    /// Most entries one connection may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries_per_connection, value_parser = parse_limit, help_heading = "Limits")]
    pub max_entries: usize,

    /// Most `lifetime: "process"` entries one user may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_process_entries_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_process_entries: usize,

    /// Most subscriptions one connection may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_subscriptions_per_connection, value_parser = parse_limit, help_heading = "Limits")]
    pub max_subscriptions: usize,

    /// Most connections served at once
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections, value_parser = parse_limit, help_heading = "Limits")]
    pub max_connections: usize,

    /// Most connections one user may hold at once; the daemon's own user
    /// is not held to it
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_connections_per_uid: usize,

    /// Most entries the daemon holds, of all users together
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_total_entries, value_parser = parse_limit, help_heading = "Limits")]
    pub max_total_entries: usize,

    /// Most entries one user may hold, over all connections; the daemon's
    /// own user is not held to it
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_entries_per_uid: usize,

    /// Most bytes of meta one user's entries may hold together; the
    /// daemon's own user is not held to it
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_meta_bytes_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_meta_per_uid: usize,

    /// Bytes queued for one connection before its diffs are dropped for a
    /// fresh state and its next request waits
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_outbound_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_outbound: usize,

    /// Bytes queued for all connections together before requests for large
    /// replies wait and connections that have stopped reading are closed
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_outbound_total_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_outbound_total: usize,

    /// Days of history kept for `presence log`
    #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=36_500), help_heading = "History")]
    pub history_days: u64,

    /// Most history events kept for `presence log`
    #[arg(long, value_name = "EVENTS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..), help_heading = "History")]
    pub history_events: u64,

    /// Let the members of GROUP connect too (socket 0660, folder 0750)
    /// [default: with --system, presence; else nobody]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Print `ready` on stdout once listening (for whoever started us)
    #[arg(long, hide = true)]
    pub ready_on_stdout: bool,

    /// A client started us on demand: `status` reports `autostart`
    #[arg(long, hide = true)]
    pub autostarted: bool,

    /// Most commands one transaction takes; 1 turns group commit off (for
    /// benchmarks, to show what it saves)
    #[arg(long, hide = true, value_name = "N", default_value_t = crate::daemon::DEFAULT_MAX_BATCH, value_parser = parse_limit)]
    pub max_batch: usize,

    /// Share topics with the daemons of other hosts through the etcd
    /// cluster at these client URLs (http://host:port, comma-separated)
    #[arg(long, env = "PRESENCE_ETCD", value_name = "URL", value_delimiter = ',', help_heading = CLUSTER)]
    pub etcd: Vec<String>,

    /// Share the topics matching this glob (`*` also matches `/`);
    /// repeat it for more. Needed with --etcd
    #[arg(long, value_name = "GLOB", requires = "etcd", help_heading = CLUSTER)]
    pub cluster_topics: Vec<String>,

    /// This host's name in the cluster, unique among its daemons
    /// [default: the machine's host name up to its first `.`]
    #[arg(long, value_name = "NAME", requires = "etcd", help_heading = CLUSTER)]
    pub host: Option<String>,

    /// Where the cluster's keys live in etcd; daemons given the same
    /// prefix share topics
    #[arg(long, value_name = "PREFIX", default_value = crate::daemon::DEFAULT_PREFIX, requires = "etcd", help_heading = CLUSTER)]
    pub cluster_prefix: String,

    /// How long etcd keeps this host's entries after it stops hearing from
    /// it (whole seconds: 5s, 1m)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration_up_to(3_600.0), requires = "etcd", help_heading = CLUSTER)]
    pub cluster_ttl: Duration,

    /// etcd's election timeout (its --election-timeout, which etcd takes in
    /// milliseconds: 1000 there is 1s here): the fence must outlast an
    /// election
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration_up_to(60.0), requires = "etcd", help_heading = CLUSTER)]
    pub etcd_election_timeout: Duration,

    /// How long before etcd could end the lease this host stops letting its
    /// entries own
    #[arg(long, hide = true, value_name = "DURATION", default_value = "1s", value_parser = duration_up_to(3_600.0), requires = "etcd")]
    pub cluster_margin: Duration,

    /// The time between renewals of the lease
    #[arg(long, hide = true, value_name = "DURATION", default_value = "1s", value_parser = duration_up_to(3_600.0), requires = "etcd")]
    pub cluster_renew_every: Duration,

    /// How long one attempt on one etcd member may take
    #[arg(long, hide = true, value_name = "DURATION", default_value = "300ms", value_parser = duration_up_to(60.0), requires = "etcd")]
    pub etcd_attempt_timeout: Duration,
}

/// Runs the daemon in the foreground on `socket` until a signal stops it.
pub fn run(socket: PathBuf, system: bool, args: DaemonArgs) -> anyhow::Result<()> {
    crate::daemon::run(config(socket, system, args)?)
}

/// The daemon's configuration: the options, and with `--system` the
/// system-wide daemon's database and group. Cluster settings that could
/// not work are refused here, before anything starts.
fn config(
    socket: PathBuf,
    system: bool,
    args: DaemonArgs,
) -> anyhow::Result<crate::daemon::DaemonConfig> {
    let cluster = cluster_config(&args)?;
    use crate::paths::{SYSTEM_DB, SYSTEM_GROUP};
    let group = args.group.or(system.then(|| SYSTEM_GROUP.to_owned()));
    let db = match (args.db, system) {
        (Some(db), _) => db,
        (None, true) => PathBuf::from(SYSTEM_DB),
        (None, false) => crate::paths::default_db(),
    };
    Ok(crate::daemon::DaemonConfig {
        socket,
        group,
        db,
        limits: Limits {
            max_line_bytes: args.max_line,
            max_name_bytes: args.max_name,
            max_meta_bytes: args.max_meta,
            max_entries_per_connection: args.max_entries,
            max_process_entries_per_uid: args.max_process_entries,
            max_subscriptions_per_connection: args.max_subscriptions,
            max_connections: args.max_connections,
            max_connections_per_uid: args.max_connections_per_uid,
            max_outbound_bytes: args.max_outbound,
            max_total_entries: args.max_total_entries,
            max_entries_per_uid: args.max_entries_per_uid,
            max_meta_bytes_per_uid: args.max_meta_per_uid,
            max_outbound_total_bytes: args.max_outbound_total,
        },
        resume_grace: args.resume_grace,
        history: crate::daemon::Retention {
            max_age: Duration::from_secs(args.history_days * 24 * 3600),
            max_rows: args.history_events,
        },
        ready_on_stdout: args.ready_on_stdout,
        autostarted: args.autostarted,
        max_batch: args.max_batch,
        cluster,
    })
}

/// Cluster mode's settings, if `--etcd` turns it on.
fn cluster_config(args: &DaemonArgs) -> anyhow::Result<Option<ClusterConfig>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    let host = match &args.host {
        Some(host) => host.clone(),
        None => machine_host_name()?,
    };
    let lease = LeaseSettings {
        ttl: args.cluster_ttl,
        margin: args.cluster_margin,
        period: args.cluster_renew_every,
        election_timeout: args.etcd_election_timeout,
    };
    ClusterConfig::new(
        args.etcd.clone(),
        args.cluster_topics.clone(),
        host,
        args.cluster_prefix.clone(),
        lease,
        args.etcd_attempt_timeout,
    )
    .map(Some)
    .map_err(|problem| anyhow::anyhow!("cluster mode: {problem}"))
}

/// The machine's host name up to its first `.`: `web-1` of
/// `web-1.example.org`, as a host is named in its entries' refs.
fn machine_host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|error| {
        anyhow::anyhow!("cluster mode: cannot read this machine's host name ({error}); give --host")
    })?;
    let name = name.trim();
    Ok(name.split('.').next().unwrap_or(name).to_owned())
}

/// A limit: a whole number from 1 to 2^30.
fn parse_limit(text: &str) -> Result<usize, String> {
    const MAX: usize = 1 << 30;
    match text.parse::<usize>() {
        Ok(value) if (1..=MAX).contains(&value) => Ok(value),
        _ => Err(format!("expected a whole number from 1 to {MAX}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::args::{Cli, Command};

    /// `presence daemon ARGS`' own options, as clap reads them.
    fn parsed(args: &[&str]) -> Result<DaemonArgs, clap::Error> {
        let cli = Cli::try_parse_from(["presence", "daemon"].iter().chain(args))?;
        match cli.command {
            Command::Daemon(args) => Ok(*args),
            other => panic!("not the daemon's command: {other:?}"),
        }
    }

    fn cluster(args: &[&str]) -> Result<Option<ClusterConfig>, String> {
        let args = parsed(args).map_err(|error| error.to_string())?;
        cluster_config(&args).map_err(|error| error.to_string())
    }

    const ETCD: &[&str] = &["--etcd", "http://127.0.0.1:2379,http://127.0.0.1:22379"];

    #[test]
    fn without_etcd_there_is_no_cluster_and_its_options_are_refused() {
        assert!(cluster(&[]).expect("a local daemon").is_none());
        for option in [
            &["--cluster-topics", "doc:*"][..],
            &["--host", "web-1"],
            &["--cluster-ttl", "5"],
        ] {
            let refused = parsed(option).expect_err("a cluster option without --etcd");
            assert!(refused.to_string().contains("--etcd"), "{refused}");
        }
    }

    #[test]
    fn etcd_with_topics_gives_the_defaults_of_the_fence() {
        let args = [ETCD, &["--cluster-topics", "doc:*", "--host", "web-1"]].concat();
        let config = cluster(&args)
            .expect("settings that hold")
            .expect("cluster mode");
        assert_eq!(config.endpoints.len(), 2);
        assert_eq!(config.host, "web-1");
        assert_eq!(config.prefix, "/presenced/");
        assert!(config.shared.includes("doc:a/b.md"));
        assert!(!config.shared.includes("notes"));
        assert_eq!(
            config.lease,
            LeaseSettings {
                ttl: Duration::from_secs(5),
                margin: Duration::from_secs(1),
                period: Duration::from_secs(1),
                election_timeout: Duration::from_secs(1),
            }
        );
        assert_eq!(config.attempt_timeout, Duration::from_millis(300));
    }

    #[test]
    fn cluster_durations_are_written_as_the_daemon_writes_durations() {
        let args = [
            ETCD,
            &["--cluster-topics", "doc:*", "--host", "web-1"],
            &["--cluster-ttl", "1m", "--etcd-election-timeout", "1500ms"],
        ]
        .concat();
        let config = cluster(&args)
            .expect("settings that hold")
            .expect("cluster mode");
        assert_eq!(config.lease.ttl, Duration::from_secs(60));
        assert_eq!(config.lease.election_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn settings_that_could_not_work_are_refused_in_one_line() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--cluster-topics"),
            (&["--cluster-topics", "["], "pattern"),
            (&["--cluster-topics", "a*", "--host", "web 1"], "host"),
            (
                &[
                    "--cluster-topics",
                    "a*",
                    "--host",
                    "h",
                    "--cluster-ttl",
                    "2",
                ],
                "election",
            ),
            (
                &[
                    "--cluster-topics",
                    "a*",
                    "--host",
                    "h",
                    "--cluster-ttl",
                    "4.5",
                ],
                "whole seconds",
            ),
        ];
        for (extra, says) in cases {
            let args = [ETCD, extra].concat();
            let refused = cluster(&args).expect_err("settings that cannot work");
            assert!(refused.contains(says), "{args:?}: {refused}");
            assert_eq!(refused.lines().count(), 1, "{refused}");
        }
        let bad_endpoint = cluster(&["--etcd", "etcd:2379", "--cluster-topics", "a*"])
            .expect_err("an endpoint without its scheme");
        assert!(bad_endpoint.contains("http://host:port"), "{bad_endpoint}");
    }

    #[test]
    fn the_default_host_is_the_machine_name_up_to_its_first_dot() {
        let host = machine_host_name().expect("the host name is readable");
        assert!(!host.is_empty() && !host.contains('.'), "{host:?}");
    }
}
