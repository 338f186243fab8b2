//! A daemon others share: root's, with `--group nogroup`, as a machine's
//! daemon is shared with a group. Root is the daemon's own user; uid 65534
//! and uid 65533, both in group nogroup, are two members, run through
//! `setpriv`. Only root can set this up.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{presence_bin, start_daemon};

/// The group the daemon is shared with: uid 65534's own.
pub const GROUP: &str = "nogroup";

/// A second member of the group, besides uid 65534: a uid with no passwd
/// entry, so the daemon calls it "65533".
pub const OTHER_MEMBER: u32 = 65533;

pub struct SharedDaemon {
    _dir: TempDir,
    pub socket: PathBuf,
    /// A copy of `presence` every member can run.
    binary: PathBuf,
    _daemon: Child,
}

impl SharedDaemon {
    /// Starts root's daemon, shared with [`GROUP`], with extra `presence
    /// daemon` arguments.
    pub async fn start(extra: &[&str]) -> SharedDaemon {
        let dir = tempfile::tempdir().expect("temporary folder");
        let mode = |mode| std::fs::Permissions::from_mode(mode);
        // Members pass through to the socket's folder, as through /run.
        std::fs::set_permissions(dir.path(), mode(0o711)).expect("chmod");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        std::fs::set_permissions(&bin, mode(0o755)).expect("chmod");
        let binary = bin.join("presence");
        super::runnable_copy(Path::new(presence_bin()), &binary);

        let socket = dir.path().join("run/presenced.sock");
        let db = dir.path().join("state/presence.db");
        let mut args = vec!["--group", GROUP];
        args.extend_from_slice(extra);
        let daemon = start_daemon(Command::new(presence_bin()), &socket, &db, &args).await;
        SharedDaemon {
            _dir: dir,
            socket,
            binary,
            _daemon: daemon,
        }
    }

    /// `presence --socket SOCKET --no-autostart ARGS`, run as `uid` with
    /// group nogroup and no other, its output piped.
    pub fn presence_as(&self, uid: u32, args: &[&str]) -> Command {
        let mut command = self.as_member(uid, &self.binary);
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .args(args);
        command
    }

    /// `presence ARGS` against this daemon, as root.
    pub fn presence_as_root(&self, args: &[&str]) -> Command {
        let mut command = Command::new(presence_bin());
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// A process of `uid` that lives until dropped, for entries to belong
    /// to.
    pub fn sleeper_as(&self, uid: u32) -> Child {
        let mut command = self.as_member(uid, Path::new("sleep"));
        command.arg("1000").stdout(Stdio::null());
        command.spawn().expect("sleep spawns")
    }

    fn as_member(&self, uid: u32, program: &Path) -> Command {
        let mut command = super::as_user(program, uid);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}
