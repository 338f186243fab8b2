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

/// The path with `suffix` added to its file name, whatever bytes it holds.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
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

/// Why a client will not talk to whatever listens at a socket.
#[derive(Debug)]
pub enum Distrust {
    /// The socket's folder cannot be looked at: it is missing, or a folder
    /// on the way is closed to us. Connecting would fail the same way, so
    /// this means no daemon, not a suspect one.
    Unreachable(io::Error),
    /// Nothing vouches for the daemon: one line naming the path, who owns
    /// it and what to do.
    Untrusted(String),
}

/// The check a client makes before it connects, on the model of tmux's
/// check of `/tmp/tmux-$UID`: only someone the caller may trust can have
/// put a socket in the socket's folder. Returns the folder's owner, which
/// the daemon's own uid must then match (see [`check_daemon_uid`]) unless
/// it is the caller's or root's.
///
/// The folder, looked at without following a link, must be a folder that
/// nobody but its owner may write to. Its owner must be the caller, root,
/// or a user that root or the caller gave that place: a shared (system or
/// `--group`) daemon's user. That last is so when every folder above it,
/// up to the first one that the caller or root owns, belongs to that same
/// user, and none of them, that last one included, lets anyone else
/// write. A folder of another user's right in a folder everyone may write
/// to, such as `/tmp/presenced-$UID` made by someone else first, fails:
/// anyone could have made it.
pub fn check_socket_folder(socket: &Path) -> Result<u32, Distrust> {
    let me = current_uid();
    let folder = parent_dir(socket);
    let meta = std::fs::symlink_metadata(folder).map_err(Distrust::Unreachable)?;
    let untrusted = |why: String, fix: &str| {
        Distrust::Untrusted(format!(
            "will not talk to the daemon at {}: {why}; nothing was sent. {fix}",
            socket.display()
        ))
    };
    const ANOTHER_SOCKET: &str = "Use a socket of your own (--socket, PRESENCE_SOCKET, or \
                                  XDG_RUNTIME_DIR for the default)";
    if meta.file_type().is_symlink() {
        return Err(untrusted(
            format!(
                "its folder {} is a symbolic link, which leads wherever its maker chose",
                folder.display()
            ),
            "Name the real folder instead",
        ));
    }
    if !meta.is_dir() {
        // Nothing can listen there, and connecting would say so.
        return Err(Distrust::Unreachable(io::Error::from(
            io::ErrorKind::NotADirectory,
        )));
    }
    let owner = meta.uid();
    if meta.mode() & 0o022 != 0 {
        let fix = if owner == me {
            format!(
                "If that is your daemon's, run `chmod go-w {}` and restart it",
                folder.display()
            )
        } else {
            ANOTHER_SOCKET.to_owned()
        };
        return Err(untrusted(
            format!(
                "its folder {}, of {}, may be written by group or others (mode {:o}), so \
                 anyone could have put that socket there",
                folder.display(),
                describe_uid(owner),
                meta.mode() & 0o777
            ),
            &fix,
        ));
    }
    if owner == me || owner == 0 {
        return Ok(owner);
    }
    // Another user's folder: follow the physical path up to a folder that
    // we or root own, through folders of that same user only.
    let real = std::fs::canonicalize(folder).map_err(Distrust::Unreachable)?;
    for above in real.ancestors().skip(1) {
        let meta = std::fs::metadata(above).map_err(Distrust::Unreachable)?;
        if meta.mode() & 0o022 != 0 {
            return Err(untrusted(
                format!(
                    "its folder {} belongs to {}, not to you (uid {me}) or root, and lies under \
                     {}, which others may write to, so anyone could have made it",
                    folder.display(),
                    describe_uid(owner),
                    above.display()
                ),
                &format!(
                    "If that is no daemon you mean to use, ask an administrator to remove {}. \
                     {ANOTHER_SOCKET}",
                    folder.display()
                ),
            ));
        }
        match meta.uid() {
            uid if uid == me || uid == 0 => return Ok(owner),
            uid if uid == owner => continue,
            uid => {
                return Err(untrusted(
                    format!(
                        "its folder {} belongs to {}, not to you (uid {me}) or root, and lies \
                         under {}, which belongs to {}, so nothing shows that root or you gave it \
                         that place",
                        folder.display(),
                        describe_uid(owner),
                        above.display(),
                        describe_uid(uid)
                    ),
                    "A shared daemon's socket belongs in a folder of its user's inside one of \
                     root's, such as /run/presenced",
                ));
            }
        }
    }
    // Only a root folder owned by that user itself gets here.
    Err(untrusted(
        format!(
            "its folder {} belongs to {}, and so does every folder above it",
            folder.display(),
            describe_uid(owner)
        ),
        ANOTHER_SOCKET,
    ))
}

/// The check a client makes once connected, before it sends anything:
/// the daemon listening (its peer credentials) runs as the caller, as
/// root, or as the owner of the socket's folder, which
/// [`check_socket_folder`] vouched for.
pub fn check_daemon_uid(socket: &Path, folder_owner: u32, daemon_uid: u32) -> Result<(), String> {
    let me = current_uid();
    if daemon_uid == me || daemon_uid == 0 || daemon_uid == folder_owner {
        return Ok(());
    }
    Err(format!(
        "will not talk to the daemon at {}: it runs as {}, not as you (uid {me}), root or the \
         owner of its folder ({}); nothing was sent. Find out who started it (`ss -xlp` names \
         the process), and use a socket of your own (--socket or PRESENCE_SOCKET)",
        socket.display(),
        describe_uid(daemon_uid),
        describe_uid(folder_owner)
    ))
}

/// `uid 65534 (nobody)`, or `uid 4242` for a uid without a name.
fn describe_uid(uid: u32) -> String {
    let name = crate::sys::user_name(uid);
    if name == uid.to_string() {
        format!("uid {uid}")
    } else {
        format!("uid {uid} ({name})")
    }
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
    fn a_client_trusts_a_private_folder_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("presenced.sock");
        assert_eq!(check_socket_folder(&socket).unwrap(), current_uid());
    }

    #[test]
    fn a_client_will_not_talk_through_a_folder_others_may_write_or_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        for (folder, why) in [
            (open, "may be written by group or others"),
            (link, "symbolic link"),
        ] {
            let socket = folder.join("presenced.sock");
            match check_socket_folder(&socket) {
                Err(Distrust::Untrusted(message)) => {
                    assert!(message.contains(why), "{message}");
                    assert!(message.contains(&socket.display().to_string()), "{message}");
                    assert!(!message.contains('\n'), "one line: {message}");
                }
                other => panic!("{folder:?} should be refused: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_folder_is_no_daemon_rather_than_a_suspect_one() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        for folder in [tmp.path().join("missing"), file] {
            let socket = folder.join("presenced.sock");
            assert!(
                matches!(check_socket_folder(&socket), Err(Distrust::Unreachable(_))),
                "{folder:?}"
            );
        }
    }

    #[test]
    fn the_daemon_must_run_as_the_caller_root_or_the_folders_owner() {
        let me = current_uid();
        let socket = Path::new("/run/x/presenced.sock");
        let stranger = me.wrapping_add(4242).max(1);
        assert!(check_daemon_uid(socket, me, me).is_ok());
        assert!(check_daemon_uid(socket, me, 0).is_ok());
        assert!(check_daemon_uid(socket, stranger, stranger).is_ok());
        let refused = check_daemon_uid(socket, me, stranger).unwrap_err();
        assert!(
            refused.contains(&format!("it runs as uid {stranger}")),
            "{refused}"
        );
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
