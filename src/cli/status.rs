//! `presence status`: how the daemon is.

use clap::Args;
use serde_json::Value;

use super::render;
use super::render::{Cell, Style};
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::protocol::{Empty, Request, StatusReply};
use crate::sys::now_millis;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's `status` reply fields as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: StatusArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect_running().await?;
    let fields = request_fields(
        &client,
        &Request::Status(Empty {}),
        "could not ask the daemon",
    )
    .await?;
    if args.json {
        say!("{}", serde_json::to_string(&Value::Object(fields))?);
        return Ok(());
    }
    let status: StatusReply = decode(fields, "status")?;
    say!("{}", render::pairs(&rows(&status)).trim_end());
    Ok(())
}

/// Each fact as a label and its value.
fn rows(status: &StatusReply) -> Vec<(&'static str, Cell)> {
    let ours = env!("CARGO_PKG_VERSION");
    let version = if status.version == ours {
        Cell::from(format!("{} (protocol {})", status.version, status.protocol))
    } else {
        // Worth knowing before reading anything else it says.
        Cell::new(
            format!(
                "{} (protocol {}); this presence is {ours}",
                status.version, status.protocol
            ),
            Style::Notice,
        )
    };
    let started = now_millis() - i64::try_from(status.uptime_ms).unwrap_or(i64::MAX);
    let recovered = match &status.db_recovered {
        None => Cell::from("no"),
        Some(moved_to) => Cell::new(
            format!("yes: the unreadable file was moved to {moved_to}"),
            Style::Notice,
        ),
    };
    let count = |n: usize| Cell::from(n.to_string());
    let mut rows = vec![
        ("version", version),
        ("pid", count(status.pid as usize)),
        (
            "started by",
            Cell::from(started_by(status.started_by.as_deref())),
        ),
        (
            "uptime",
            Cell::from(format!(
                "{}, since {}",
                render::duration(status.uptime_ms),
                render::at(started)
            )),
        ),
        ("socket", Cell::from(status.socket.as_str())),
        ("database", Cell::from(status.db.as_str())),
        ("db recovered", recovered),
        ("topics", count(status.topics)),
        ("entries", count(status.entries)),
        ("connections", count(status.connections)),
        ("subscriptions", count(status.subscriptions)),
        ("awaiting resume", count(status.awaiting_resume)),
        ("transactions", Cell::from(status.transactions.to_string())),
        (
            "outbound",
            Cell::from(format!(
                "{} bytes unsent of a budget of {}, at most {} to one connection",
                status.outbound_bytes, status.outbound_budget_bytes, status.largest_outbound_bytes
            )),
        ),
        ("pid watch", Cell::from(status.pid_watch.as_str())),
    ];
    rows.extend(cluster_rows(status));
    rows
}

/// A daemon in cluster mode: who it is in the cluster, and how it stands
/// with etcd. A local daemon's reply has none of this, and prints none.
fn cluster_rows(status: &StatusReply) -> Vec<(&'static str, Cell)> {
    let Some(cluster) = &status.cluster else {
        return Vec::new();
    };
    let renewed = cluster
        .renewed_ms_ago
        .map(|ms| format!(", renewed {} ago", lease_time(ms)))
        .unwrap_or_default();
    let lease = match (cluster.lease.as_str(), &cluster.lease_id) {
        ("live", Some(id)) => Cell::from(match cluster.fence_in_ms {
            Some(ms) => format!(
                "live ({id}){renewed}, fenced in {} unless renewed",
                lease_time(ms)
            ),
            None => format!("live ({id}){renewed}"),
        }),
        ("fenced", Some(id)) => Cell::new(
            format!("fenced ({id}){renewed}: etcd is not answering, so no entry of this host owns"),
            Style::Notice,
        ),
        ("granting", _) => Cell::new("granting: asking etcd for a lease", Style::Notice),
        ("stopped", _) => Cell::new("stopped: cluster mode is off", Style::Notice),
        (other, id) => Cell::from(match id {
            Some(id) => format!("{other} ({id})"),
            None => other.to_owned(),
        }),
    };
    // The member in use first, then the others it moves on to.
    let others: Vec<&str> = cluster
        .endpoints
        .iter()
        .map(String::as_str)
        .filter(|endpoint| *endpoint != cluster.endpoint)
        .collect();
    let etcd = if others.is_empty() {
        cluster.endpoint.clone()
    } else {
        format!("{}, then {}", cluster.endpoint, others.join(", "))
    };
    let watch = match (&cluster.watching, cluster.revision) {
        (Some(member), Some(revision)) => format!("revision {revision}, on {member}"),
        (None, Some(revision)) => format!("revision {revision}, not watching now"),
        (_, None) => "not listed yet".to_owned(),
    };
    let mut rows = vec![
        (
            "cluster",
            Cell::from(format!(
                "host {}, sharing {} under {}",
                cluster.host,
                cluster.topics.join(" "),
                cluster.prefix
            )),
        ),
        ("etcd", Cell::from(etcd)),
        ("lease", lease),
        ("watch", Cell::from(watch)),
        (
            "etcd writes",
            Cell::from(format!("{} in flight", cluster.writes_in_flight)),
        ),
    ];
    if let Some(error) = &cluster.last_error {
        rows.push(("etcd error", Cell::new(error.as_str(), Style::Notice)));
    }
    rows
}

