//! The topic of a file: the one convention every editor plugin and
//! `presence who` use, so that everyone who opens a file meets on one
//! topic whatever name they opened it by.
//!
//! `file:` and the file's absolute path with symbolic links resolved; for
//! a file that does not exist yet (a buffer not written yet), the resolved
//! path of its folder, `/`, and its name. A symbolic link to a file that
//! does not exist yet is followed first: its topic is its target's.
//! docs/editors.md states the same rule for plugin authors.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What every file topic starts with.
const FILE_TOPIC_PREFIX: &str = "file:";

/// The topic of the file at `path` (relative paths are taken from the
/// working folder). See the module's documentation for the rule.
pub fn file_topic(path: &Path) -> Result<String, FileTopicError> {
    let resolved = resolve_file(path)?;
    match resolved.to_str() {
        Some(text) => Ok(format!("{FILE_TOPIC_PREFIX}{text}")),
        None => Err(FileTopicError::new(path, Problem::NotUtf8(resolved))),
    }
}

/// The most symbolic links followed in a row before giving up, as the
/// kernel does (`ELOOP`).
const MAX_LINKS: usize = 40;

/// The path a file's topic names: absolute, symbolic links resolved; for a
/// file that does not exist, its folder resolved and its name kept.
///
/// A symbolic link to a file that does not exist yet is followed to that
/// path: writing through the link creates the target, whose resolved path
/// is then the topic, so the topic is the same before and after the first
/// write, and the same as for an editor that opened the target by name.
fn resolve_file(path: &Path) -> Result<PathBuf, FileTopicError> {
    let fail = |problem| FileTopicError::new(path, problem);
    if path.as_os_str().is_empty() {
        return Err(fail(Problem::Empty));
    }
    let absolute = std::path::absolute(path).map_err(|e| fail(Problem::Io(e)))?;
    match std::fs::canonicalize(&absolute) {
        Ok(real) if real.is_dir() => Err(fail(Problem::Folder(real))),
        Ok(real) => Ok(real),
        // Not there (or a link to nothing): named by its folder, which must be.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let missing = follow_links(&absolute).map_err(fail)?;
            // Said in errors about a folder that is not the name's own.
            let fail = |problem| {
                if missing == absolute {
                    fail(problem)
                } else {
                    fail(Problem::LinkTo(missing.clone(), Box::new(problem)))
                }
            };
            let (Some(folder), Some(name)) = (missing.parent(), missing.file_name()) else {
                return Err(fail(Problem::NoName));
            };
            match std::fs::canonicalize(folder) {
                Ok(real) if real.is_dir() => Ok(real.join(name)),
                Ok(real) => Err(fail(Problem::FolderIsNot(real))),
                Err(e) => Err(fail(Problem::NoFolder(folder.to_owned(), e))),
            }
        }
        Err(e) => Err(fail(Problem::Io(e))),
    }
}

/// Where the chain of symbolic links starting at `absolute` ends: the
/// first path that is not a link (`absolute` itself when it is none). A
/// relative link target is taken from the link's folder, as the kernel
/// does; folders on the way are resolved later, with the name's folder.
fn follow_links(absolute: &Path) -> Result<PathBuf, Problem> {
    let mut current = absolute.to_owned();
    let mut followed = 0;
    loop {
        match std::fs::symlink_metadata(&current) {
            Ok(stat) if stat.file_type().is_symlink() => {
                if followed == MAX_LINKS {
                    return Err(Problem::TooManyLinks(current));
                }
                followed += 1;
                let target = std::fs::read_link(&current).map_err(Problem::Io)?;
                current = match current.parent() {
                    // An absolute target replaces the whole path.
                    Some(folder) => folder.join(target),
                    None => target,
                };
            }
            // Not a link, or nothing there (perhaps not even its folder):
            // the caller resolves what it can of it.
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(Problem::Io(e)),
        }
    }
}

/// Why a path has no file topic.
#[derive(Debug)]
pub struct FileTopicError {
    /// The path as it was given.
    pub path: PathBuf,
    problem: Problem,
}

#[derive(Debug)]
enum Problem {
    Empty,
    /// It resolves to this folder: folders have no topic.
    Folder(PathBuf),
    /// It ends in `..` or `/` and names nothing.
    NoName,
    /// It does not exist, and neither does its folder.
    NoFolder(PathBuf, io::Error),
    /// It does not exist, and what would be its folder is not one.
    FolderIsNot(PathBuf),
    /// The resolved path is not UTF-8, and a topic is a string.
    NotUtf8(PathBuf),
    /// A chain of more symbolic links than [`MAX_LINKS`], reaching this.
    TooManyLinks(PathBuf),
    /// A symbolic link (or a chain of them) to this path, which does not
    /// exist and has the problem.
    LinkTo(PathBuf, Box<Problem>),
    Io(io::Error),
}

impl FileTopicError {
    fn new(path: &Path, problem: Problem) -> FileTopicError {
        FileTopicError {
            path: path.to_owned(),
            problem,
        }
    }
}

impl fmt::Display for FileTopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        describe(f, &self.path, &self.problem)
    }
}

