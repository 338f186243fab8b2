//! The layers of ARCHITECTURE.md ("The layers and what they may use"), held
//! by a test rather than by good intentions.
//!
//! Every path from one module of the crate into another is found in the
//! source: `crate::a::b`, a `super::` that climbs out of its module, and a
//! path through a child module the file declares (`mod registry;` then
//! `registry::Entry`). Each one is checked against [`MAY_USE`]. A module
//! named whole (`use crate::core;`, an alias, a `*` or `self`) counts as
//! every layer below it, so an alias or a glob cannot carry a forbidden
//! path past the check; `#[path]` and `include!` are refused outright.
//! Comments, strings and character literals are skipped, so prose may
//! name any module; code may not.

use std::path::{Path, PathBuf};

/// The layers, each a part of the source tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// `lib.rs` and `main.rs`, which name the layers.
    Root,
    Cli,
    Client,
    Daemon,
    /// The core's loop: `core/mod.rs`, `core/recovery.rs` and its tests.
    Core,
    /// The pure state machine, its views and the lines they make:
    /// `core/registry*`, `core/read.rs`, `core/line.rs`.
    Registry,
    Store,
    Ops,
    Protocol,
    Topic,
    Paths,
    Sys,
    Process,
    FolderWatch,
}

use Layer::*;

/// Which layer a module is, by its path below the crate root. The most
/// specific prefix comes first.
const LAYER_OF_MODULE: &[(&[&str], Layer)] = &[
    (&["core", "registry"], Registry),
    (&["core", "read"], Registry),
    (&["core", "line"], Registry),
    (&["core", "store"], Store),
    (&["core"], Core),
    (&["cli"], Cli),
    (&["client"], Client),
    (&["daemon"], Daemon),
    (&["ops"], Ops),
    (&["protocol"], Protocol),
    (&["topic"], Topic),
    (&["paths"], Paths),
    (&["sys"], Sys),
    (&["process"], Process),
    (&["folder_watch"], FolderWatch),
];

/// What each layer but the root may use besides itself: the table of
/// ARCHITECTURE.md.
const MAY_USE: &[(Layer, &[Layer])] = &[
    // And `daemon`, as far as DAEMON_ITEMS_FOR_CLI allows.
    (Cli, &[Client, Protocol, Topic, Paths, Sys]),
    (Client, &[Protocol, Paths, Sys, FolderWatch]),
    (
        Daemon,
        &[
            Core,
            Registry,
            Store,
            Ops,
            Protocol,
            Paths,
            Sys,
            Process,
            FolderWatch,
        ],
    ),
    (Core, &[Registry, Ops, Protocol, Process]),
    (Registry, &[Protocol, Process]),
    (Store, &[Registry, Protocol, Process, Paths, Sys]),
    (Ops, &[Registry, Protocol, Process]),
    // Its re-exports of the wire types that each op's file defines.
    (Protocol, &[Ops]),
    (Topic, &[]),
    (Paths, &[Sys]),
    (Sys, &[Process]),
    (Process, &[]),
    (FolderWatch, &[Paths]),
];

/// The CLI runs `presence daemon` and shows its defaults, and takes nothing
/// else from the io layer.
const DAEMON_ITEMS_FOR_CLI: &[&str] = &[
    "run",
    "DaemonConfig",
    "Retention",
    "DEFAULT_MAX_BATCH",
    "ClusterConfig",
    "LeaseSettings",
    "DEFAULT_PREFIX",
];

/// What a layer's tests may use besides: they may drive it from above, as
/// its users do. The daemon's tests start a daemon and talk to it through
/// the client library; the registry's model tests feed it requests through
/// the ops, as the core does.
const TESTS_MAY_ALSO_USE: &[(Layer, &[Layer])] = &[(Daemon, &[Client]), (Registry, &[Ops])];

