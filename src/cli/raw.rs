//! `presence raw`: the protocol by hand. Request lines go from stdin to the
//! daemon; every line the daemon sends goes to stdout, until stdin ends and
//! the daemon has answered everything.

use tokio::io::{AsyncWriteExt, BufReader};

use super::Target;

pub async fn run(target: &Target) -> anyhow::Result<()> {
    let stream = target.stream().await?;
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
