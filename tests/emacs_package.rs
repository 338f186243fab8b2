//! The Emacs package (editors/emacs/presenced.el) as the Emacs package
//! archives would take it: it byte-compiles with every warning an error,
//! checkdoc finds nothing to say about its documentation, and package-lint
//! (the linter the archives run) finds nothing to complain about.
//!
//! Emacs is run with `-Q --batch`, on a copy of the file in a temporary
//! folder, so that no `.elc` lands in the checkout. package-lint is looked
//! for where Debian's elpa-package-lint puts it, or in the folder named by
//! PACKAGE_LINT_DIR. The test is ignored unless asked for (`--ignored`,
//! as `.ci/run` does after installing both); asked for without Emacs or
//! package-lint, it fails saying which is missing.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/editors/emacs/presenced.el");
/// Where Debian's elpa-package-lint installs package-lint-VERSION.
const DEBIAN_ELPA: &str = "/usr/share/emacs/site-lisp/elpa";

fn package_lint_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PACKAGE_LINT_DIR") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(DEBIAN_ELPA)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("package-lint-"))
                && path.join("package-lint.el").is_file()
        })
        .collect();
    // The newest, if several versions are installed.
    found.sort();
    found.pop()
}

/// `emacs -Q --batch ARGS…` in `dir`.
fn emacs(dir: &Path, args: &[&str]) -> Output {
    Command::new("emacs")
        .args(["-Q", "--batch"])
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .output()
        .expect("run emacs")
}

/// The complaint of a check that failed or printed anything.
fn complaint(check: &str, output: &Output) -> Option<String> {
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (!output.status.success() || !printed.trim().is_empty())
        .then(|| format!("{check} ({}):\n{printed}", output.status))
}

#[test]
#[ignore = "needs Emacs"]
fn emacs_package_compiles_without_warnings_and_passes_checkdoc_and_package_lint() {
    common::needs_program("emacs", "emacs-nox");
    let lint_dir = package_lint_dir()
        .expect("this test needs package-lint (Debian: elpa-package-lint, or PACKAGE_LINT_DIR)");
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::copy(PACKAGE, dir.path().join("presenced.el")).expect("copy the package");

    let compiled = emacs(
        dir.path(),
        &[
            "--eval",
            "(setq byte-compile-error-on-warn t)",
            "-f",
            "batch-byte-compile",
            "presenced.el",
        ],
    );
    let checkdoc = emacs(
        dir.path(),
        &[
            "--eval",
            "(progn (require 'checkdoc) (checkdoc-file \"presenced.el\"))",
        ],
    );
    let lint_dir = lint_dir.to_string_lossy();
    let linted = emacs(
        dir.path(),
        &[
            "-L",
            &lint_dir,
            "-l",
            "package-lint",
            "--eval",
            "(setq package-lint-batch-fail-on-warnings t)",
            "-f",
            "package-lint-batch-and-exit",
            "presenced.el",
        ],
    );
    let complaints: Vec<String> = [
        complaint("byte-compile with warnings as errors", &compiled),
        complaint("checkdoc", &checkdoc),
        complaint("package-lint", &linted),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
    assert!(
        dir.path().join("presenced.elc").is_file(),
        "byte-compiling made no presenced.elc"
    );
}
