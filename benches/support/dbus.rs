//! The D-Bus baselines: a bus's name queue is the closest thing to a
//! presenced topic on one machine. A well-known name has one primary
//! owner and a queue of waiters in request order (no replacement, no
//! `DO_NOT_QUEUE`); when the owner's connection goes, the bus gives the
//! name to the next and tells it with a `NameAcquired` signal.
//!
//! Here: a minimal blocking client of the wire protocol (`AUTH EXTERNAL`,
//! `Hello`, `RequestName`, and reading until `NameAcquired`), used by the
//! owner child and by the bench's waiting thread alike; and the two buses,
//! dbus-daemon and dbus-broker, started on sockets in the run's temporary
//! folder and stopped with it.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::children::Helper;
use super::{TRIAL_DEADLINE, within};

/// `RequestName`'s answers (the D-Bus specification's numbers).
pub const PRIMARY_OWNER: u32 = 1;
pub const IN_QUEUE: u32 = 2;

const BUS_NAME: &str = "org.freedesktop.DBus";
const BUS_PATH: &str = "/org/freedesktop/DBus";

/// Message types.
const METHOD_CALL: u8 = 1;
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;
const SIGNAL: u8 = 4;

/// Header fields.
const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_DESTINATION: u8 = 6;
const FIELD_SIGNATURE: u8 = 8;

/// A connection to a bus, authenticated and said hello to. Every read
/// waits at most [`TRIAL_DEADLINE`], so a lost signal fails the trial.
pub struct Bus {
    stream: UnixStream,
    /// Bytes read and not yet taken as a message.
    input: Vec<u8>,
    serial: u32,
}

/// What the bench looks at in a message: its type, member, the serial it
/// answers, and its first argument when that is a string or a uint32.
#[derive(Debug)]
struct Message {
    kind: u8,
    member: Option<String>,
    error: Option<String>,
    reply_serial: Option<u32>,
    first_string: Option<String>,
    first_u32: Option<u32>,
}

impl Bus {
    /// Connects to the bus listening on `socket`, authenticates as this
    /// process's uid, and says `Hello`.
    pub fn connect(socket: &Path) -> anyhow::Result<Bus> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the bus at {}", socket.display()))?;
        stream.set_read_timeout(Some(TRIAL_DEADLINE))?;
        let mut bus = Bus {
            stream,
            input: Vec::new(),
            serial: 0,
        };
        bus.authenticate()?;
        let hello = bus.call("Hello", None)?;
        ensure!(
            hello.first_string.is_some(),
            "the bus's Hello reply has no unique name: {hello:?}"
        );
        Ok(bus)
    }

    /// The SASL exchange: a nul byte, `AUTH EXTERNAL` with the uid in hex
    /// (of its decimal digits), `OK`, `BEGIN`.
    fn authenticate(&mut self) -> anyhow::Result<()> {
        let uid = rustix::process::geteuid().as_raw().to_string();
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        self.stream
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())?;
        let end = loop {
            if let Some(end) = self.input.windows(2).position(|w| w == b"\r\n") {
                break end;
            }
            self.fill()?;
        };
        let line = String::from_utf8_lossy(&self.input[..end]).into_owned();
        ensure!(line.starts_with("OK "), "the bus refused AUTH: {line:?}");
        self.input.drain(..end + 2);
        self.stream.write_all(b"BEGIN\r\n")?;
        Ok(())
    }

    /// `RequestName(name, 0)`: [`PRIMARY_OWNER`], or [`IN_QUEUE`] behind it.
    pub fn request_name(&mut self, name: &str) -> anyhow::Result<u32> {
        let mut body = Writer::default();
        body.string(name);
        body.u32(0);
        let reply = self.call("RequestName", Some(("su", body.0)))?;
        reply
            .first_u32
            .with_context(|| format!("RequestName's reply has no answer: {reply:?}"))
    }

    /// Reads until the bus says this connection now owns `name`, and
    /// returns when the signal was read.
    pub fn wait_acquired(&mut self, name: &str) -> anyhow::Result<Instant> {
        loop {
            let message = self.next_message()?;
            if message.kind == SIGNAL
                && message.member.as_deref() == Some("NameAcquired")
                && message.first_string.as_deref() == Some(name)
            {
                return Ok(Instant::now());
            }
        }
    }

    /// Calls a method of the bus and returns its reply; an error reply
    /// fails. Messages before the reply (signals) are skipped.
    fn call(&mut self, member: &str, body: Option<(&str, Vec<u8>)>) -> anyhow::Result<Message> {
        self.serial += 1;
        let serial = self.serial;
        self.stream
            .write_all(&method_call(serial, member, body.as_ref()))?;
        loop {
            let message = self.next_message()?;
            if message.reply_serial != Some(serial) {
                continue;
            }
            match message.kind {
                METHOD_RETURN => return Ok(message),
                ERROR => bail!(
                    "{member} failed: {} {}",
                    message.error.unwrap_or_default(),
                    message.first_string.unwrap_or_default()
                ),
                _ => {}
            }
        }
    }

    fn next_message(&mut self) -> anyhow::Result<Message> {
        loop {
            if let Some(length) = message_length(&self.input)? {
                let message = parse(&self.input[..length])?;
                self.input.drain(..length);
                return Ok(message);
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0; 4096];
        let n = match self.stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("the bus sent nothing for {TRIAL_DEADLINE:?}")
            }
            Err(e) => return Err(e.into()),
        };
        ensure!(n > 0, "the bus closed the connection");
        self.input.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Marshals in little-endian, keeping alignment from the buffer's start.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn align(&mut self, to: usize) {
        while !self.0.len().is_multiple_of(to) {
            self.0.push(0);
        }
    }

    fn u32(&mut self, value: u32) {
        self.align(4);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn string(&mut self, value: &str) {
        self.u32(value.len() as u32);
        self.0.extend_from_slice(value.as_bytes());
        self.0.push(0);
    }

    fn signature(&mut self, value: &str) {
        self.0.push(value.len() as u8);
        self.0.extend_from_slice(value.as_bytes());
        self.0.push(0);
    }

    /// A header field: a `(yv)` struct holding a string-like value.
    fn field(&mut self, code: u8, kind: char, value: &str) {
        self.align(8);
        self.0.push(code);
        self.signature(&kind.to_string());
        match kind {
            'g' => self.signature(value),
            _ => self.string(value),
        }
    }
}

