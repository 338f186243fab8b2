//! The man pages in `man/` and the completion scripts in `completions/`
//! are generated from the command line and the text in `src/cli/docs.rs`.
//! This test fails when any of them is stale; regenerate them all with
//!
//!     PRESENCE_REGENERATE=1 cargo test --test tests generated_files::

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;
use clap_mangen::Man;
use presenced::cli::docs::{self, Item, Page};
use roff::{Inline, Roff, bold, italic, roman};

/// Every man page: `presence.1`, then `presence-SUBCOMMAND.1` for each
/// subcommand.
fn man_pages() -> Vec<(PathBuf, Vec<u8>)> {
    // `presence help` is clap's; it has no page of its own.
    let mut command = presenced::cli::command().disable_help_subcommand(true);
    command.build();
    let mut pages = vec![(
        PathBuf::from("man/presence.1"),
        man_page(&command, page_of("presence")),
    )];
    for sub in command.get_subcommands() {
        let name = sub.get_name();
        pages.push((
            PathBuf::from(format!("man/presence-{name}.1")),
            man_page(sub, page_of(name)),
        ));
    }
    pages
}

fn page_of(name: &str) -> &'static Page {
    docs::page(name).unwrap_or_else(|| panic!("src/cli/docs.rs has no page for `{name}`"))
}

/// clap_mangen renders what clap knows (name, synopsis, options,
/// subcommands); the rest comes from the page.
fn man_page(command: &clap::Command, page: &Page) -> Vec<u8> {
    let name = command.get_display_name().unwrap_or(command.get_name());
    let version = command.get_version().unwrap_or_default();
    let man = Man::new(command.clone())
        .title(name.to_uppercase())
        .source(format!("presenced {version}"))
        .manual("presenced manual");
    let from_clap = |render: fn(&Man, &mut dyn Write) -> std::io::Result<()>| {
        let mut out = Vec::new();
        render(&man, &mut out).expect("a man page section renders");
        String::from_utf8(out).expect("UTF-8")
    };
    let mut parts = vec![
        from_clap(Man::render_title),
        from_clap(Man::render_name_section),
        from_clap(Man::render_synopsis_section),
        description(command, page).render(),
        from_clap(Man::render_options_section),
    ];
    if command.has_subcommands() {
        parts.push(from_clap(Man::render_subcommands_section));
    }
    parts.push(sections(page).render());
    join(parts)
}

/// Joins rendered parts into one page. Each part starts with the same
/// preamble (which sets up apostrophes); the page needs it once.
fn join(parts: Vec<String>) -> Vec<u8> {
    let preamble = Roff::new().render();
    let mut page = preamble.clone();
    for part in &parts {
        page.push_str(part.strip_prefix(&preamble).unwrap_or(part));
    }
    page.into_bytes()
}

fn description(command: &clap::Command, page: &Page) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["DESCRIPTION"]);
    if let Some(about) = command.get_about() {
        roff.text([roman(format!("{about}."))]);
    }
    prose(&mut roff, page.details);
    roff
}

/// EXIT STATUS, ENVIRONMENT, FILES, EXAMPLES and SEE ALSO.
fn sections(page: &Page) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for item in docs::EXIT_STATUS.iter().chain(page.exit_status) {
        term(&mut roff, bold(item.name), item);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for item in docs::ENVIRONMENT {
        term(&mut roff, bold(item.name), item);
    }
    roff.control("SH", ["FILES"]);
    for item in docs::FILES {
        term(&mut roff, italic(item.name), item);
    }
    roff.control("SH", ["EXAMPLES"]);
    for example in page.examples {
        roff.control("PP", []);
        roff.text(inline(example.what));
        verbatim(&mut roff, example.run.lines(), true);
    }
    roff.control("SH", ["SEE ALSO"]);
    // Every subcommand's page points back to the command's.
    let references: Vec<&str> = (page.name != "presence")
        .then_some("presence(1)")
        .into_iter()
        .chain(page.see_also.iter().copied())
        .collect();
    let mut see_also = Vec::new();
    for (i, reference) in references.iter().enumerate() {
        let (name, section) = reference.split_once('(').unwrap_or((reference, ""));
        let separator = if i + 1 < references.len() { ", " } else { "" };
        see_also.push(bold(name));
        see_also.push(roman(format!("({section}{separator}")));
    }
    roff.text(see_also);
    roff
}

