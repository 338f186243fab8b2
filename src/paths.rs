//! Where the socket and the database live by default, and the checks that
//! keep the socket's folder private.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
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
    check_dir(dir, &std::fs::metadata(dir)?, Forbidden::WRITABLE)
}

/// [`ensure_private_dir`] for the folder of a socket, which is stricter:
/// whoever can write to it could put their own socket in our daemon's
/// place. The folder may not be a symbolic link, and the shared-`/tmp`
/// fallback must be closed to everyone else. With [`SocketAccess::Group`],
/// the folders made here are 0750 and the group's, the group may read (not
/// write) the folder, and it must be able to pass through every folder on
/// the way; an existing folder is never changed, since it may be `/run`.
pub fn ensure_socket_dir(dir: &Path, access: &SocketAccess) -> io::Result<()> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|folder| !folder.as_os_str().is_empty() && !folder.exists())
        .map(Path::to_owned)
        .collect();
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    if let SocketAccess::Group { gid, .. } = access {
        for made in missing.iter().rev() {
            let_group_in(made, *gid)?;
        }
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is a symbolic link; name the real folder", dir.display()),
        ));
    }
    let in_shared_tmp = dir == tmp_socket_dir();
    check_dir(dir, &meta, Forbidden::for_socket_dir(in_shared_tmp, access))?;
    if let SocketAccess::Group { gid, name } = access {
        check_group_can_reach(dir, *gid, name)?;
    }
    Ok(())
}

/// Gives a folder this daemon just made to the group, 0750. Through a
/// descriptor opened without following links, so that nothing swapped in
/// at the path meanwhile is changed instead.
fn let_group_in(folder: &Path, gid: u32) -> io::Result<()> {
    use rustix::fs::{Gid, Mode, OFlags, fchmod, fchown, open};
    let opened = open(
        folder,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    fchown(&opened, None, Some(Gid::from_raw(gid)))?;
    fchmod(&opened, Mode::from_raw_mode(0o750))?;
    Ok(())
}

/// Refuses a socket folder the group's members could not reach: each
/// folder on the way must let them pass, as others or as its group.
fn check_group_can_reach(dir: &Path, gid: u32, name: &str) -> io::Result<()> {
    let dir = std::path::absolute(dir)?;
    for folder in dir.ancestors() {
        let meta = std::fs::metadata(folder)?;
        let passable = meta.mode() & 0o001 != 0 || (meta.gid() == gid && meta.mode() & 0o010 != 0);
        if !passable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "members of `{name}` cannot pass through {} (mode {:o}), so they could not \
                     reach the socket; put it where they can (--socket), or let them through \
                     (`chgrp {name}` and `chmod g+x` that folder)",
                    folder.display(),
                    meta.mode() & 0o777
                ),
            ));
        }
    }
    Ok(())
}

/// Mode bits a folder must not have, and what to say when it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Forbidden {
    bits: u32,
    what: &'static str,
    fix: &'static str,
}

impl Forbidden {
    /// Nobody else may write, wherever it is.
    const WRITABLE: Forbidden = Forbidden {
        bits: 0o022,
        what: "writable by group or others",
        fix: "chmod 700",
    };

    /// The socket folder's rule: in the shared `/tmp`, others may not even
    /// look, and the group only when it shares the socket.
    fn for_socket_dir(in_shared_tmp: bool, access: &SocketAccess) -> Forbidden {
        match (in_shared_tmp, access) {
            (false, _) => Forbidden::WRITABLE,
            (true, SocketAccess::Owner) => Forbidden {
                bits: 0o077,
                what: "open to group or others",
                fix: "chmod 700",
            },
            (true, SocketAccess::Group { .. }) => Forbidden {
                bits: 0o027,
                what: "writable by its group or open to others",
                fix: "chmod 750",
            },
        }
    }
}

/// Refuses a folder another user owns or with any forbidden bit set.
fn check_dir(dir: &Path, meta: &std::fs::Metadata, forbidden: Forbidden) -> io::Result<()> {
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
    if meta.mode() & forbidden.bits != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is {} (mode {:o}); use a private folder ({})",
                dir.display(),
                forbidden.what,
                meta.mode() & 0o777,
                forbidden.fix
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
    use std::os::unix::fs::PermissionsExt;

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
    fn the_shared_tmp_folder_may_let_in_only_the_group_it_is_shared_with() {
        let group = SocketAccess::Group {
            gid: 1234,
            name: "g".into(),
        };
        let owner = Forbidden::for_socket_dir(true, &SocketAccess::Owner);
        let shared = Forbidden::for_socket_dir(true, &group);
        // What ensure_socket_dir makes for each must pass its own check.
        assert_eq!(0o700 & owner.bits, 0);
        assert_eq!(0o750 & shared.bits, 0);
        assert_ne!(0o750 & owner.bits, 0, "the group is not let in unasked");
        assert_ne!(0o770 & shared.bits, 0, "the group may not write");
        assert_ne!(0o751 & shared.bits, 0, "others may not pass");
        assert_eq!(
            Forbidden::for_socket_dir(false, &group),
            Forbidden::WRITABLE
        );
    }

    #[test]
    fn a_group_folder_is_refused_where_the_group_cannot_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getgid().as_raw();
        let group = SocketAccess::Group {
            gid,
            name: "g".into(),
        };
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let made = tmp.path().join("a/run");
        ensure_socket_dir(&made, &group).unwrap();
        for folder in [tmp.path().join("a"), made.clone()] {
            let meta = std::fs::metadata(&folder).unwrap();
            assert_eq!((meta.mode() & 0o777, meta.gid()), (0o750, gid));
        }
        // A private folder on the way keeps the group out.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = ensure_socket_dir(&made, &group).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("cannot pass through"), "{err}");
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
