//! `presence completions`: shell completion scripts, made by clap_complete
//! from the same command line that parses the arguments.

use std::io::Write;

use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in
    pub shell: Shell,
}

pub fn run(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&completion_script(args.shell))?;
    stdout.flush()?;
    Ok(())
}

/// The completion script for `shell`, as `presence completions` prints it
/// and as `completions/` keeps it.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut super::command(), "presence", &mut script);
    script
}
