//! The topic of a file: the one convention every editor plugin and
//! `presence who` use, so that everyone who opens a file meets on one
//! topic whatever name they opened it by.
//!
//! `file:` and the file's absolute path with symbolic links resolved; for
//! a file that does not exist yet (a buffer not written yet), the resolved
//! path of its folder, `/`, and its name. docs/editors.md states the same
//! rule for plugin authors.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What every file topic starts with.
pub const FILE_TOPIC_PREFIX: &str = "file:";

/// The topic of the file at `path` (relative paths are taken from the
/// working folder). See the module's documentation for the rule.
pub fn file_topic(path: &Path) -> Result<String, FileTopicError> {
    let resolved = resolve_file(path)?;
    match resolved.to_str() {
        Some(text) => Ok(format!("{FILE_TOPIC_PREFIX}{text}")),
        None => Err(FileTopicError::new(path, Problem::NotUtf8(resolved))),
    }
}

/// The path a file's topic names: absolute, symbolic links resolved; for a
/// file that does not exist, its folder resolved and its name kept.
pub fn resolve_file(path: &Path) -> Result<PathBuf, FileTopicError> {
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
            let (Some(folder), Some(name)) = (absolute.parent(), absolute.file_name()) else {
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
        let path = self.path.display();
        match &self.problem {
            Problem::Empty => write!(f, "an empty path names no file"),
            Problem::Folder(real) if real.as_path() == self.path => {
                write!(f, "{path} is a folder; only files have a topic")
            }
            Problem::Folder(real) => write!(
                f,
                "{path} is a folder ({}); only files have a topic",
                real.display()
            ),
            Problem::NoName => write!(f, "{path} names no file"),
            Problem::NoFolder(folder, e) if e.kind() == io::ErrorKind::NotFound => write!(
                f,
                "{path} does not exist, nor does its folder {}",
                folder.display()
            ),
            Problem::NoFolder(folder, e) => write!(
                f,
                "{path} does not exist and its folder {} cannot be resolved: {}",
                folder.display(),
                e
            ),
            Problem::FolderIsNot(real) => write!(
                f,
                "{path} does not exist and {} is not a folder",
                real.display()
            ),
            Problem::NotUtf8(real) => write!(
                f,
                "{path} resolves to {}, which is not UTF-8; a topic must be",
                real.display()
            ),
            Problem::Io(e) => write!(f, "cannot resolve {path}: {}", e),
        }
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
