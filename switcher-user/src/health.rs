//! Backend health checks: a TCP connect, or an HTTP/1.0 `GET` with an expected status, with
//! rise/fall thresholds so one lost probe does not flap a backend.
//!
//! A probe that fails for want of the load balancer's own resources (file descriptors,
//! socket buffers, memory, local ports) says nothing about the backend: it is a
//! [`Failure::Local`], which leaves the backend's state as it was — it never takes a backend
//! down, so it never causes a failover or an automatic rollback.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    config::{CheckKind, HealthConfig},
    protocol::Health,
};

/// A backend's check history.
#[derive(Clone, Debug)]
pub struct BackendHealth {
    pub state: Health,
    successes: u32,
    failures: u32,
    /// Why the last probe failed.
    pub last_error: Option<String>,
    /// When `state` last changed.
    pub since: Instant,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth { state: Health::Unknown, successes: 0, failures: 0, last_error: None, since: Instant::now() }
    }
}

impl BackendHealth {
    /// Adds a probe result; returns whether the state changed. The first result decides an
    /// unknown backend at once; after that `rise` successes or `fall` failures in a row do.
    pub fn record(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> bool {
        let before = self.state;
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                if self.state == Health::Unknown || (self.state == Health::Down && self.successes >= rise) {
                    self.state = Health::Up;
                }
            }
            Err(e) => {
                self.failures += 1;
                self.successes = 0;
                self.last_error = Some(e);
                if self.state == Health::Unknown || (self.state == Health::Up && self.failures >= fall) {
                    self.state = Health::Down;
                }
            }
        }
        if self.state != before {
            self.since = Instant::now();
        }
        self.state != before
    }

    /// One line for status and refusals.
    #[must_use]
    pub fn describe(&self) -> String {
        let secs = self.since.elapsed().as_secs();
        match (self.state, &self.last_error) {
            (Health::Down, Some(e)) => format!("down for {secs}s: {e}"),
            (state, _) => format!("{} for {secs}s", state.as_str()),
        }
    }
}

/// Why a probe did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend failed the check (refused, timed out, wrong answer).
    Backend(String),
    /// The probe could not run here (no free file descriptor, buffer, memory or local port,
    /// or the probe task failed): the backend's health is unknown this round.
    Local(String),
}

impl Failure {
    /// Classifies an I/O error of a probe: the load balancer's own resource limits are local.
    fn io(what: String, e: &std::io::Error) -> Failure {
        let text = format!("{what}: {e}");
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL) => {
                Failure::Local(text)
            }
            _ => Failure::Backend(text),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Backend(e) => f.write_str(e),
            Failure::Local(e) => write!(f, "probe could not run on this node: {e}"),
        }
    }
}

/// Probes one backend once.
///
/// # Errors
/// Why the backend is not healthy, for the operator; or why the probe could not run.
pub async fn probe(check: &HealthConfig, backend: SocketAddr) -> Result<(), Failure> {
    let addr = SocketAddr::new(backend.ip(), check.port.unwrap_or(backend.port()));
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| Failure::io(format!("connect {addr}"), &e))?;
        if check.check != CheckKind::Http {
            return Ok(());
        }
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let req = format!("GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: switcher-health\r\n\r\n", check.path);
        stream.write_all(req.as_bytes()).await.map_err(|e| Failure::io(format!("send to {addr}"), &e))?;
        let mut buf = vec![0u8; 256];
        let mut n = 0;
        // Enough for the status line; bounded by the buffer and the timeout.
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            let got = stream.read(&mut buf[n..]).await.map_err(|e| Failure::io(format!("read from {addr}"), &e))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        let status = status_code(&line).ok_or_else(|| {
            Failure::Backend(format!("{addr} did not answer HTTP: {:?}", line.lines().next().unwrap_or("")))
        })?;
        if status == check.expect_status {
            Ok(())
        } else {
            Err(Failure::Backend(format!(
                "GET {} on {addr} answered {status}, expected {}",
                check.path, check.expect_status
            )))
        }
    };
    match tokio::time::timeout(check.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Backend(format!("no answer from {addr} within {} ms", check.timeout.as_millis()))),
    }
}

/// The status code of an HTTP status line.
fn status_code(text: &str) -> Option<u16> {
    let mut parts = text.lines().next()?.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// How long the checker sleeps between rounds of a service.
#[must_use]
pub fn interval(check: &HealthConfig) -> Duration {
    check.interval
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{HealthConfig, Protocol};

    #[test]
    fn rise_and_fall_thresholds() {
        let mut h = BackendHealth::default();
        assert!(h.record(Ok(()), 2, 3), "the first result decides");
        assert_eq!(h.state, Health::Up);
        assert!(!h.record(Err("x".into()), 2, 3));
        assert!(!h.record(Err("x".into()), 2, 3));
        assert!(h.record(Err("refused".into()), 2, 3), "third failure takes it down");
        assert_eq!(h.state, Health::Down);
        assert!(h.describe().contains("refused"));
        assert!(!h.record(Ok(()), 2, 3));
        assert!(h.record(Ok(()), 2, 3), "second success brings it up");
        let mut u = BackendHealth::default();
        assert!(u.record(Err("e".into()), 2, 3));
        assert_eq!(u.state, Health::Down);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_code("HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(""), None);
    }

    async fn http_server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let mut check = HealthConfig::default_for(Protocol::Tcp);
        check.timeout = Duration::from_millis(500);
        let ok = http_server("HTTP/1.0 200 OK\r\n\r\n").await;
        assert_eq!(probe(&check, ok).await, Ok(()));
        check.check = CheckKind::Http;
        assert_eq!(probe(&check, ok).await, Ok(()));
        let bad = http_server("HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
        let e = probe(&check, bad).await.expect_err("503");
        assert!(matches!(&e, Failure::Backend(m) if m.contains("answered 503, expected 200")), "{e}");
        // A port nothing listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let e = probe(&check, closed).await.expect_err("closed");
        assert!(matches!(&e, Failure::Backend(m) if m.contains("connect")), "{e}");
    }

    #[test]
    fn running_out_of_local_resources_is_not_a_backend_failure() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EADDRNOTAVAIL] {
            let f = Failure::io("connect 198.51.100.2:8080".into(), &std::io::Error::from_raw_os_error(errno));
            assert!(matches!(f, Failure::Local(_)), "errno {errno}: {f:?}");
            assert!(f.to_string().starts_with("probe could not run on this node"), "{f}");
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH, libc::ECONNRESET] {
            let f = Failure::io("connect 198.51.100.2:8080".into(), &std::io::Error::from_raw_os_error(errno));
            assert!(matches!(f, Failure::Backend(_)), "errno {errno}: {f:?}");
        }
    }
}
