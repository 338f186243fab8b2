//! `presence raw`: the protocol by hand. Request lines go from stdin to the
//! daemon; every line the daemon sends goes to stdout, until stdin ends and
//! the daemon has answered everything.

use tokio::io::{AsyncWriteExt, BufReader};

use super::target::Target;

pub async fn run(target: &Target) -> anyhow::Result<()> {
    let stream = target.stream().await?;
    let (recv, mut send) = stream.into_split();
    let to_stdout = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let copied = tokio::io::copy_buf(&mut BufReader::new(recv), &mut stdout).await;
        let _ = stdout.flush().await;
        match copied {
            // The daemon closed on us (it refused a line) after saying why.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
            other => other,
        }
    });
    let sent = tokio::io::copy(&mut tokio::io::stdin(), &mut send).await;
    // End our side; the daemon answers what it has, then closes. If the
    // daemon closed first (it refused the connection, or a line), the copy
    // above failed; what the daemon said is still printed below.
    let _ = send.shutdown().await;
    to_stdout.await??;
    match sent {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
