//! Framing of the control socket's lines (a request and its deadline), their parsing, and
//! the blocking client the CLI talks to the daemon with.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Request, Response};

/// Largest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long either side waits for the other; a client's request must be applied within it.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than [`TIMEOUT`] a client waits for the answer of a request the daemon may
/// still apply just before the deadline.
pub const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// A time on `CLOCK_MONOTONIC` (the same for every process of the machine), in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub u64);

impl Deadline {
    /// `after` from now.
    #[must_use]
    pub fn after(after: Duration) -> Deadline {
        Deadline(monotonic_ms().saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)))
    }

    /// Whether the client has stopped waiting.
    #[must_use]
    pub fn passed(self) -> bool {
        monotonic_ms() >= self.0
    }

    /// How long until the client stops waiting (zero once it has).
    #[must_use]
    pub fn remaining(self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(monotonic_ms()))
    }
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid pointer; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000 + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// The answer to a request whose deadline passed before the daemon could apply it.
#[must_use]
pub fn too_late() -> Response {
    Response::error(
        "the request reached its deadline before the daemon could apply it (the client has stopped waiting); nothing was changed: check `switcher status` and try again",
    )
}

/// Errors of talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the switcher daemon is not running (nothing listens on {}); start it with `switcher daemon --config FILE`, or pass --socket if it uses another path", socket.display())]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is {kind}, not the daemon's control socket: pass --socket with the socket's path (the daemon's config names it: `socket = ...`)", socket.display())]
    NotASocket { socket: PathBuf, kind: &'static str },
    #[error("permission denied on {}: run as root or as a member of the socket's group", socket.display())]
    Denied {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talk to the daemon on {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent an answer this client does not understand")]
    BadAnswer(#[source] serde_json::Error),
}

/// What is at `path` if it is there and is no socket (a wrong `--socket`), else `None`.
fn not_a_socket(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt as _;
    let t = std::fs::metadata(path).ok()?.file_type();
    if t.is_socket() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_file() {
        Some("a regular file")
    } else {
        Some("not a socket")
    }
}

/// Sends one request and waits for the answer (blocking; for the CLI).
///
/// # Errors
/// [`ClientError`] saying whether the daemon is down, the socket is not ours, or the answer
/// was unreadable.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io { socket: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => match not_a_socket(socket) {
            Some(kind) => ClientError::NotASocket { socket: socket.to_owned(), kind },
            None => ClientError::NotRunning { socket: socket.to_owned(), source },
        },
        std::io::ErrorKind::PermissionDenied => ClientError::Denied { socket: socket.to_owned(), source },
        _ => ClientError::Io { socket: socket.to_owned(), source },
    })?;
    stream.set_read_timeout(Some(TIMEOUT + ANSWER_GRACE)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = request_line(req, Some(Deadline::after(TIMEOUT))).map_err(ClientError::BadAnswer)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream.take(16 * 1024 * 1024)).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(ClientError::BadAnswer)
}

/// The wire form of a request with its deadline (without the newline).
///
/// # Errors
/// Serialisation failed (it does not, for these types).
pub fn request_line(req: &Request, deadline: Option<Deadline>) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(req)?;
    if let (Some(d), Some(map)) = (deadline, value.as_object_mut()) {
        map.insert(DEADLINE_KEY.into(), d.0.into());
    }
    serde_json::to_vec(&value)
}

const DEADLINE_KEY: &str = "deadline_ms";

/// Parses one request line, or says what is wrong with it.
///
/// # Errors
/// A message for the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    parse_request_line(line).map(|(req, _)| req)
}

/// Parses one request line and its deadline, if it has one.
///
/// # Errors
/// A message for the client.
pub fn parse_request_line(line: &[u8]) -> Result<(Request, Option<Deadline>), String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    let malformed = |e: serde_json::Error| format!("malformed request: {e}");
    let mut value: serde_json::Value = serde_json::from_slice(line).map_err(malformed)?;
    let deadline = match value.as_object_mut().and_then(|m| m.remove(DEADLINE_KEY)) {
        None => None,
        Some(d) => Some(Deadline(d.as_u64().ok_or_else(|| {
            format!("malformed request: {DEADLINE_KEY} must be a CLOCK_MONOTONIC time in milliseconds")
        })?)),
    };
    Ok((serde_json::from_value(value).map_err(malformed)?, deadline))
}
