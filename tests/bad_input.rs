//! Bad input gets a clear error and the daemon keeps serving.

use crate::common::{Daemon, error_code};

#[tokio::test]
async fn a_malformed_line_gets_bad_json_and_the_connection_lives_on() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let reply = raw.request(r#"{"op": "ping", "id": 1"#).await;
    assert_eq!(error_code(&reply), "bad_json");
    assert_eq!(reply["id"], serde_json::Value::Null);

    let reply = raw.request(r#"{"op":"ping","id":2}"#).await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["id"], 2);
}

#[tokio::test]
async fn unknown_ops_and_missing_fields_are_told_apart() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let reply = raw.request(r#"{"op":"teleport","id":"a"}"#).await;
    assert_eq!(error_code(&reply), "unknown_op");
    assert_eq!(reply["id"], "a");
    let reply = raw.request(r#"{"op":"track","id":"b","topic":"t"}"#).await;
    assert_eq!(error_code(&reply), "bad_request");
    let reply = raw.request(r#"{"op":"hello","id":"c","protocol":2}"#).await;
    assert_eq!(error_code(&reply), "unsupported_protocol");
    let reply = raw
        .request(r#"{"op":"hello","id":"d","client":"test"}"#)
        .await;
    assert_eq!(reply["protocol"], 1);
    assert_eq!(reply["server"], "presenced 0.1.0");
    assert_eq!(reply["pid"], daemon.pid());
}

#[tokio::test]
async fn a_reserved_meta_field_is_refused() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    for field in [
        "phx_ref",
        "seq",
        "joined_at",
        "pid",
        "uid",
        "user",
        "phx_ref_prev",
    ] {
        let request = format!(
            r#"{{"op":"track","id":1,"topic":"t","key":"k","meta":{{"{field}":"forged"}}}}"#
        );
        let reply = raw.request(&request).await;
        assert_eq!(error_code(&reply), "bad_request", "{field}");
    }
    let oversized = "x".repeat(9000);
    let reply = raw
        .request(&format!(
            r#"{{"op":"track","id":1,"topic":"t","key":"k","meta":{{"note":"{oversized}"}}}}"#
        ))
        .await;
    assert_eq!(error_code(&reply), "limit_exceeded");
    let reply = raw.request(r#"{"op":"list","id":2,"topic":"t"}"#).await;
    assert_eq!(reply["presences"], serde_json::json!({}));
}

#[tokio::test]
async fn an_over_long_line_gets_line_too_long_and_the_connection_closes() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let mut line = vec![b'x'; 70 * 1024];
    line.push(b'\n');
    raw.send_bytes(&line).await;
    let reply = raw.next().await.expect("an error before the close");
    assert_eq!(error_code(&reply), "line_too_long");
    assert_eq!(raw.next().await, None, "the connection should be closed");

    // Everyone else is still served.
    let mut other = daemon.raw().await;
    assert_eq!(other.request(r#"{"op":"ping"}"#).await["ok"], true);
}

#[tokio::test]
async fn tracking_the_same_key_twice_on_one_connection_is_already_tracked() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let track = r#"{"op":"track","id":1,"topic":"t","key":"alice"}"#;
    assert_eq!(raw.request(track).await["ok"], true);
    assert_eq!(error_code(&raw.request(track).await), "already_tracked");
    // The same key from another connection is its own entry.
    let mut other = daemon.raw().await;
    let reply = other.request(track).await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["position"], 1);
}

#[tokio::test]
async fn naming_a_process_that_is_not_running_is_not_found() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    // Above any pid_max Linux allows, so never a running process.
    let reply = raw
        .request(r#"{"op":"track","id":1,"topic":"t","key":"k","pid":999999999}"#)
        .await;
    assert_eq!(error_code(&reply), "not_found");
    assert_eq!(reply["id"], 1);
}

#[tokio::test]
async fn replies_keep_request_order_across_early_refusals() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    // A refusal decided before the core, between two requests the core
    // answers, must still come back in its place.
    raw.send(r#"{"op":"track","id":1,"topic":"t","key":"a"}"#)
        .await;
    raw.send(r#"{"op":"track","id":2,"topic":"t","key":"b","pid":999999999}"#)
        .await;
    raw.send(r#"{"op":"ping","id":3}"#).await;
    let ids: Vec<serde_json::Value> = [
        raw.next().await.expect("reply 1"),
        raw.next().await.expect("reply 2"),
        raw.next().await.expect("reply 3"),
    ]
    .iter()
    .map(|reply| reply["id"].clone())
    .collect();
    assert_eq!(ids, [1, 2, 3]);
}

/// At the connection cap a newcomer gets one error line and the close,
/// even when it sent a request before reading (closing with it unread
/// would reset the connection and lose the line); the others go on.
#[tokio::test]
async fn a_connection_over_the_cap_is_told_why_and_closed() {
    let daemon = Daemon::start_with(&["--max-connections", "1"]).await;
    let mut first = daemon.raw().await;
    first.request(r#"{"op":"ping","id":1}"#).await;

    let mut late = daemon.raw().await;
    late.send(r#"{"op":"ping","id":1}"#).await;
    let refusal = late.next().await.expect("the refusal line");
    assert_eq!(error_code(&refusal), "limit_exceeded");
    assert_eq!(refusal["id"], serde_json::Value::Null);
    assert_eq!(late.next().await, None, "then the connection closes");

    let reply = first.request(r#"{"op":"ping","id":2}"#).await;
    assert_eq!(reply["ok"], true);
}