/// Every layer a path reaches. A path to a module, named whole (`use
/// crate::core;`), aliased, or with its items taken by `*` or `self`,
/// reaches the module's layer and every layer below it: `crate::core`
/// reaches the core, the registry and the store, and `crate` itself (`use
/// crate as root;`, `crate::*`) every layer.
fn layers_reached(path: &[String]) -> Vec<Layer> {
    let module = match path.last().map(String::as_str) {
        Some("*" | "self") => &path[..path.len() - 1],
        _ => path,
    };
    let below = LAYER_OF_MODULE.iter().filter(|(prefix, _)| {
        prefix.len() > module.len() && prefix.iter().zip(module).all(|(a, b)| a == b)
    });
    let mut layers: Vec<Layer> = layer_of_module(module).into_iter().collect();
    for &(_, layer) in below {
        if !layers.contains(&layer) {
            layers.push(layer);
        }
    }
    layers
}

fn layer_of_module(path: &[String]) -> Option<Layer> {
    LAYER_OF_MODULE
        .iter()
        .find(|(prefix, _)| {
            path.len() >= prefix.len() && prefix.iter().zip(path).all(|(a, b)| a == b)
        })
        .map(|&(_, layer)| layer)
}

fn may_use(from: Layer, to: Layer) -> bool {
    // The root names every layer, to declare it.
    from == Root
        || from == to
        || MAY_USE
            .iter()
            .any(|&(layer, allowed)| layer == from && allowed.contains(&to))
}

/// One path into another module that the table does not allow.
#[derive(Debug, PartialEq, Eq)]
struct Breach {
    file: String,
    line: usize,
    path: String,
    from: Layer,
    to: Layer,
}

/// The module a source file is, below the crate root: `src/core/store.rs`
/// is `core::store`, `src/core/mod.rs` is `core`.
fn module_of_file(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !matches!(stem, "mod" | "lib" | "main") {
            parts.push(stem.to_owned());
        }
    }
    parts
}

