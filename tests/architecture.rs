//! ARCHITECTURE.md is the map a newcomer starts from, so it names every
//! file under `src/`, and every file it names exists.
//!
//! A file is named when the map's trees list it (a tree is a code block
//! whose indented names nest under the folder or file above them), or when
//! the prose gives its path from `src/`; a folder named from `src/` names
//! its `mod.rs`.

use std::collections::BTreeSet;
use std::path::Path;

/// The paths, from the repository root, that the trees of the map list.
fn files_in_trees(map: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut in_block = false;
    // The folders open at each indent, innermost last.
    let mut open: Vec<(usize, String)> = Vec::new();
    for line in map.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            open.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        // The name column ends where two spaces begin the description.
        let column = line.trim_start().split("  ").next().unwrap_or_default();
        let names: Vec<&str> = column
            .split(", ")
            .map(|name| name.trim().trim_end_matches(','))
            .collect();
        let is_name = |name: &&str| {
            (name.ends_with(".rs") || name.ends_with('/'))
                && name
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | '.'))
        };
        if names.is_empty() || !names.iter().all(is_name) {
            continue;
        }
        while open.last().is_some_and(|(at, _)| *at >= indent) {
            open.pop();
        }
        let parent = open
            .last()
            .map(|(_, folder)| folder.clone())
            .unwrap_or_default();
        for name in names {
            let path = if name.starts_with("src/") {
                name.to_owned()
            } else {
                format!("{parent}{name}")
            };
            // What is listed below a file, deeper, is in its folder:
            // `connection.rs` then `resolver.rs` is `connection/resolver.rs`,
            // and below `src/core/mod.rs` is `src/core/`.
            let folder = match path.strip_suffix(".rs") {
                Some(stem) if stem.ends_with("/mod") => stem.trim_end_matches("mod").to_owned(),
                Some(stem) => format!("{stem}/"),
                None => path.clone(),
            };
            if path.ends_with(".rs") {
                named.insert(path);
            }
            open.push((indent, folder));
        }
    }
    named
}

/// The paths from `src/` that the prose gives: files, and folders for
/// their `mod.rs`.
fn files_in_prose(map: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for (at, _) in map.match_indices("src/") {
        let path: String = map[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | '.'))
            .collect();
        let path = path.trim_end_matches('.');
        if path.ends_with(".rs") {
            named.insert(path.to_owned());
        } else if path.ends_with('/') {
            named.insert(format!("{path}mod.rs"));
        }
    }
    named
}

fn files_under(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("a readable folder") {
        let path = entry.expect("a readable entry").path();
        if path.is_dir() {
            files_under(&path, root, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let relative = path.strip_prefix(root).expect("below the root");
            out.insert(relative.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn architecture_md_names_every_file_under_src_and_only_files_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut on_disk = BTreeSet::new();
    files_under(&root.join("src"), root, &mut on_disk);

    let from_trees = files_in_trees(&map);
    let named: BTreeSet<String> = from_trees.union(&files_in_prose(&map)).cloned().collect();
    let unnamed: Vec<&String> = on_disk.difference(&named).collect();
    assert!(
        unnamed.is_empty(),
        "ARCHITECTURE.md does not name these files: {unnamed:?}"
    );
    // A folder named for its `mod.rs` need not have one; a file must exist.
    let missing: Vec<&String> = named
        .difference(&on_disk)
        .filter(|path| !path.ends_with("/mod.rs"))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names files that do not exist: {missing:?}"
    );
}

#[test]
fn a_tree_nests_names_under_the_folder_or_file_above_them() {
    let map = "```\nsrc/daemon/            io\n  mod.rs               start\n  listener/            path\n    claim.rs           claim\n  connection.rs        per connection\n                       more words, with commas\n    resolver.rs        io side\nsrc/core/mod.rs        core\n  read.rs, line.rs,\n  store.rs             views\n```\n";
    let named: Vec<String> = files_in_trees(map).into_iter().collect();
    assert_eq!(
        named,
        [
            "src/core/line.rs",
            "src/core/mod.rs",
            "src/core/read.rs",
            "src/core/store.rs",
            "src/daemon/connection.rs",
            "src/daemon/connection/resolver.rs",
            "src/daemon/listener/claim.rs",
            "src/daemon/mod.rs",
        ]
    );
}

/// The editors a scenario of `for_editors!` runs in, and the module its
/// daemon-killed twin sits in: they end a test's path, after its name.
const SCENARIO_SUFFIXES: &[&str] = &["neovim", "vim", "emacs", "after_the_daemon_is_killed"];

/// The test names a document gives, as `` `module::…::name` ``, whose
/// function is found nowhere under `src/` or `tests/`.
fn tests_named_but_missing(document: &str, code: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for quoted in document.split('`').skip(1).step_by(2) {
        let is_path = quoted.contains("::")
            && quoted
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '{' | '}' | ','));
        if !is_path || quoted.chars().next().is_some_and(|c| c.is_uppercase()) {
            continue;
        }
        let name = quoted
            .split("::")
            .filter(|segment| !segment.starts_with('{') && !SCENARIO_SUFFIXES.contains(segment))
            .last()
            .unwrap_or_default();
        let defined = [
            format!("fn {name}("),
            format!("fn {name}<"),
            format!("for_editors!({name}"),
        ]
        .iter()
        .any(|definition| code.contains(definition.as_str()));
        if !defined && !missing.contains(&quoted.to_owned()) {
            missing.push(quoted.to_owned());
        }
    }
    missing
}

#[test]
fn every_test_the_guarantees_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = BTreeSet::new();
    files_under(&root.join("src"), root, &mut files);
    files_under(&root.join("tests"), root, &mut files);
    let code: String = files
        .iter()
        .map(|file| std::fs::read_to_string(root.join(file)).expect("a readable source file"))
        .collect();
    let guarantees = std::fs::read_to_string(root.join("docs/guarantees.md")).expect("guarantees");
    let missing = tests_named_but_missing(&guarantees, &code);
    assert!(
        missing.is_empty(),
        "docs/guarantees.md names tests that do not exist: {missing:?}"
    );
    // And the check finds one.
    assert_eq!(
        tests_named_but_missing("held by `x::tests::no_such_test`", &code),
        ["x::tests::no_such_test"]
    );
}

#[test]
fn every_file_of_tests_is_a_module_of_the_test_binary() {
    // With `autotests = false`, a file left out of tests/tests.rs would
    // never be compiled, and its tests never run.
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let binary = std::fs::read_to_string(tests.join("tests.rs")).expect("tests/tests.rs");
    let mut left_out = Vec::new();
    for entry in std::fs::read_dir(&tests).expect("tests/") {
        let path = entry.expect("an entry").path();
        let is_module_file =
            path.extension().is_some_and(|ext| ext == "rs") || path.join("mod.rs").is_file();
        let Some(stem) = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
        else {
            continue;
        };
        if is_module_file && stem != "tests" && !binary.contains(&format!("mod {stem};")) {
            left_out.push(stem);
        }
    }
    assert!(
        left_out.is_empty(),
        "not declared in tests/tests.rs: {left_out:?}"
    );
}
