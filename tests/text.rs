//! Text that cannot lie: topics and keys with control or format
//! characters (bidi overrides, zero-width spaces, C0 and C1 controls) are
//! refused, and what people read shows such characters in metas as
//! escapes, never raw.

use crate::common::{Daemon, error_code, stdout, within};

/// Names that would look like another name, or like nothing, on a
/// screen: each with the character and byte the refusal must name.
const HIDDEN: [(&str, &str); 4] = [
    ("doc\u{200b}", "U+200B at byte 3"),
    ("\u{202e}cod", "U+202E at byte 0"),
    ("do\u{7}c", "U+0007 at byte 2"),
    ("d\u{85}oc", "U+0085 at byte 1"),
];

#[tokio::test]
async fn topics_and_keys_with_control_or_format_characters_are_refused() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    for (name, named) in HIDDEN {
        let topic = serde_json::json!({"id": 1, "op": "track", "topic": name, "key": "k"});
        let key = serde_json::json!({"id": 2, "op": "track", "topic": "doc", "key": name});
        let subscribe = serde_json::json!({"id": 3, "op": "subscribe", "topic": name});
        for (what, request) in [("topic", topic), ("key", key), ("topic", subscribe)] {
            let reply = raw.request(&request.to_string()).await;
            assert_eq!(error_code(&reply), "bad_request", "{request}: {reply}");
            let message = reply["error"]["message"].as_str().expect("a message");
            assert!(
                message.starts_with(what) && message.ends_with(named),
                "{request}: {message}"
            );
        }
    }
    let listed = raw.request(r#"{"id":4,"op":"list"}"#).await;
    assert_eq!(listed["topics"], serde_json::json!({}), "{listed}");

    // The command line refuses them before asking the daemon.
    let output = daemon.output(&["list", "doc\u{202e}"]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("U+202E at byte 3"), "{stderr}");
}

/// A meta that would reverse the text after it (U+202E), colour the
/// terminal red (ESC [ 31 m), and clear the screen through a C1 control
/// sequence introducer (U+009B 2 J) if printed as it is.
fn hostile_meta() -> serde_json::Value {
    serde_json::json!({"file": "\u{202e}dm.txt", "c0": "\u{1b}[31m", "c1": "\u{9b}2J"})
}

/// Whether `text` holds any of the hostile meta's characters raw.
fn holds_hidden(text: &str) -> bool {
    text.contains(['\u{202e}', '\u{1b}', '\u{9b}'])
}

#[tokio::test]
async fn list_and_watch_show_control_and_format_characters_of_metas_as_escapes() {
    let daemon = Daemon::start().await;
    let mut holder = daemon.raw().await;
    let track = serde_json::json!({
        "id": 1, "op": "track", "topic": "doc", "key": "alice", "meta": hostile_meta()
    });
    let tracked = holder.request(&track.to_string()).await;
    assert_eq!(tracked["ok"], true, "{tracked}");

    let listed = stdout(&daemon.output(&["list"]).await);
    assert!(!holds_hidden(&listed), "raw in `presence list`: {listed:?}");
    for escaped in ["\\u{202e}dm.txt", "\\u001b[31m", "\\u{9b}2J"] {
        assert!(listed.contains(escaped), "{escaped} in {listed:?}");
    }
    // JSON output stays the daemon's JSON, which a program decodes.
    let json = stdout(&daemon.output(&["list", "--json"]).await);
    let decoded: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let meta = &decoded["topics"]["doc"]["presences"]["alice"]["metas"][0];
    assert_eq!(meta["file"], hostile_meta()["file"], "{json}");

    // `watch` prints a meta when it changes.
    let mut watch = daemon.spawn(&["watch", "doc"]);
    let state = watch.line().await;
    assert!(state.contains("doc: owner alice"), "{state}");
    let phx_ref = tracked["ref"].as_str().expect("ref");
    let mut meta = hostile_meta();
    meta["line"] = 2.into();
    let update =
        serde_json::json!({"id": 2, "op": "update", "topic": "doc", "ref": phx_ref, "meta": meta});
    let updated = holder.request(&update.to_string()).await;
    assert_eq!(updated["ok"], true, "{updated}");
    let line = watch.line().await;
    assert!(line.contains("alice"), "{line}");
    assert!(line.contains("updated"), "{line}");
    assert!(!holds_hidden(&line), "raw in `presence watch`: {line:?}");
    for escaped in ["\\u{202e}dm.txt", "\\u001b[31m", "\\u{9b}2J"] {
        assert!(line.contains(escaped), "{escaped} in {line:?}");
    }
    watch.sigterm();
    let _ = within("watch to end", watch.child.wait()).await;
}