/// A source file's text with comments, strings and character literals
/// blanked out (newlines kept, so lines still count).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"' | '#')) && !ident_char_before(&chars, i) {
            // A raw string: r"…", r#"…"#, …
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let closing: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let body_start = i + 2 + hashes;
            let rest: String = chars[body_start..].iter().collect();
            let body_len = rest
                .find(&closing)
                .map_or(rest.len(), |at| rest[..at].chars().count());
            let end = (body_start + body_len + closing.chars().count()).min(chars.len());
            out.extend(chars[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && is_char_literal(&chars, i) {
            let end = chars[i + 1..]
                .iter()
                .position(|&c| c == '\'')
                .map_or(chars.len(), |at| i + 2 + at);
            out.extend(chars[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// `'x'` or `'\n'`, not a lifetime such as `'a`.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    match chars.get(i + 1) {
        Some('\\') => true,
        Some(_) => chars.get(i + 2) == Some(&'\''),
        None => false,
    }
}

/// The paths in one file's code that lead into a module of the crate, with
/// their lines: each resolved to a full module path from the crate root.
fn paths_out_of(file_module: &[String], code: &str) -> Vec<(usize, Vec<String>)> {
    let tokens = tokenize(code);
    // The module each token sits in: the file's, or an inline `mod x { … }`
    // within it, whose `super` is the file's module.
    let mut found = Vec::new();
    let mut inline_modules: Vec<(String, usize)> = Vec::new();
    let mut children: Vec<String> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let (line, token) = (&tokens[i].0, tokens[i].1.as_str());
        match token {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline_modules.last().is_some_and(|&(_, at)| at == depth) {
                    inline_modules.pop();
                }
            }
            "mod" => {
                if let (Some(name), Some(after)) = (tokens.get(i + 1), tokens.get(i + 2)) {
                    if after.1 == "{" {
                        inline_modules.push((name.1.clone(), depth));
                    } else if after.1 == ";" && inline_modules.is_empty() {
                        children.push(name.1.clone());
                    }
                }
            }
            _ => {}
        }
        if starts_path(&tokens, i) {
            let mut here: Vec<String> = file_module.to_vec();
            here.extend(inline_modules.iter().map(|(name, _)| name.clone()));
            let (paths, end) = path_segments(&tokens, i);
            for segments in paths {
                if let Some(resolved) = resolve(&here, file_module, &children, &segments) {
                    found.push((*line, resolved));
                }
            }
            // A use-tree's braces are counted by the loop as it passes
            // them; only its paths are skipped.
            for (_, token) in &tokens[i + 1..end] {
                match token.as_str() {
                    "{" => depth += 1,
                    "}" => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            i = end.max(i + 1);
            continue;
        }
        i += 1;
    }
    found
}

/// Whether a path starts at token `i`: an identifier followed by `::`, or
/// named by a `use` on its own (`use tokio as t;`, `use store as s;`), and
/// not the middle of a longer path; a leading `::` (`::tokio::spawn`) does
/// not hide the path after it.
fn starts_path(tokens: &[(usize, String)], i: usize) -> bool {
    let is_ident = |t: &str| t.chars().all(|c| c.is_alphanumeric() || c == '_');
    let token = tokens[i].1.as_str();
    if !is_ident(token) {
        return false;
    }
    let previous = i.checked_sub(1).map(|at| tokens[at].1.as_str());
    let leading_colons = previous == Some("::")
        && i.checked_sub(2)
            .is_none_or(|at| !is_ident(&tokens[at].1) && tokens[at].1 != ">");
    if previous == Some("::") && !leading_colons {
        return false;
    }
    tokens.get(i + 1).is_some_and(|t| t.1 == "::") || previous == Some("use")
}

/// Identifiers, `::` and single punctuation, each with its line.
fn tokenize(code: &str) -> Vec<(usize, String)> {
    let mut tokens = Vec::new();
    for (index, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_alphanumeric() || c == '_' {
                // A raw identifier, `r#name`, is `name`.
                let raw = c == 'r'
                    && chars.get(i + 1) == Some(&'#')
                    && chars
                        .get(i + 2)
                        .is_some_and(|c| c.is_alphanumeric() || *c == '_');
                if raw {
                    i += 2;
                }
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push((index + 1, chars[start..i].iter().collect()));
            } else if c == ':' && chars.get(i + 1) == Some(&':') {
                tokens.push((index + 1, "::".to_owned()));
                i += 2;
            } else {
                if !c.is_whitespace() {
                    tokens.push((index + 1, c.to_string()));
                }
                i += 1;
            }
        }
    }
    tokens
}

/// The path starting at `start`, with a use-tree's braces expanded:
/// `a::{b::c, d}` is `a::b::c` and `a::d`. Also the index past its end.
fn path_segments(tokens: &[(usize, String)], start: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = vec![tokens[start].1.clone()];
    let mut i = start + 1;
    while tokens.get(i).is_some_and(|t| t.1 == "::") {
        match tokens.get(i + 1).map(|t| t.1.as_str()) {
            Some("{") => {
                let mut paths = Vec::new();
                let mut at = i + 2;
                while let Some((_, token)) = tokens.get(at) {
                    match token.as_str() {
                        "}" => return (paths, at + 1),
                        "," => at += 1,
                        _ => {
                            let (inner, end) = path_segments(tokens, at);
                            paths.extend(inner.into_iter().map(|tail| {
                                prefix.iter().cloned().chain(tail).collect::<Vec<_>>()
                            }));
                            at = end;
                            // Skip `as name` and anything else up to the
                            // next item.
                            while tokens.get(at).is_some_and(|t| t.1 != "," && t.1 != "}") {
                                at += 1;
                            }
                        }
                    }
                }
                return (paths, at);
            }
            Some(next) => prefix.push(next.to_owned()),
            None => break,
        }
        i += 2;
    }
    (vec![prefix], i)
}

/// The full path a path in module `here` names, if it leads into the crate:
/// through `crate`, `super` (from `here`), or a child module of the file.
fn resolve(
    here: &[String],
    file_module: &[String],
    children: &[String],
    segments: &[String],
) -> Option<Vec<String>> {
    match segments[0].as_str() {
        "crate" => Some(segments[1..].to_vec()),
        "super" => {
            let climbs = segments.iter().take_while(|s| *s == "super").count();
            let base = here.get(..here.len().checked_sub(climbs)?)?;
            Some(base.iter().chain(&segments[climbs..]).cloned().collect())
        }
        "self" => Some(here.iter().chain(&segments[1..]).cloned().collect()),
        child if children.iter().any(|c| c == child) => {
            Some(file_module.iter().chain(segments).cloned().collect())
        }
        _ => None,
    }
}

fn is_test_file(relative: &Path) -> bool {
    relative
        .iter()
        .any(|part| part == "tests" || part.to_string_lossy().starts_with("tests"))
        || relative
            .file_stem()
            .is_some_and(|stem| stem.to_string_lossy().ends_with("tests"))
}

/// Every breach of the table in one file, given its path below `src/`.
fn breaches_in(relative: &Path, source: &str) -> Vec<Breach> {
    let file_module = module_of_file(relative);
    let from = if file_module.is_empty() {
        Some(Root)
    } else {
        layer_of_module(&file_module)
    };
    let Some(from) = from else {
        return vec![Breach {
            file: relative.display().to_string(),
            line: 0,
            path: "(this file belongs to no layer: add it to LAYER_OF_MODULE)".into(),
            from: Root,
            to: Root,
        }];
    };
    let test_file = is_test_file(relative);
    let mut breaches = Vec::new();
    let code = code_only(source);
    for (line, path) in paths_out_of(&file_module, &code) {
        for to in layers_reached(&path) {
            let allowed = may_use(from, to)
                || (test_file
                    && TESTS_MAY_ALSO_USE
                        .iter()
                        .any(|&(layer, also)| layer == from && also.contains(&to)))
                || (from == Cli && to == Daemon && is_daemon_item_for_cli(&path));
            if !allowed {
                breaches.push(Breach {
                    file: relative.display().to_string(),
                    line,
                    path: format!("crate::{}", path.join("::")),
                    from,
                    to,
                });
            }
        }
    }
    // A module brought in from another file's path, or source pasted in,
    // would sit in this file's layer whatever it is.
    let tokens = tokenize(&code);
    for (at, window) in tokens.windows(3).enumerate() {
        let [first, second, third] = [&window[0].1, &window[1].1, &window[2].1];
        let included = (first == "#" && second == "[" && third == "path")
            || (first == "include" && second == "!");
        if included && from != Root {
            breaches.push(Breach {
                file: relative.display().to_string(),
                line: tokens[at].0,
                path: format!("{first}{second}{third}: a module from elsewhere"),
                from,
                to: Root,
            });
        }
    }
    breaches
}

/// The CLI's `mod.rs` is a facade: the command files take what they share
/// from its sibling modules (`args`, `target`, `render`…), never from the
/// facade itself, so no arrow runs back up inside `cli/`. Given the names
/// of the modules in `cli/`, the paths of one file that do.
fn arrows_into_the_cli_facade(
    relative: &Path,
    source: &str,
    cli_modules: &[String],
) -> Vec<String> {
    let file_module = module_of_file(relative);
    if file_module.first().is_none_or(|top| top != "cli") || file_module.len() < 2 {
        return Vec::new();
    }
    paths_out_of(&file_module, &code_only(source))
        .into_iter()
        .filter(|(_, path)| {
            path.first().is_some_and(|top| top == "cli")
                && path.get(1).is_none_or(|next| !cli_modules.contains(next))
        })
        .map(|(line, path)| format!("src/{}:{line}: {}", relative.display(), path.join("::")))
        .collect()
}

fn is_daemon_item_for_cli(path: &[String]) -> bool {
    path.len() == 2 && DAEMON_ITEMS_FOR_CLI.contains(&path[1].as_str())
}

/// What the layers without I/O never name: a runtime, a database, the
/// system's calls, the clocks, sockets, files or threads. They are handed
/// the time and hand out what is to be done (ARCHITECTURE.md, "One request,
/// end to end"); their tests may read a clock to make up times.
const SANS_IO: &[Layer] = &[Core, Registry, Ops, Protocol];
const IO_NAMES: &[&str] = &[
    "tokio",
    "rusqlite",
    "rustix",
    "libc",
    "nix",
    "Instant::now",
    "SystemTime::now",
    "std::fs",
    "std::net",
    "std::os",
    "std::thread",
    "std::process",
    "std::sync::mpsc",
];

/// The lines of a sans-I/O layer's code that name I/O, as `line: name`.
fn io_named_in(relative: &Path, source: &str) -> Vec<String> {
    let from = layer_of_module(&module_of_file(relative));
    if !from.is_some_and(|layer| SANS_IO.contains(&layer)) || is_test_file(relative) {
        return Vec::new();
    }
    let tokens = tokenize(&code_only(source));
    let mut found = Vec::new();
    for start in 0..tokens.len() {
        if !starts_path(&tokens, start) {
            continue;
        }
        // Each path whole, a use-tree's braces expanded, so that
        // `std::{fs, …}` is `std::fs` and `std::time::Instant::now()`
        // holds `Instant::now`; `my_tokio` is no `tokio`.
        for path in path_segments(&tokens, start).0 {
            for name in IO_NAMES {
                let wanted: Vec<&str> = name.split("::").collect();
                if path
                    .windows(wanted.len())
                    .any(|window| window.iter().zip(&wanted).all(|(a, b)| a == b))
                {
                    found.push(format!(
                        "src/{}:{}: {name}",
                        relative.display(),
                        tokens[start].0
                    ));
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a readable folder").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );
    let mut breaches = Vec::new();
    let mut io_named = Vec::new();
    let mut into_facade = Vec::new();
    let cli_modules: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let relative = file.strip_prefix(src.join("cli")).ok()?;
            let first = relative.iter().next()?.to_string_lossy();
            Some(first.trim_end_matches(".rs").to_owned())
        })
        .filter(|name| name != "mod")
        .collect();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("a readable source file");
        let relative = file.strip_prefix(&src).expect("below src/");
        breaches.extend(breaches_in(relative, &source));
        io_named.extend(io_named_in(relative, &source));
        into_facade.extend(arrows_into_the_cli_facade(relative, &source, &cli_modules));
    }
    let report: Vec<String> = breaches
        .iter()
        .map(|b| {
            format!(
                "src/{}:{}: {:?} may not use {:?} ({})",
                b.file, b.line, b.from, b.to, b.path
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "imports across the layers that ARCHITECTURE.md forbids:\n{}",
        report.join("\n")
    );
    assert!(
        into_facade.is_empty(),
        "command files that take from the CLI's facade, cli/mod.rs:\n{}",
        into_facade.join("\n")
    );
    assert!(
        io_named.is_empty(),
        "I/O named in a layer that has none (core, registry, ops, protocol):\n{}",
        io_named.join("\n")
    );
}

#[test]
fn io_in_a_layer_without_it_is_found() {
    let registry = Path::new("core/registry.rs");
    for source in [
        "use tokio::sync::mpsc;",
        "let now = std::time::Instant::now();",
        "let t = SystemTime::now();",
        "use std::{fs, collections::HashMap};",
        "#[tokio::test]",
        "fn f() { ::tokio::spawn(g()); }",
        "use tokio as t;",
    ] {
        let found = io_named_in(registry, source);
        assert_eq!(found.len(), 1, "{source}: {found:?}");
    }
    assert!(io_named_in(registry, "// tokio::spawn\nlet my_tokio = 1;").is_empty());
    // The store and the io layer do I/O; the core's tests make up time.
    assert!(io_named_in(Path::new("core/store.rs"), "use rusqlite::Connection;").is_empty());
    assert!(io_named_in(Path::new("core/tests/harness.rs"), "Instant::now()").is_empty());
}

/// The modules other programs may use: what `src/lib.rs` states as the
/// library's API. The rest is public only for the binary and the tests.
const LIBRARY_API: &[&str] = &["client", "protocol", "topic"];

/// The paths of a program outside the crate (an example) into modules of
/// the crate that are not its API.
fn beyond_the_api(name: &str, source: &str) -> Vec<String> {
    let tokens = tokenize(&code_only(source));
    let mut found = Vec::new();
    for start in 0..tokens.len() {
        if tokens[start].1 != "presenced" || !starts_path(&tokens, start) {
            continue;
        }
        for path in path_segments(&tokens, start).0 {
            if path
                .get(1)
                .is_some_and(|module| !LIBRARY_API.contains(&module.as_str()))
            {
                found.push(format!("{name}:{}: {}", tokens[start].0, path.join("::")));
            }
        }
    }
    found
}

#[test]
fn the_examples_use_only_the_library_api() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = Vec::new();
    rust_files(&examples, &mut files);
    assert!(!files.is_empty(), "no example under {}", examples.display());
    let mut found = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("a readable example");
        found.extend(beyond_the_api(&file.display().to_string(), &source));
    }
    assert!(
        found.is_empty(),
        "examples that reach past the API:\n{}",
        found.join("\n")
    );
    // And the check finds such a path.
    let reach = beyond_the_api(
        "x.rs",
        "use presenced::{client::Client, paths::default_socket};",
    );
    assert_eq!(reach, ["x.rs:1: presenced::paths::default_socket"]);
}

#[test]
fn a_forbidden_import_is_found_however_it_is_written() {
    let sys = Path::new("sys.rs");
    for source in [
        "use crate::core::registry::ProcessId;",
        "use crate::{core::registry::ProcessId, paths};",
        "fn f() { let _ = crate::daemon::run; }",
        "use crate::core::{\n    registry::ProcessId,\n};",
        // Every layer at once, through a glob or an alias of the root.
        "use super::*;",
        "use crate::*;",
        "use crate as root;\nfn f() { root::daemon::run(); }",
        "use crate::{self as root};",
        // A raw identifier is the same name.
        "use crate::r#daemon::run;",
        // A module of another layer's file, or its text.
        "#[path = \"core/store.rs\"]\nmod store;",
        "include!(\"core/store.rs\");",
    ] {
        let breaches = breaches_in(sys, source);
        assert!(!breaches.is_empty(), "not found in sys.rs: {source}");
    }
    let found = breaches_in(Path::new("cli/list.rs"), "let n = crate::core::MAX_BATCH;");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].from, found[0].to, found[0].line), (Cli, Core, 1));

    // Through `super` out of the registry into the store.
    let found = breaches_in(Path::new("core/registry.rs"), "use super::store::Store;");
    assert_eq!(found.len(), 1, "{found:?}");
    // Through a child module the file declares: the core's loop may not
    // use the store, by a path or by an alias.
    for source in [
        "mod store;\nuse store::Store;",
        "mod store;\nuse store as s;",
    ] {
        let found = breaches_in(Path::new("core/mod.rs"), source);
        assert_eq!(found.len(), 1, "{source}: {found:?}");
        assert_eq!((found[0].to, found[0].line), (Store, 2));
    }
    // A module named whole reaches every layer below it: the ops may use
    // the registry, not the core's loop or the store beside it.
    let found = breaches_in(Path::new("ops/list.rs"), "use crate::core;");
    let reached: Vec<Layer> = found.iter().map(|breach| breach.to).collect();
    assert_eq!(reached, [Core, Store], "{found:?}");
    assert!(
        breaches_in(
            Path::new("ops/list.rs"),
            "use crate::core::registry::{self, Entry};"
        )
        .is_empty()
    );
    // The CLI takes only what runs `presence daemon` from the io layer.
    assert!(
        breaches_in(
            Path::new("cli/daemon.rs"),
            "use crate::daemon::{run, DaemonConfig};"
        )
        .is_empty()
    );
    assert_eq!(
        breaches_in(
            Path::new("cli/join.rs"),
            "use crate::daemon::driver::CoreHandle;"
        )
        .len(),
        1
    );
}