/// A method call to the bus itself, with an optional body (its signature
/// and bytes, marshalled from an 8-aligned start).
fn method_call(serial: u32, member: &str, body: Option<&(&str, Vec<u8>)>) -> Vec<u8> {
    let body_len = body.map_or(0, |(_, bytes)| bytes.len());
    let mut m = Writer::default();
    m.0.extend_from_slice(&[b'l', METHOD_CALL, 0, 1]);
    m.u32(body_len as u32);
    m.u32(serial);
    m.u32(0); // the header fields' length, filled in below
    m.field(FIELD_PATH, 'o', BUS_PATH);
    m.field(FIELD_DESTINATION, 's', BUS_NAME);
    m.field(FIELD_INTERFACE, 's', BUS_NAME);
    m.field(FIELD_MEMBER, 's', member);
    if let Some((signature, _)) = body {
        m.field(FIELD_SIGNATURE, 'g', signature);
    }
    let fields_len = (m.0.len() - 16) as u32;
    m.0[12..16].copy_from_slice(&fields_len.to_le_bytes());
    m.align(8);
    if let Some((_, bytes)) = body {
        m.0.extend_from_slice(bytes);
    }
    m.0
}

/// The whole length of the message at the start of `input`, once its
/// fixed header is in.
fn message_length(input: &[u8]) -> anyhow::Result<Option<usize>> {
    if input.len() < 16 {
        return Ok(None);
    }
    ensure!(
        input[0] == b'l',
        "a big-endian message; only little is read"
    );
    let body = u32_at(input, 4) as usize;
    let fields = u32_at(input, 12) as usize;
    let length = (16 + fields).next_multiple_of(8) + body;
    Ok((input.len() >= length).then_some(length))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Reads a message's header fields and the start of its body.
fn parse(bytes: &[u8]) -> anyhow::Result<Message> {
    let fields_end = 16 + u32_at(bytes, 12) as usize;
    let mut message = Message {
        kind: bytes[1],
        member: None,
        error: None,
        reply_serial: None,
        first_string: None,
        first_u32: None,
    };
    let mut signature = String::new();
    let mut r = Reader { bytes, at: 16 };
    while r.at < fields_end {
        r.align(8);
        let code = r.byte()?;
        let kind = r.signature()?;
        match kind.as_str() {
            "s" | "o" => {
                let value = r.string()?;
                match code {
                    FIELD_MEMBER => message.member = Some(value),
                    FIELD_ERROR_NAME => message.error = Some(value),
                    _ => {}
                }
            }
            "g" => {
                let value = r.signature()?;
                if code == FIELD_SIGNATURE {
                    signature = value;
                }
            }
            "u" => {
                let value = r.u32()?;
                if code == FIELD_REPLY_SERIAL {
                    message.reply_serial = Some(value);
                }
            }
            other => bail!("a header field of type {other:?}"),
        }
    }
    r.align(8);
    match signature.chars().next() {
        Some('s') => message.first_string = Some(r.string()?),
        Some('u') => message.first_u32 = Some(r.u32()?),
        _ => {}
    }
    Ok(message)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn align(&mut self, to: usize) {
        self.at = self.at.next_multiple_of(to);
    }

    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        let taken = self
            .bytes
            .get(self.at..self.at + n)
            .context("a message shorter than it says")?;
        self.at += n;
        Ok(taken)
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        self.align(4);
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn string(&mut self) -> anyhow::Result<String> {
        let len = self.u32()? as usize;
        let text = String::from_utf8(self.take(len)?.to_vec())?;
        self.take(1)?;
        Ok(text)
    }

    fn signature(&mut self) -> anyhow::Result<String> {
        let len = self.byte()? as usize;
        let text = String::from_utf8(self.take(len)?.to_vec())?;
        self.take(1)?;
        Ok(text)
    }
}

// ---------------------------------------------------------------------------
// The buses
// ---------------------------------------------------------------------------

/// Which bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DbusDaemon,
    DbusBroker,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::DbusDaemon => "dbus-daemon",
            Kind::DbusBroker => "dbus-broker",
        }
    }
}

