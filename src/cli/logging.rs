//! Logging: to the journal when stderr is the journal, else lines on
//! stderr, at the level the options and the environment ask for.

/// Logs to the journal when systemd connected our stderr to it (structured
/// fields, levels as priorities), else human lines on stderr. The level is
/// `--log-level`, else `PRESENCE_LOG`, else `RUST_LOG`, else the default.
pub fn init(flag: Option<&str>, default_level: &str) {
    use tracing_subscriber::prelude::*;
    let wanted = flag
        .map(str::to_owned)
        .or_else(|| non_empty_env("PRESENCE_LOG"))
        .or_else(|| non_empty_env("RUST_LOG"))
        .unwrap_or_else(|| default_level.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
        eprintln!("presence: ignoring the log filter `{wanted}` ({e}); logging at {default_level}");
        tracing_subscriber::EnvFilter::new(default_level)
    });
    let logs = tracing_subscriber::registry().with(filter);
    if stderr_is_the_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        logs.with(journal).init();
        return;
    }
    logs.with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false),
    )
    .init();
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// systemd sets `JOURNAL_STREAM` to the device and inode of the stream it
/// gave us as stderr. Only a match counts: a shell started from a service
/// inherits the variable but may have sent its stderr elsewhere.
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr())
        .is_ok_and(|stat| stat.st_dev.to_string() == device && stat.st_ino.to_string() == inode)
}