/// A term and its explanation, as a tagged paragraph.
fn term(roff: &mut Roff, name: Inline, item: &Item) {
    roff.control("TP", []);
    roff.text([name]);
    roff.text(inline(item.text));
}

/// Paragraphs of the docs' text: prose is filled, and a run of lines
/// indented by two spaces is shown as it is.
fn prose(roff: &mut Roff, text: &str) {
    for paragraph in text.split("\n\n") {
        let lines: Vec<&str> = paragraph.lines().collect();
        let mut rest = lines.as_slice();
        while let Some(first) = rest.first() {
            let shown = first.starts_with("  ");
            let run = rest
                .iter()
                .take_while(|line| line.starts_with("  ") == shown)
                .count();
            let (this, next) = rest.split_at(run);
            if shown {
                roff.control("PP", []);
                verbatim(roff, this.iter().map(|line| &line[2..]), false);
            } else {
                roff.control("PP", []);
                roff.text(inline(&this.join(" ")));
            }
            rest = next;
        }
    }
}

/// Lines shown as they are, indented; commands in bold.
fn verbatim<'a>(roff: &mut Roff, lines: impl Iterator<Item = &'a str>, commands: bool) {
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for line in lines {
        roff.text([if commands { bold(line) } else { roman(line) }]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
}

/// Text with `code` spans in bold.
fn inline(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(i, part)| if i % 2 == 1 { bold(part) } else { roman(part) })
        .collect()
}

/// Every completion script, as `presence completions SHELL` prints it.
fn completion_scripts() -> Vec<(PathBuf, Vec<u8>)> {
    [
        (Shell::Bash, "completions/presence.bash"),
        (Shell::Zsh, "completions/_presence"),
        (Shell::Fish, "completions/presence.fish"),
    ]
    .into_iter()
    .map(|(shell, path)| {
        (
            PathBuf::from(path),
            presenced::cli::completion_script(shell),
        )
    })
    .collect()
}

/// Compares each file with what it should hold, or with
/// `PRESENCE_REGENERATE` set, writes it; returns the stale ones.
fn check_or_write(files: Vec<(PathBuf, Vec<u8>)>) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regenerate = std::env::var_os("PRESENCE_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (path, rendered) in files {
        let path = root.join(path);
        if regenerate {
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
            std::fs::write(&path, &rendered).expect("write a generated file");
        } else if std::fs::read(&path).ok().as_deref() != Some(rendered.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    stale
}

const HOW_TO_REGENERATE: &str =
    "regenerate with: PRESENCE_REGENERATE=1 cargo test --test tests generated_files::";

#[test]
fn man_pages_match_the_command_line() {
    let stale = check_or_write(man_pages());
    assert!(
        stale.is_empty(),
        "stale man pages: {stale:?}\n{HOW_TO_REGENERATE}"
    );
}

#[test]
fn completion_scripts_match_the_command_line() {
    let stale = check_or_write(completion_scripts());
    assert!(
        stale.is_empty(),
        "stale completion scripts: {stale:?}\n{HOW_TO_REGENERATE}"
    );
}

#[test]
fn every_page_has_the_sections_of_a_real_man_page() {
    for (path, page) in man_pages() {
        let page = String::from_utf8(page).expect("UTF-8");
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "EXIT STATUS",
            "ENVIRONMENT",
            "FILES",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                page.contains(&format!(".SH \"{section}\""))
                    || page.contains(&format!(".SH {section}\n")),
                "{} has no {section} section",
                path.display()
            );
        }
        assert!(!page.contains(".SH EXTRA"), "{}", path.display());
    }
}
