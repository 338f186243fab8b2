//! Refusing a connection in words: one `limit_exceeded` line saying why,
//! then a close that does not reset the connection under it.

use std::time::Duration;

use interprocess::os::unix::uds_local_socket::tokio::Stream;
use tokio::io::AsyncWriteExt;

use crate::protocol::{ErrorBody, ErrorCode, OutgoingReply};

/// Tells a connection the daemon cannot take why (`limit_exceeded`, with
/// `message`), then closes it.
pub async fn refuse(stream: Stream, message: String) {
    let reply = OutgoingReply::failure(
        serde_json::Value::Null,
        ErrorBody::new(ErrorCode::LimitExceeded, message),
    );
    let mut stream = tokio::net::UnixStream::from(stream);
    let _ = stream.write_all(&reply.to_line()).await;
    // Closing with a request unread would reset the connection, and the
    // client could lose the line above. Say we are done, then read what
    // it sent, briefly and boundedly, before closing.
    let _ = stream.shutdown().await;
    // On the heap, not in the future: `serve` awaits this, so an array
    // here would make every connection's task 4 KiB larger for good.
    let mut unread = vec![0u8; 4096];
    let drain = async {
        let mut left = REFUSAL_DRAIN_BYTES;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut unread).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, drain).await;
}

/// How long, and how much, a refused connection is read before it is
/// closed: enough for the request a client sent right after connecting.
const REFUSAL_DRAIN_TIME: Duration = Duration::from_millis(200);
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