/// What is wrong with `path`, as a sentence starting with it.
fn describe(f: &mut fmt::Formatter<'_>, path: &Path, problem: &Problem) -> fmt::Result {
    let shown = path.display();
    match problem {
        Problem::Empty => write!(f, "an empty path names no file"),
        Problem::Folder(real) if real.as_path() == path => {
            write!(f, "{shown} is a folder; only files have a topic")
        }
        Problem::Folder(real) => write!(
            f,
            "{shown} is a folder ({}); only files have a topic",
            real.display()
        ),
        Problem::NoName => write!(f, "{shown} names no file"),
        Problem::NoFolder(folder, e) if e.kind() == io::ErrorKind::NotFound => write!(
            f,
            "{shown} does not exist, nor does its folder {}",
            folder.display()
        ),
        Problem::NoFolder(folder, e) => write!(
            f,
            "{shown} does not exist and its folder {} cannot be resolved: {}",
            folder.display(),
            e
        ),
        Problem::FolderIsNot(real) => write!(
            f,
            "{shown} does not exist and {} is not a folder",
            real.display()
        ),
        Problem::NotUtf8(real) => write!(
            f,
            "{shown} resolves to {}, which is not UTF-8; a topic must be",
            real.display()
        ),
        Problem::TooManyLinks(reached) => write!(
            f,
            "{shown} is a chain of more than {MAX_LINKS} symbolic links (it reached {})",
            reached.display()
        ),
        Problem::LinkTo(target, problem) => {
            write!(f, "{shown} is a symbolic link, and ")?;
            describe(f, target, problem)
        }
        Problem::Io(e) => write!(f, "cannot resolve {shown}: {}", e),
    }
}

impl std::error::Error for FileTopicError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_and_its_target_have_one_topic() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir(real.join("docs")).unwrap();
        std::fs::write(real.join("docs/notes.md"), "x").unwrap();
        std::os::unix::fs::symlink(real.join("docs"), real.join("link")).unwrap();
        let expected = format!("file:{}", real.join("docs/notes.md").display());
        assert_eq!(file_topic(&real.join("docs/notes.md")).unwrap(), expected);
        assert_eq!(file_topic(&real.join("link/notes.md")).unwrap(), expected);
        assert_eq!(
            file_topic(&real.join("link/../docs/notes.md")).unwrap(),
            expected
        );
    }

    #[test]
    fn a_new_file_is_named_by_its_resolved_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::os::unix::fs::symlink(&real, real.join("here")).unwrap();
        assert_eq!(
            file_topic(&real.join("here/new.md")).unwrap(),
            format!("file:{}/new.md", real.display())
        );
    }

    /// A link to a file not written yet names the target, as writing
    /// through the link creates it: a chain of links, a relative target
    /// taken from its link's folder, and a linked folder on the way.
    #[test]
    fn a_dangling_link_is_named_by_the_file_it_will_create() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir(real.join("docs")).unwrap();
        std::fs::create_dir(real.join("sub")).unwrap();
        std::os::unix::fs::symlink("docs", real.join("alias")).unwrap();
        std::os::unix::fs::symlink("../alias/new.md", real.join("sub/link")).unwrap();
        std::os::unix::fs::symlink(real.join("sub/link"), real.join("chain")).unwrap();
        let target = format!("file:{}", real.join("docs/new.md").display());
        assert_eq!(file_topic(&real.join("sub/link")).unwrap(), target);
        assert_eq!(file_topic(&real.join("chain")).unwrap(), target);
        assert_eq!(file_topic(&real.join("docs/new.md")).unwrap(), target);
        std::os::unix::fs::symlink("gone/new.md", real.join("nowhere")).unwrap();
        assert_eq!(
            file_topic(&real.join("nowhere")).unwrap_err().to_string(),
            format!(
                "{} is a symbolic link, and {} does not exist, nor does its folder {}",
                real.join("nowhere").display(),
                real.join("gone/new.md").display(),
                real.join("gone").display()
            )
        );
        // Once written through the link, the topic stays.
        std::fs::write(real.join("chain"), "x").unwrap();
        assert_eq!(file_topic(&real.join("chain")).unwrap(), target);
    }

    #[test]
    fn links_that_never_end_have_no_topic() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        std::os::unix::fs::symlink("two", real.join("one")).unwrap();
        std::os::unix::fs::symlink("one", real.join("two")).unwrap();
        let looped = file_topic(&real.join("one")).unwrap_err().to_string();
        assert!(looped.starts_with("cannot resolve"), "{looped}");
        // More links in a row than the kernel follows, ending nowhere.
        for n in 0..=MAX_LINKS {
            std::os::unix::fs::symlink(format!("l{}", n + 1), real.join(format!("l{n}"))).unwrap();
        }
        let long = file_topic(&real.join("l0")).unwrap_err().to_string();
        // The kernel says so (ELOOP) first; a chain that grows between
        // its answer and ours is stopped at the same length.
        assert!(long.starts_with("cannot resolve"), "{long}");
        let too_many = FileTopicError::new(
            &real.join("l0"),
            follow_links(&real.join("l0")).unwrap_err(),
        )
        .to_string();
        assert!(
            too_many.contains("is a chain of more than 40 symbolic links"),
            "{too_many}"
        );
        assert_eq!(
            follow_links(&real.join("l1")).unwrap(),
            real.join(format!("l{}", MAX_LINKS + 1))
        );
    }

    #[test]
    fn folders_and_missing_folders_have_no_topic() {
        let tmp = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        let folder = file_topic(&real).unwrap_err().to_string();
        assert!(
            folder.ends_with("is a folder; only files have a topic"),
            "{folder}"
        );
        let missing = file_topic(&real.join("gone/new.md"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nor does its folder"), "{missing}");
        std::fs::write(real.join("plain"), "x").unwrap();
        let under_a_file = file_topic(&real.join("plain/new.md"))
            .unwrap_err()
            .to_string();
        assert!(under_a_file.starts_with("cannot resolve"), "{under_a_file}");
        assert!(file_topic(Path::new("")).is_err());
    }
}
