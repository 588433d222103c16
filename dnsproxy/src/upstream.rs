//! The upstream side over TCP, and where the upstreams come from.
//!
//! A TCP query (the client asked over TCP, usually after a truncated UDP
//! answer) goes upstream over its own marked connection, the client's bytes
//! unchanged; the answer's bytes come back. Each attempt has a timeout; a
//! failed attempt moves on to the next upstream, and the last one that
//! answered is tried first next time. UDP has its own multiplexed path
//! (`udp`).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Config, DnsError, metrics as m, sys};

/// Why one upstream attempt failed (the `reason` label).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the answer does not match the query")]
    Mismatch,
}

impl UpstreamError {
    fn label(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Io(_) => "io",
            UpstreamError::Mismatch => "mismatch",
        }
    }
}

#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    latency: Histogram,
}

/// The configured upstreams, in order of preference.
#[derive(Debug)]
pub(crate) struct Upstreams {
    list: Box<[Upstream]>,
    preferred: AtomicUsize,
    mark: u32,
    timeout: Duration,
}

impl Upstreams {
    pub(crate) fn new(addrs: &[SocketAddr], mark: u32, timeout: Duration) -> Self {
        let list = addrs
            .iter()
            .map(|&addr| Upstream {
                addr,
                latency: metrics::histogram!(m::UPSTREAM_DURATION, "upstream" => addr.to_string(), "transport" => "tcp"),
            })
            .collect();
        Upstreams { list, preferred: AtomicUsize::new(0), mark, timeout }
    }