#[test]
fn a_command_that_takes_from_the_cli_facade_is_found() {
    let modules = ["args".to_owned(), "render".to_owned(), "join".to_owned()];
    let join = Path::new("cli/join.rs");
    assert!(arrows_into_the_cli_facade(join, "use super::args::EntryArgs;", &modules).is_empty());
    assert!(arrows_into_the_cli_facade(join, "use crate::cli::render::say;", &modules).is_empty());
    let found = arrows_into_the_cli_facade(join, "use super::{args::Cli, Target};", &modules);
    assert_eq!(found, ["src/cli/join.rs:1: cli::Target"]);
    // The facade itself may use its modules.
    assert!(
        arrows_into_the_cli_facade(Path::new("cli/mod.rs"), "use self::x::Y;", &modules).is_empty()
    );
}

#[test]
fn prose_strings_and_inline_test_modules_are_read_as_they_are() {
    let history = Path::new("core/store/history.rs");
    // A comment or a string may name any module.
    let prose = "// use crate::daemon::x;\n/* crate::cli */ let s = \"crate::daemon::y\"; let r = r#\"crate::cli\"#; let c = '\"';";
    assert!(breaches_in(history, prose).is_empty());
    // In an inline test module, `super::super` is the file's parent.
    let inline =
        "mod tests {\n    use super::super::{Retention, Store};\n}\nuse super::super::Core;";
    let found = breaches_in(history, inline);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].to, found[0].line), (Core, 4));
}
