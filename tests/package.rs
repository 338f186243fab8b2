//! Installing presenced: the Debian package that `cargo deb` builds from
//! `[package.metadata.deb]` in Cargo.toml, and the README's `cargo install`
//! steps. Without the ignored tests, this checks what can be checked in
//! the tree: every man page, completion, unit and plugin file is listed
//! in the package, and the packaged units differ from contrib's only where
//! the binary is. The ignored ones check the installed files as the
//! system uses them: `man`, bash-completion's loader, zsh and fish,
//! `systemd-analyze verify`, and the editors. .ci/run builds and installs
//! the package before running them; without it they fail.
//!
//! Vim's help tags for the packaged plugins are made ahead into
//! contrib/help-tags; regenerate them with
//!
//!     PRESENCE_REGENERATE=1 cargo test --test tests -- --ignored package::help_tags

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{self, presence_bin};

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `[source, destination, mode]` of the package's assets.
#[derive(Debug)]
struct Asset {
    source: String,
    destination: String,
}

/// The package's assets as Cargo.toml lists them, one a line. A line of
/// any other shape fails the test, so that a change of layout cannot make
/// the checks below pass on an empty list.
fn assets() -> Vec<Asset> {
    let manifest = std::fs::read_to_string(repository().join("Cargo.toml")).expect("Cargo.toml");
    let (_, section) = manifest
        .split_once("\n[package.metadata.deb]\n")
        .expect("Cargo.toml has a [package.metadata.deb] section");
    let section = section.split("\n[").next().unwrap_or_default();
    let (_, list) = section
        .split_once("\nassets = [\n")
        .expect("[package.metadata.deb] has an `assets = [` list");
    let (list, _) = list
        .split_once("\n]")
        .expect("the assets list ends with `]`");
    let assets: Vec<Asset> = list
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line
                .strip_prefix('[')
                .and_then(|line| line.strip_suffix("],"))
                .map(|inner| inner.split(", ").collect())
                .unwrap_or_default();
            let unquoted: Vec<&str> = fields
                .iter()
                .filter_map(|field| field.strip_prefix('"')?.strip_suffix('"'))
                .collect();
            match unquoted[..] {
                [source, destination, mode] if mode.len() == 3 => Asset {
                    source: source.to_owned(),
                    destination: destination.to_owned(),
                },
                _ => panic!(
                    "an asset line not of the form [\"SOURCE\", \"DEST\", \"MODE\"],: {line}"
                ),
            }
        })
        .collect();
    assert!(!assets.is_empty(), "no assets read from Cargo.toml");
    assets
}

/// Whether `path` matches a cargo-deb source pattern, in which `*` stands
/// for any part of one file name.
fn matches(pattern: &str, path: &str) -> bool {
    fn segment(pattern: &[u8], name: &[u8]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((b'*', rest)) => (0..=name.len()).any(|skip| segment(rest, &name[skip..])),
            Some((byte, rest)) => name.first() == Some(byte) && segment(rest, &name[1..]),
        }
    }
    let patterns: Vec<&str> = pattern.split('/').collect();
    let names: Vec<&str> = path.split('/').collect();
    patterns.len() == names.len()
        && patterns
            .iter()
            .zip(&names)
            .all(|(pattern, name)| segment(pattern.as_bytes(), name.as_bytes()))
}