/// A lease's times, which are seconds long and matter to the tenth.
fn lease_time(millis: u64) -> String {
    if millis < 60_000 {
        format!("{:.1}s", millis as f64 / 1000.0)
    } else {
        render::duration(millis)
    }
}

/// How the daemon was started, in words.
fn started_by(how: Option<&str>) -> String {
    match how {
        Some("autostart") => "autostart (a client started it; `presence stop` stops it)".to_owned(),
        Some("systemd") => "systemd".to_owned(),
        Some("foreground") => "foreground (`presence daemon`)".to_owned(),
        Some(other) => other.to_owned(),
        None => "unknown (the daemon predates this field)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PROTOCOL_VERSION;

    fn local_status() -> StatusReply {
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL_VERSION,
            pid: 42,
            uptime_ms: 1_000,
            socket: "/run/presenced.sock".to_owned(),
            db: "/var/lib/presence.db".to_owned(),
            db_recovered: None,
            topics: 1,
            entries: 2,
            connections: 3,
            subscriptions: 0,
            pid_watch: "pidfd".to_owned(),
            awaiting_resume: 0,
            transactions: 9,
            outbound_bytes: 0,
            largest_outbound_bytes: 0,
            outbound_budget_bytes: 1 << 20,
            started_by: Some("foreground".to_owned()),
            cluster: None,
        }
    }

    fn labels(status: &StatusReply) -> Vec<&'static str> {
        rows(status).into_iter().map(|(label, _)| label).collect()
    }

    fn cell<'a>(rows: &'a [(&'static str, Cell)], label: &str) -> &'a Cell {
        &rows
            .iter()
            .find(|(name, _)| *name == label)
            .unwrap_or_else(|| panic!("no {label} row"))
            .1
    }

    #[test]
    fn a_local_daemon_prints_no_cluster_block() {
        let labels = labels(&local_status());
        assert!(!labels.contains(&"cluster"), "{labels:?}");
        assert_eq!(labels.last(), Some(&"pid watch"));
    }

    #[test]
    fn a_daemon_in_cluster_mode_says_who_it_is_and_how_its_lease_stands() {
        let mut status = local_status();
        status.cluster = serde_json::from_value(serde_json::json!({
            "host": "web-1",
            "prefix": "/presenced/",
            "topics": ["doc:*"],
            "endpoints": ["http://10.0.0.2:2379", "http://10.0.0.1:2379"],
            "endpoint": "http://10.0.0.1:2379",
            "lease": "live",
            "lease_id": "694d",
            "renewed_ms_ago": 250,
            "fence_in_ms": 3_200,
            "revision": 7,
            "watching": "http://10.0.0.1:2379",
            "writes_in_flight": 0,
        }))
        .expect("a cluster status");
        let rows = rows(&status);
        assert_eq!(
            cell(&rows, "cluster").text,
            "host web-1, sharing doc:* under /presenced/"
        );
        assert_eq!(
            cell(&rows, "etcd").text,
            "http://10.0.0.1:2379, then http://10.0.0.2:2379"
        );
        assert_eq!(
            cell(&rows, "lease").text,
            "live (694d), renewed 0.2s ago, fenced in 3.2s unless renewed"
        );
        assert_eq!(
            cell(&rows, "watch").text,
            "revision 7, on http://10.0.0.1:2379"
        );
        assert!(rows.iter().all(|(label, _)| *label != "etcd error"));

        let cluster = status.cluster.as_mut().expect("set above");
        cluster.lease = "fenced".to_owned();
        cluster.last_error = Some("no etcd endpoint answered".to_owned());
        let rows = super::rows(&status);
        assert_eq!(cell(&rows, "lease").style, Style::Notice);
        assert!(
            cell(&rows, "lease")
                .text
                .starts_with("fenced (694d), renewed 0.2s ago:"),
            "{}",
            cell(&rows, "lease").text
        );
        assert_eq!(cell(&rows, "etcd error").text, "no etcd endpoint answered");
    }
}
