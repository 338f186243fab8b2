//! The man pages in `man/` are generated from the clap definitions. This
//! test fails when they are stale; regenerate them with
//!
//!     PRESENCE_REGENERATE=1 cargo test --test generated_files

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use presenced::cli::Cli;

/// Every page: `presence.1`, then `presence-SUBCOMMAND.1` for each
/// subcommand.
fn render_man_pages() -> Vec<(PathBuf, Vec<u8>)> {
    let command = Cli::command();
    let mut pages = Vec::new();
    let mut render = |name: String, command: clap::Command| {
        let mut page = Vec::new();
        clap_mangen::Man::new(
            command
                .display_name(name.clone())
                .bin_name(name.replace('-', " ")),
        )
        .render(&mut page)
        .expect("a man page renders");
        pages.push((PathBuf::from(format!("man/{name}.1")), page));
    };
    render("presence".to_owned(), command.clone());
    for sub in command.get_subcommands() {
        let name = format!("presence-{}", sub.get_name());
        render(name, sub.clone());
    }
    pages
}

#[test]
fn man_pages_match_the_command_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regenerate = std::env::var_os("PRESENCE_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (path, rendered) in render_man_pages() {
        let path = root.join(path);
        if regenerate {
            std::fs::create_dir_all(path.parent().expect("man folder")).expect("mkdir man");
            std::fs::write(&path, &rendered).expect("write a man page");
        } else if std::fs::read(&path).ok().as_deref() != Some(rendered.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale man pages: {stale:?}\nregenerate with: PRESENCE_REGENERATE=1 cargo test --test generated_files"
    );
}