/// Every file under `folder` (a path relative to the repository), as
/// relative paths, sorted.
fn files_under(folder: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![repository().join(folder)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(repository())
                    .expect("under the repository");
                found.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// The units the package must hold: contrib's sockets as they are, and
/// for a service its packaged copy in contrib/systemd/packaged, which
/// names /usr/bin/presence.
fn packaged_units() -> Vec<String> {
    let mut units = Vec::new();
    for scope in ["user", "system"] {
        for unit in files_under(&format!("contrib/systemd/{scope}")) {
            let name = Path::new(&unit)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let packaged = format!("contrib/systemd/packaged/{scope}/{name}");
            let source = if repository().join(&packaged).exists() {
                packaged
            } else {
                unit
            };
            units.push(source);
        }
    }
    units
}

/// Every file of the tree that the package must hold.
fn files_to_package() -> Vec<String> {
    let mut files = Vec::new();
    for folder in ["man", "completions", "editors", "docs", "contrib/help-tags"] {
        files.extend(files_under(folder));
    }
    files.extend(packaged_units());
    files.extend(["README.md", "LICENSE-MIT", "LICENSE-APACHE"].map(str::to_owned));
    files
}

/// Where each asset's files land, without the leading `/`, with each
/// source file. Man pages get `.gz`: cargo-deb compresses them.
fn installed_paths() -> Vec<(String, Option<PathBuf>)> {
    let mut installed = Vec::new();
    for asset in assets() {
        let sources: Vec<String> = if asset.source.starts_with("target/") {
            vec![asset.source.clone()]
        } else {
            // A file at the top has no folder to list: it is its own
            // candidate, if it is there.
            let folder = Path::new(&asset.source).parent().unwrap_or(Path::new(""));
            let candidates = if folder.as_os_str().is_empty() {
                vec![asset.source.clone()]
                    .into_iter()
                    .filter(|file| repository().join(file).is_file())
                    .collect()
            } else {
                files_under(&folder.to_string_lossy())
            };
            candidates
                .into_iter()
                .filter(|file| matches(&asset.source, file))
                .collect()
        };
        assert!(
            !sources.is_empty(),
            "the asset {} matches no file",
            asset.source
        );
        for source in sources {
            let mut destination = asset.destination.clone();
            if destination.ends_with('/') {
                destination.push_str(&Path::new(&source).file_name().unwrap().to_string_lossy());
            }
            if destination.starts_with("usr/share/man/") {
                destination.push_str(".gz");
            }
            let file = (!source.starts_with("target/")).then(|| repository().join(&source));
            installed.push((destination, file));
        }
    }
    installed
}

#[test]
fn every_man_page_completion_unit_and_plugin_file_is_in_the_package() {
    let assets = assets();
    let missing: Vec<String> = files_to_package()
        .into_iter()
        .filter(|file| !assets.iter().any(|asset| matches(&asset.source, file)))
        .collect();
    assert!(
        missing.is_empty(),
        "not in [package.metadata.deb] assets of Cargo.toml: {missing:?}"
    );
    // The services for `cargo install` name a binary the package does not
    // have; only their packaged copies go in.
    for scope in ["user", "system"] {
        let by_hand = format!("contrib/systemd/{scope}/presenced.service");
        assert!(
            !assets.iter().any(|asset| matches(&asset.source, &by_hand)),
            "{by_hand} is packaged; its copy in contrib/systemd/packaged should be"
        );
    }
    // Two files to one place would leave one of them out.
    let destinations: Vec<String> = installed_paths()
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    let unique: BTreeSet<&String> = destinations.iter().collect();
    assert_eq!(
        unique.len(),
        destinations.len(),
        "assets overlap: {destinations:?}"
    );
}

#[test]
fn the_debian_changelog_starts_with_this_version() {
    let changelog = std::fs::read_to_string(repository().join("contrib/debian/changelog"))
        .expect("contrib/debian/changelog");
    let first = changelog.lines().next().unwrap_or_default();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        first.starts_with(&format!("presenced ({version}-")),
        "contrib/debian/changelog's first entry is not for {version}: {first}"
    );
}

/// A unit's lines that systemd reads (sections and directives), without
/// comments and blank lines.
fn directives(unit: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with(';'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn packaged_services_differ_from_contribs_only_in_the_binary_they_start() {
    for scope in ["user", "system"] {
        let read = |path: String| {
            std::fs::read_to_string(repository().join(&path))
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let by_hand = directives(&read(format!("contrib/systemd/{scope}/presenced.service")));
        let packaged = directives(&read(format!(
            "contrib/systemd/packaged/{scope}/presenced.service"
        )));
        assert_eq!(
            by_hand.len(),
            packaged.len(),
            "the {scope} services' directives"
        );
        let mut exec_starts = 0;
        for (by_hand, packaged) in by_hand.iter().zip(&packaged) {
            match (
                by_hand.strip_prefix("ExecStart="),
                packaged.strip_prefix("ExecStart="),
            ) {
                (Some(by_hand), Some(packaged)) => {
                    exec_starts += 1;
                    let (_, arguments) = by_hand.split_once(' ').expect("ExecStart has arguments");
                    assert_eq!(
                        packaged,
                        format!("/usr/bin/presence {arguments}"),
                        "the packaged {scope} service starts /usr/bin/presence with contrib's arguments"
                    );
                    assert_ne!(by_hand, packaged, "the {scope} service for `cargo install`");
                }
                _ => assert_eq!(by_hand, packaged, "the {scope} services differ"),
            }
        }
        assert_eq!(
            exec_starts, 1,
            "the {scope} services have one ExecStart each"
        );
    }
}

/// Runs a command to its end, failing the test if it cannot start.
fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{:?} cannot run: {e}", command.get_program()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails the test unless the package is installed, saying how to install it.
fn require_installed_package() {
    let query = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "presenced"]));
    assert!(
        text(&query.stdout) == "install ok installed",
        "the presenced package is not installed: build it with `cargo deb` and \
         install it with `dpkg -i target/debian/presenced_*.deb` (.ci/run does both) ({})",
        text(&query.stderr).trim()
    );
}

#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it)"]
fn the_installed_package_holds_this_trees_files_and_binary() {
    require_installed_package();
    let listed = run(Command::new("dpkg-query").args(["-L", "presenced"]));
    let installed: BTreeSet<String> = text(&listed.stdout)
        .lines()
        .filter(|path| !Path::new(path).is_dir())
        .map(|path| path.trim_start_matches('/').to_owned())
        .collect();
    let mut files = installed_paths();
    files.push((
        "usr/share/doc/presenced/changelog.Debian.gz".to_owned(),
        Some(repository().join("contrib/debian/changelog")),
    ));
    let mut expected: BTreeSet<String> = files.iter().map(|(path, _)| path.clone()).collect();
    // Made by cargo-deb from Cargo.toml's license and copyright.
    expected.insert("usr/share/doc/presenced/copyright".to_owned());
    assert_eq!(installed, expected, "the files the package installed");

    // The same bytes as in the tree: a package built from older sources
    // fails here. Compressed ones are compared after gunzip.
    for (destination, source) in files {
        let Some(source) = source else { continue };
        let path = Path::new("/").join(&destination);
        let bytes = if destination.ends_with(".gz") {
            let unzipped = run(Command::new("gzip").arg("-dc").arg(&path));
            assert!(unzipped.status.success(), "gzip -dc {}", path.display());
            unzipped.stdout
        } else {
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let want = std::fs::read(&source).expect("the tree's file");
        assert!(
            bytes == want,
            "{} differs from {}",
            path.display(),
            source.display()
        );
    }

    // The binary: the same version and help as the one just built.
    for args in [&["--version"][..], &["--help"], &["join", "--help"]] {
        let installed = run(Command::new("/usr/bin/presence").args(args));
        let built = run(Command::new(presence_bin()).args(args));
        assert!(installed.status.success(), "/usr/bin/presence {args:?}");
        assert_eq!(
            text(&installed.stdout),
            text(&built.stdout),
            "`presence {args:?}` of the package and of this tree"
        );
    }
    let mode = std::fs::metadata("/usr/bin/presence")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "/usr/bin/presence's mode");
}

/// `man` as a user's shell would run it: its search path made from PATH,
/// not from a MANPATH of the test's environment.
fn man(path: &str, args: &[&str]) -> Output {
    run(Command::new("man")
        .args(args)
        .env("PATH", path)
        .env("MANWIDTH", "80")
        .env_remove("MANPATH")
        .env_remove("MANPAGER")
        .env_remove("PAGER"))
}

/// Asserts that `man` finds every page of man/ under `folder` (the
/// file name, maybe with `.gz`), and that `man presence-join` renders.
fn assert_man_finds_every_page(path: &str, folder: &Path) {
    for page in files_under("man") {
        let name = Path::new(&page)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let found = man(path, &["-w", &name]);
        let found = text(&found.stdout);
        let found = Path::new(found.trim());
        assert!(
            found.parent() == Some(&folder.join("man1"))
                && found
                    .file_name()
                    .is_some_and(|file| file.to_string_lossy().starts_with(&name)),
            "man -w {name} found {found:?}, not the page in {}",
            folder.display()
        );
    }
    let rendered = man(path, &["presence-join"]);
    let page = text(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "man presence-join: {}",
        text(&rendered.stderr)
    );
    assert!(
        page.lines()
            .any(|line| line.trim().starts_with("presence-join - Join a topic")),
        "man presence-join has no NAME line:\n{page}"
    );
}

#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it)"]
fn man_finds_the_installed_pages() {
    require_installed_package();
    assert_man_finds_every_page("/usr/bin:/bin", Path::new("/usr/share/man"));
}

/// Loads the completion for `presence` in bash as an interactive shell
/// would, through bash-completion's loader, and completes `presence jo`.
/// Returns the file the completion function came from and the words
/// offered.
fn bash_completes_presence(environment: &[(&str, &Path)], path: &str) -> (String, Vec<String>) {
    let script = r#"
        set -u
        source /usr/share/bash-completion/bash_completion
        _completion_loader presence
        spec=$(complete -p presence) || exit 1
        function=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$spec")
        shopt -s extdebug
        declare -F "$function" | cut -d' ' -f3-
        shopt -u extdebug
        COMP_WORDS=(presence jo)
        COMP_CWORD=1
        COMP_LINE='presence jo'
        COMP_POINT=${#COMP_LINE}
        COMPREPLY=()
        "$function" presence jo presence
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let mut bash = Command::new("bash");
    bash.args(["--norc", "--noprofile", "-c", script])
        .env("PATH", path);
    for variable in ["XDG_DATA_HOME", "XDG_DATA_DIRS", "BASH_COMPLETION_USER_DIR"] {
        bash.env_remove(variable);
    }
    for (name, value) in environment {
        bash.env(name, value);
    }
    let output = run(&mut bash);
    assert!(
        output.status.success(),
        "bash-completion did not load a completion for presence (is bash-completion installed?): {}",
        text(&output.stderr)
    );
    let said = text(&output.stdout);
    let mut lines = said.lines().map(str::to_owned);
    let source = lines.next().unwrap_or_default();
    (source, lines.collect())
}

#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it)"]
fn bash_completion_loads_the_installed_completion() {
    require_installed_package();
    let home = tempfile::tempdir().expect("temporary folder");
    let (source, words) = bash_completes_presence(&[("HOME", home.path())], "/usr/bin:/bin");
    assert_eq!(source, "/usr/share/bash-completion/completions/presence");
    assert!(
        words.iter().any(|word| word == "join"),
        "`presence jo` offered {words:?}"
    );
}

/// The file zsh autoloads `_presence` from, after `compinit` (in the
/// `~/.zshrc` that `home` has), as `whence -v` names it.
fn zsh_completion_source(home: &Path, path: &str) -> String {
    let zsh = run(Command::new("zsh")
        .args([
            "-i",
            "-c",
            "print -r -- ${_comps[presence]}; whence -v _presence",
        ])
        .env("HOME", home)
        .env("PATH", path)
        .env_remove("ZDOTDIR")
        .env_remove("FPATH"));
    let said = text(&zsh.stdout);
    let mut lines = said.lines();
    assert_eq!(
        lines.next(),
        Some("_presence"),
        "zsh's compinit did not pick up a completion for presence: {said}{}",
        text(&zsh.stderr)
    );
    let source = lines.next().unwrap_or_default();
    source
        .split_once(" from ")
        .map_or(source, |(_, file)| file)
        .to_owned()
}

#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it), zsh and fish"]
fn zsh_and_fish_load_the_installed_completions() {
    require_installed_package();
    let home = tempfile::tempdir().expect("temporary folder");
    // compinit in a .zshrc, as every zsh set up for completion has.
    std::fs::write(
        home.path().join(".zshrc"),
        "autoload -Uz compinit && compinit\n",
    )
    .unwrap();
    assert_eq!(
        zsh_completion_source(home.path(), "/usr/bin:/bin"),
        "/usr/share/zsh/vendor-completions/_presence"
    );
    let fish = run(Command::new("fish")
        .args(["-c", "complete -C 'presence jo'"])
        .env("HOME", home.path())
        .env("PATH", "/usr/bin:/bin")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME"));
    let offered = text(&fish.stdout);
    assert!(
        offered
            .lines()
            .any(|line| line.split('\t').next() == Some("join")),
        "fish completed `presence jo` with: {offered}{}",
        text(&fish.stderr)
    );
}

/// The user and system units, as `systemd-analyze verify` sees them where
/// the package put them (their Documentation= man pages included).
#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it)"]
fn the_installed_units_pass_systemd_analyze_verify() {
    require_installed_package();
    let runtime = tempfile::tempdir().expect("temporary folder");
    for scope in ["user", "system"] {
        let folder = Path::new("/usr/lib/systemd").join(scope);
        let service =
            std::fs::read_to_string(folder.join("presenced.service")).expect("the service");
        assert!(
            service
                .lines()
                .any(|line| line.starts_with("ExecStart=/usr/bin/presence ")),
            "the installed {scope} service does not start /usr/bin/presence"
        );
        let units = [
            folder.join("presenced.socket"),
            folder.join("presenced.service"),
        ];
        common::assert_units_verify(scope, &units, |verify| {
            verify
                .env("PATH", "/usr/bin:/bin")
                .env("XDG_RUNTIME_DIR", runtime.path())
                .env_remove("MANPATH");
        });
    }
}

#[test]
#[ignore = "needs the .deb installed (.ci/run builds and installs it)"]
fn each_editor_loads_the_installed_plugin_only_when_asked() {
    require_installed_package();
    // `:PresenceWho` is defined by the plugin, `:help presenced` finds the
    // packaged help through its tags.
    let check = "if exists(':PresenceWho') == 2 | help presenced | qa! | else | cq | endif";
    for editor in ["vim", "nvim"] {
        let home = tempfile::tempdir().expect("temporary folder");
        let ask = |commands: &[&str]| {
            let mut command = Command::new(editor);
            command.args(["-u", "NONE", "-i", "NONE"]);
            command.arg(if editor == "vim" { "-Es" } else { "--headless" });
            for line in commands {
                command.args(["-c", line]);
            }
            run(command.env("HOME", home.path()).env_remove("VIMINIT"))
        };
        let asked = ask(&["packadd presenced", check]);
        assert!(
            asked.status.success(),
            "{editor}: `packadd presenced` did not load the packaged plugin and its help: {}{}",
            text(&asked.stdout),
            text(&asked.stderr)
        );
        let not_asked = ask(&[check]);
        assert!(
            !not_asked.status.success(),
            "{editor} loaded the plugin without `packadd`"
        );
    }
    // Emacs finds it on its load-path, and nothing turns the mode on.
    let home = tempfile::tempdir().expect("temporary folder");
    let emacs = run(Command::new("emacs")
        .args([
            "--batch",
            "--eval",
            "(progn (require 'presenced) \
             (princ (format \"%s %s\" (locate-library \"presenced\") presenced-mode)))",
        ])
        .env("HOME", home.path()));
    assert!(emacs.status.success(), "emacs: {}", text(&emacs.stderr));
    assert_eq!(
        text(&emacs.stdout),
        "/usr/share/emacs/site-lisp/presenced/presenced.el nil",
        "emacs loads the packaged presenced.el, with presenced-mode off"
    );
}

/// The README's `cargo install` steps, run after a stand-in for `cargo
/// install` (this tree's binary in `$CARGO_HOME/bin`, on PATH), in a home
/// of their own: man and bash-completion then find what they installed,
/// with no PATH or MANPATH change. The steps are read from the README.
#[test]
#[ignore = "needs man-db, bash-completion and zsh"]
fn the_readmes_cargo_install_steps_put_man_pages_and_completions_where_they_are_found() {
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README.md");
    let (_, section) = readme
        .split_once("### With cargo install\n")
        .expect("README has a `### With cargo install` section");
    let (_, block) = section.split_once("```sh\n").expect("a sh block in it");
    let (block, _) = block.split_once("```").expect("the block ends");
    let (install, steps) = block.split_once('\n').expect("lines after `cargo install`");
    assert!(
        install.starts_with("cargo install --path ."),
        "the first step: {install}"
    );

    let dir = tempfile::tempdir().expect("temporary folder");
    let home = dir.path().join("home");
    let cargo_bin = dir.path().join("cargo/bin");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&cargo_bin).unwrap();
    std::os::unix::fs::symlink(presence_bin(), cargo_bin.join("presence")).unwrap();
    let path = format!("{}:/usr/bin:/bin", cargo_bin.display());

    let mut shell = Command::new("bash");
    shell
        .args(["--norc", "--noprofile", "-euo", "pipefail", "-c", steps])
        .current_dir(repository())
        .env("HOME", &home)
        .env("CARGO_HOME", dir.path().join("cargo"))
        .env("PATH", &path);
    for variable in [
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
        "MANPATH",
        "CARGO_INSTALL_ROOT",
    ] {
        shell.env_remove(variable);
    }
    let ran = run(&mut shell);
    assert!(
        ran.status.success(),
        "the README's steps: {}",
        text(&ran.stderr)
    );

    assert_man_finds_every_page(&path, &dir.path().join("cargo/share/man"));

    let (source, words) = bash_completes_presence(&[("HOME", &home)], &path);
    assert_eq!(
        Path::new(&source),
        home.join(".local/share/bash-completion/completions/presence")
    );
    assert!(
        words.iter().any(|word| word == "join"),
        "`presence jo` offered {words:?}"
    );

    // fish reads its own folder; zsh, with the README's lines in .zshrc,
    // autoloads the completion from where the steps put it.
    assert!(
        home.join(".config/fish/completions/presence.fish")
            .is_file(),
        "~/.config/fish/completions/presence.fish was not installed"
    );
    let (_, zshrc) = section
        .split_once("```zsh\n")
        .expect("a zsh block in the section");
    let (zshrc, _) = zshrc.split_once("```").expect("the zsh block ends");
    std::fs::write(home.join(".zshrc"), zshrc).unwrap();
    assert_eq!(
        Path::new(&zsh_completion_source(&home, &path)),
        home.join(".local/share/zsh/site-functions/_presence")
    );
}

/// Vim's help tags for each packaged plugin, as the editor itself makes
/// them with `:helptags`, match contrib/help-tags.
#[test]
#[ignore = "needs vim and nvim"]
fn help_tags_are_current() {
    for editor in ["vim", "nvim"] {
        let dir = tempfile::tempdir().expect("temporary folder");
        let doc = repository().join("editors").join(editor).join("doc");
        for page in std::fs::read_dir(&doc).expect("the plugin's doc folder") {
            let page = page.unwrap().path();
            std::fs::copy(&page, dir.path().join(page.file_name().unwrap())).unwrap();
        }
        let mut command = Command::new(editor);
        command.args(["-u", "NONE", "-i", "NONE"]);
        command.arg(if editor == "vim" { "-Es" } else { "--headless" });
        let made = run(command
            .arg("-c")
            .arg(format!("helptags {}", dir.path().display()))
            .args(["-c", "qa!"]));
        assert!(
            made.status.success(),
            "{editor} :helptags: {}",
            text(&made.stderr)
        );
        let tags = std::fs::read(dir.path().join("tags")).expect(":helptags wrote tags");
        let committed = repository().join("contrib/help-tags").join(editor);
        if std::env::var_os("PRESENCE_REGENERATE").is_some() {
            std::fs::write(&committed, &tags).expect("write the tags");
        } else {
            assert!(
                std::fs::read(&committed).ok() == Some(tags),
                "{} is stale; regenerate it with \
                 PRESENCE_REGENERATE=1 cargo test --test tests -- --ignored package::help_tags",
                committed.display()
            );
        }
    }
}