    /// Sends `query` over TCP to the upstreams in turn until one answers it.
    /// `question` is the query's question section (to match the answer).
    pub(crate) async fn exchange(&self, query: &[u8], question: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let n = self.list.len();
        let start = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut last = UpstreamError::Timeout;
        for i in 0..n {
            let idx = (start + i) % n;
            let up = &self.list[idx];
            let began = Instant::now();
            let attempt = tokio::time::timeout(self.timeout, up.tcp(query, question, self.mark, self.timeout)).await;
            match attempt.unwrap_or(Err(UpstreamError::Timeout)) {
                Ok(answer) => {
                    up.latency.record(began.elapsed().as_secs_f64());
                    if idx != start {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    tracing::debug!(upstream = %up.addr, transport = "tcp", error = %e, "upstream attempt failed");
                    failure(up.addr, e.label()).increment(1);
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// The failure counter of `addr` for `reason` (`timeout`, `io`, `mismatch`,
/// `refused`), for both transports.
pub(crate) fn failure(addr: SocketAddr, reason: &'static str) -> Counter {
    // Failures are the slow path: the labelled macro is fine here.
    metrics::counter!(m::UPSTREAM_FAILURES, "upstream" => addr.to_string(), "reason" => reason)
}

impl Upstream {
    async fn tcp(&self, query: &[u8], question: &[u8], mark: u32, timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let mut stream = sys::tcp_connect(self.addr, None, mark, timeout).await?;
        let len = u16::try_from(query.len()).map_err(|_| UpstreamError::Mismatch)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        if query.len() < 2 || !answers(&query[..2], question, &buf) {
            return Err(UpstreamError::Mismatch);
        }
        Ok(buf)
    }
}

/// Whether `answer` is the response to the query with ID `id` and question
/// section `question`: same ID, QR set, and the same question (the name
/// compared without case, as resolvers using 0x20 randomisation expect), or
/// no question at all (some error replies).
pub(crate) fn answers(id: &[u8], question: &[u8], answer: &[u8]) -> bool {
    if answer.len() < 12 || answer[..2] != *id || answer[2] & 0x80 == 0 {
        return false;
    }
    let qdcount = u16::from_be_bytes([answer[4], answer[5]]);
    if qdcount == 0 {
        return true;
    }
    let Some(got) = answer.get(12..12 + question.len()) else { return false };
    let split = question.len().saturating_sub(4);
    got[..split].eq_ignore_ascii_case(&question[..split]) && got[split..] == question[split..]
}

/// The upstream list: from the config, or from `resolv.conf` read with
/// hickory-resolver's reader; never one of the proxy's own addresses.
pub fn resolve_upstreams(config: &Config, ours: &[SocketAddr]) -> Result<Vec<SocketAddr>, DnsError> {
    let listed =
        if config.upstreams.is_empty() { from_resolv_conf(&config.resolv_conf)? } else { config.upstreams.clone() };
    let mut chosen: Vec<SocketAddr> = Vec::with_capacity(listed.len());
    for addr in listed {
        if is_ours(addr, ours) {
            tracing::warn!(upstream = %addr, "skipping an upstream that is the DNS proxy itself");
        } else if !chosen.contains(&addr) {
            chosen.push(addr);
        }
    }
    if chosen.is_empty() {
        return Err(DnsError::NoUpstreams);
    }
    Ok(chosen)
}

/// systemd-resolved's stub: the real upstreams are in its own file.
const RESOLVED_STUB: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

fn from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let read = |p: &Path| -> Result<Vec<SocketAddr>, DnsError> {
        let data = std::fs::read(p).map_err(|source| DnsError::ResolvConf { path: p.into(), source: source.into() })?;
        let (config, _opts) = hickory_resolver::system_conf::parse_resolv_conf(data)
            .map_err(|source| DnsError::ResolvConf { path: p.into(), source: Box::new(source) })?;
        let mut addrs = Vec::new();
        for ns in config.name_servers() {
            for conn in &ns.connections {
                let addr = SocketAddr::new(ns.ip, conn.port);
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        Ok(addrs)
    };
    let addrs = read(path)?;
    let stub_only = !addrs.is_empty() && addrs.iter().all(|a| a.ip() == RESOLVED_STUB);
    if stub_only && Path::new(RESOLVED_UPSTREAMS).exists() {
        // Forwarding to the stub would loop: resolved's own queries are redirected back here.
        return read(Path::new(RESOLVED_UPSTREAMS));
    }
    Ok(addrs)
}

fn is_ours(upstream: SocketAddr, ours: &[SocketAddr]) -> bool {
    ours.iter().any(|l| {
        l.port() == upstream.port()
            && (l.ip() == upstream.ip() || (l.ip().is_unspecified() && upstream.ip().is_loopback()))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answer_matching() {
        // id 0x1234, RD, 1 question: "Ab." A IN
        let q = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'A', b'b', 0, 0, 1, 0, 1];
        let question = &q[12..];
        let mut a = q.to_vec();
        a[2] |= 0x80;
        let id = &q[..2];
        assert!(answers(id, question, &a));
        a[13] = b'a'; // 0x20 case change is fine
        assert!(answers(id, question, &a));
        a[17] = 28; // different type
        assert!(!answers(id, question, &a));
        a[17] = 1;
        a[1] = 0x35; // different id
        assert!(!answers(id, question, &a));
        a[1] = 0x34;
        a[2] &= 0x7f; // a query, not an answer
        assert!(!answers(id, question, &a));
        assert!(!answers(id, question, &a[..5]));
        let mut no_question = a[..12].to_vec();
        no_question[2] |= 0x80;
        no_question[5] = 0;
        assert!(answers(id, question, &no_question));
    }

    #[test]
    fn upstreams_from_resolv_conf_skip_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "search example.com\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver ::1\n")
            .unwrap();
        let config = Config { resolv_conf: path.clone(), ..Config::default() };
        let ours: SocketAddr = "0.0.0.0:53".parse().unwrap();
        let got = resolve_upstreams(&config, &[ours]).unwrap();
        assert_eq!(got, ["192.0.2.53:53".parse::<SocketAddr>().unwrap()]);

        let got = resolve_upstreams(&config, &["127.0.0.1:5353".parse().unwrap()]).unwrap();
        assert_eq!(got.len(), 3);

        std::fs::write(&path, "nameserver 127.0.0.1\n").unwrap();
        assert!(matches!(resolve_upstreams(&config, &[ours]), Err(DnsError::NoUpstreams)));
        let missing = Config { resolv_conf: dir.path().join("nope"), ..Config::default() };
        assert!(matches!(resolve_upstreams(&missing, &[]), Err(DnsError::ResolvConf { .. })));
    }

    #[test]
    fn configured_upstreams_win() {
        let config = Config { upstreams: vec!["192.0.2.1:53".parse().unwrap()], ..Config::default() };
        assert_eq!(resolve_upstreams(&config, &[]).unwrap(), config.upstreams);
    }
}