/// A bus running for the bench, on `socket`; killed if dropped unstopped.
pub struct BusProcess {
    pub socket: PathBuf,
    running: Running,
}

enum Running {
    /// dbus-daemon itself, `--nofork`: killed when dropped.
    Daemon(Child),
    /// The bench's `dbus-broker` child in its own mount namespace, which
    /// stops the launcher (and so the broker) when its stdin closes.
    Broker(Helper),
}

impl BusProcess {
    /// Starts bus `kind` in `dir`, or says why it cannot run here: the
    /// bench then skips its rows rather than fail.
    pub async fn start(kind: Kind, dir: &Path) -> anyhow::Result<Result<BusProcess, String>> {
        if let Some(missing) = kind.missing_program() {
            return Ok(Err(format!(
                "{missing} is not on PATH (apt-get install -y dbus-daemon dbus-broker)"
            )));
        }
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("bus.sock");
        let config = dir.join("bus.conf");
        std::fs::write(&config, bus_config(&socket))?;
        let running = match kind {
            Kind::DbusDaemon => Running::Daemon(start_dbus_daemon(dir, &config).await?),
            Kind::DbusBroker => {
                if !rustix::process::geteuid().is_root() {
                    return Ok(Err(
                        "dbus-broker needs root here (a private mount namespace with a \
                         tmpfs on /run/systemd for its journal socket)"
                            .to_owned(),
                    ));
                }
                let helper = Helper::start_wrapped(
                    &["unshare", "-m", "--propagation", "private"],
                    "dbus-broker",
                    &[dir.as_os_str()],
                )
                .await
                .context("starting dbus-broker without systemd")?;
                Running::Broker(helper)
            }
        };
        let bus = BusProcess { socket, running };
        // Ready when a client gets through Hello (dbus-daemon prints its
        // address once it listens; the broker is started on first contact).
        let socket = bus.socket.clone();
        within(
            "the bus to answer Hello",
            tokio::task::spawn_blocking(move || Bus::connect(&socket)),
        )
        .await???;
        Ok(Ok(bus))
    }

    /// Stops the bus and waits until it has gone.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.running {
            Running::Daemon(mut child) => {
                child.start_kill()?;
                within("dbus-daemon to exit", child.wait()).await??;
            }
            Running::Broker(helper) => helper.finish().await?,
        }
        Ok(())
    }
}

