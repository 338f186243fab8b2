//! Where the socket and the database live by default, and the checks that
//! keep the socket's folder private.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys::current_uid;

/// The system-wide daemon's socket (`presence --system`), shared by the
/// members of [`SYSTEM_GROUP`].
pub const SYSTEM_SOCKET: &str = "/run/presenced/presenced.sock";
/// The system-wide daemon's database.
pub const SYSTEM_DB: &str = "/var/lib/presenced/presence.db";
/// The group whose members may use the system-wide daemon.
pub const SYSTEM_GROUP: &str = "presence";

/// Who may connect to a daemon's socket besides its own user (and root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAccess {
    /// Nobody: the socket is 0600 in a 0700 folder.
    Owner,
    /// The members of one group too: the socket is 0660 and its folder lets
    /// the group in (0750), as in system-wide mode.
    Group { gid: u32, name: String },
}

impl SocketAccess {
    /// Access for the members of the group called `name`, which must exist.
    pub fn group(name: &str) -> io::Result<SocketAccess> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(SocketAccess::Group {
                gid: group.gid.as_raw(),
                name: name.to_owned(),
            }),
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "there is no group `{name}`; create it with `groupadd --system {name}` and \
                     add the users who share topics to it"
                ),
            )),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// The socket file's mode.
    pub fn socket_mode(&self) -> u32 {
        match self {
            SocketAccess::Owner => 0o600,
            SocketAccess::Group { .. } => 0o660,
        }
    }
}

/// `$XDG_RUNTIME_DIR/presenced/presenced.sock`, or
/// `/tmp/presenced-$UID/presenced.sock` without a runtime dir.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("presenced/presenced.sock"),
        None => tmp_socket_dir().join("presenced.sock"),
    }
}

/// The socket folder used when there is no `XDG_RUNTIME_DIR`.
fn tmp_socket_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/presenced-{}", current_uid()))
}

/// `$XDG_STATE_HOME/presenced/presence.db`, falling back to
/// `~/.local/state/presenced/presence.db`, and without a home folder to
/// `/tmp/presenced-$UID/presence.db`.
pub fn default_db() -> PathBuf {
    let folder = std::env::var_os("XDG_STATE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .map(|state| state.join("presenced"))
        // No HOME either: the per-user folder beside the fallback socket.
        .unwrap_or_else(tmp_socket_dir);
    folder.join("presence.db")
}

/// The database a daemon started now would use: `PRESENCE_DB`, else the
/// default.
pub fn configured_db() -> PathBuf {
    std::env::var_os("PRESENCE_DB")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_db)
}

/// Where a daemon started on demand writes its log: beside its database.
pub fn autostart_log(db: &Path) -> PathBuf {
    db.with_file_name("daemon.log")
}

/// The lock a daemon holds for as long as it serves `socket`.
pub fn daemon_lock(socket: &Path) -> PathBuf {
    sibling(socket, ".lock")
}

/// The lock clients hold while they start a daemon for `socket`.
pub fn autostart_lock(socket: &Path) -> PathBuf {
    sibling(socket, ".start.lock")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Creates `dir` (mode 0700) if needed and refuses it when another user owns
/// it or when group or others may write to it.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    check_dir(dir, &std::fs::metadata(dir)?, 0o022)
}

/// [`ensure_private_dir`] for the folder of a socket, which is stricter:
/// whoever can write to it could put their own socket in our daemon's
/// place. The folder may not be a symbolic link, and the shared-`/tmp`
/// fallback must be exactly 0700. With [`SocketAccess::Group`], a folder
/// made here is 0750 and the group's, and an existing one must let the
/// group in; an existing folder is never changed, since it may be `/run`.
pub fn ensure_socket_dir(dir: &Path, access: &SocketAccess) -> io::Result<()> {
    let existed = dir.exists();
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is a symbolic link; name the real folder", dir.display()),
        ));
    }
    let in_shared_tmp = dir == tmp_socket_dir();
    check_dir(dir, &meta, if in_shared_tmp { 0o077 } else { 0o022 })?;
    if let SocketAccess::Group { gid, name } = access {
        if !existed {
            std::os::unix::fs::chown(dir, None, Some(*gid))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
            meta = std::fs::symlink_metadata(dir)?;
        }
        let group_may_enter =
            (meta.gid() == *gid && meta.mode() & 0o010 != 0) || meta.mode() & 0o001 != 0;
        if !group_may_enter {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the group `{name}` cannot reach {} (mode {:o}); `chgrp {name}` it and \
                     `chmod 750` it",
                    dir.display(),
                    meta.mode() & 0o777
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a folder another user owns or with any of `forbidden_mode` set.
fn check_dir(dir: &Path, meta: &std::fs::Metadata, forbidden_mode: u32) -> io::Result<()> {
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by this user (uid {uid})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & forbidden_mode != 0 {
        let what = if forbidden_mode == 0o022 {
            "writable by group or others"
        } else {
            "open to group or others"
        };
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is {what} (mode {:o}); use a private folder (chmod 700)",
                dir.display(),
                meta.mode() & 0o777
            ),
        ));
    }
    Ok(())
}

/// The folder holding `path`, for paths given as a bare file name too.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_folder_is_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_world_writable_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_dir(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn a_symlinked_socket_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        ensure_private_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(ensure_socket_dir(&real, &SocketAccess::Owner).is_ok());
        let err = ensure_socket_dir(&link, &SocketAccess::Owner).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn lock_files_sit_beside_the_socket() {
        let socket = Path::new("/run/x/presenced.sock");
        assert_eq!(daemon_lock(socket), Path::new("/run/x/presenced.sock.lock"));
        assert_eq!(
            autostart_lock(socket),
            Path::new("/run/x/presenced.sock.start.lock")
        );
    }
}
