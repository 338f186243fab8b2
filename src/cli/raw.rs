//! `presence raw`: the protocol by hand. Request lines go from stdin to the
//! daemon; every line the daemon sends goes to stdout, until stdin ends and
//! the daemon has answered everything.

use tokio::io::{AsyncWriteExt, BufReader};

use super::Target;
use crate::client::{connect_stream, start_daemon};

pub async fn run(target: &Target) -> anyhow::Result<()> {
    let stream = match connect_stream(&target.socket).await {
        Ok(stream) => stream,
        Err(_) if target.autostart => {
            start_daemon(&target.socket).await?;
            connect_stream(&target.socket).await?
        }
        Err(e) => anyhow::bail!(
            "no daemon at {} ({e}); start one with `presence daemon` or drop --no-autostart",
            target.socket.display()
        ),
    };
    let (recv, mut send) = stream.into_split();
    let to_stdout = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let copied = tokio::io::copy_buf(&mut BufReader::new(recv), &mut stdout).await;
        let _ = stdout.flush().await;
        copied
    });
    tokio::io::copy(&mut tokio::io::stdin(), &mut send).await?;
    // End our side; the daemon answers what it has, then closes.
    send.shutdown().await?;
    to_stdout.await??;
    Ok(())
}