impl Kind {
    /// The first program this bus needs that is not on `PATH`.
    fn missing_program(self) -> Option<&'static str> {
        let needed: &[&'static str] = match self {
            Kind::DbusDaemon => &["dbus-daemon"],
            Kind::DbusBroker => &[
                "dbus-broker",
                "dbus-broker-launch",
                "systemd-socket-activate",
                "unshare",
                "mount",
            ],
        };
        needed
            .iter()
            .copied()
            .find(|program| on_path(program).is_none())
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A session bus on `socket` that lets anyone own any name, for this
/// user only (EXTERNAL).
fn bus_config(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <!-- The spectator's one connection queues for a new name every trial:
       dbus-daemon's default of 512 names would end a run of more trials. -->
  <limit name="max_names_per_connection">1000000</limit>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}

/// `dbus-daemon --config-file C --nofork --print-address`, ready once it
/// prints its address. Its complaints go to a log in `dir`, quoted if it
/// does not start.
async fn start_dbus_daemon(dir: &Path, config: &Path) -> anyhow::Result<Child> {
    let log = dir.join("dbus-daemon.log");
    let mut command = Command::new("dbus-daemon");
    command
        .arg(format!("--config-file={}", config.display()))
        .arg("--nofork")
        .arg("--print-address")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true);
    // SAFETY: as in `launch_broker`: one async-signal-safe call.
    unsafe {
        // A bench stopped by a signal drops nothing; the bus goes with it.
        command.pre_exec(die_with_parent);
    }
    let mut child = command.spawn().context("starting dbus-daemon")?;
    let stdout = child.stdout.take().context("dbus-daemon's stdout")?;
    let address = within(
        "dbus-daemon to print its address",
        tokio::io::BufReader::new(stdout).lines().next_line(),
    )
    .await??;
    if address.is_none_or(|address| !address.starts_with("unix:")) {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("dbus-daemon did not start: {}", said.trim());
    }
    Ok(child)
}

// ---------------------------------------------------------------------------
// Child parts
// ---------------------------------------------------------------------------

/// The `dbus-owner` child: owns `name` on the bus at `socket`; a byte on
/// stdin closes its connection while it lives on.
pub fn own_name(
    socket: &str,
    name: &str,
    ready: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<Option<Bus>> {
    let mut bus = Bus::connect(Path::new(socket))?;
    let answer = bus.request_name(name)?;
    ensure!(
        answer == PRIMARY_OWNER,
        "the owner child is not the name's primary owner (RequestName said {answer})"
    );
    ready()?;
    Ok(Some(bus))
}

/// The `dbus-broker` child, run through `unshare -m` as root: mounts a
/// tmpfs on `/run/systemd` (private to this mount namespace), binds a
/// stand-in journal socket there that keeps what the launcher logs in
/// `dir/journal.log`, and starts `dbus-broker-launch` on a listening
/// socket passed in by `systemd-socket-activate`, as systemd would.
/// Returns the launcher, once the socket listens.
pub fn launch_broker(dir: &Path) -> anyhow::Result<std::process::Child> {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs", "/run/systemd"])
        .status()
        .context("running mount")?;
    ensure!(
        status.success(),
        "could not mount a tmpfs on /run/systemd ({status})"
    );
    std::fs::create_dir_all("/run/systemd/journal")?;
    let journal = UnixDatagram::bind("/run/systemd/journal/socket")?;
    let mut log = std::fs::File::create(dir.join("journal.log"))?;
    std::thread::spawn(move || {
        let mut datagram = vec![0; 64 * 1024];
        while let Ok(n) = journal.recv(&mut datagram) {
            // Journal fields are lines; one entry per line here.
            let entry: Vec<u8> = datagram[..n]
                .iter()
                .map(|&b| if b == b'\n' { b' ' } else { b })
                .collect();
            let _ = log.write_all(&entry).and_then(|()| log.write_all(b"\n"));
        }
    });

    let socket = dir.join("bus.sock");
    let mut launcher = std::process::Command::new("systemd-socket-activate");
    launcher
        .arg("-E")
        .arg(format!(
            "DBUS_SESSION_BUS_ADDRESS=unix:path={}",
            socket.display()
        ))
        .arg("-l")
        .arg(&socket)
        .arg("dbus-broker-launch")
        .arg("--config-file")
        .arg(dir.join("bus.conf"))
        .args(["--scope", "user"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure makes one system call,
    // prctl, which is async-signal-safe, and allocates nothing.
    unsafe {
        // If this child is killed before it can stop the launcher, the
        // launcher (and through it the broker) is stopped all the same.
        launcher.pre_exec(die_with_parent);
    }
    let mut launcher = launcher
        .spawn()
        .context("starting systemd-socket-activate")?;
    // It says so once the socket is bound and listening; what it says
    // afterwards goes to a log, so that the pipe never fills.
    let mut said = BufReader::new(launcher.stderr.take().context("its stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        if said.read_line(&mut line)? == 0 {
            let _ = launcher.wait();
            bail!("systemd-socket-activate exited before listening");
        }
        if line.starts_with("Listening on") {
            break;
        }
    }
    let mut rest = std::fs::File::create(dir.join("socket-activate.log"))?;
    std::thread::spawn(move || std::io::copy(&mut said, &mut rest));
    Ok(launcher)
}

/// Asks for SIGTERM when the parent goes: run between fork and exec.
fn die_with_parent() -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
}
