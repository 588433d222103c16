//! What the client's first bytes say about where it is going: the TLS SNI
//! (rustls' `Acceptor` on the bytes read so far; no crypto provider, nothing
//! decrypted) or the HTTP Host header (`httparse`). Pure functions of bytes.

use sluice_policy::{Hostname, SniffSource, Sniffed};

/// Bytes sniffing may read before giving up on a name.
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;

/// Reads sniffing may take before giving up on a name. A ClientHello or a
/// request head comes in a segment or a few; each read parses everything
/// read so far again, so a client trickling its bytes one at a time would
/// cost a parse of the whole buffer per byte (quadratic in the bytes read
/// within the sniff deadline) — past this many reads the stream is judged
/// opaque.
pub const MAX_SNIFF_READS: usize = 64;

/// The protocol the first bytes belong to, as far as sniffing can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// More bytes are needed to decide.
    NeedMore,
    /// A TLS ClientHello; `name` is its SNI (None: no SNI, or not a valid host name).
    Tls { name: Option<Hostname> },
    /// An HTTP/1.x request head; `name` is its Host (None: absent or invalid).
    Http { name: Option<Hostname> },
    /// Neither TLS nor HTTP (or malformed): an opaque stream.
    Opaque,
}

impl Sniff {
    pub fn sniffed(&self) -> Option<Sniffed> {
        match self {
            Sniff::Tls { name: Some(n) } => Some(Sniffed { name: n.clone(), via: SniffSource::TlsSni }),
            Sniff::Http { name: Some(n) } => Some(Sniffed { name: n.clone(), via: SniffSource::HttpHost }),
            _ => None,
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self, Sniff::Http { .. })
    }

    /// Whether reading more bytes could still change the answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, Sniff::NeedMore)
    }
}

/// Classifies the bytes a client has sent so far. Never panics, whatever
/// the bytes; at [`MAX_SNIFF_BYTES`] an undecided stream is opaque.
pub fn sniff(buf: &[u8]) -> Sniff {
    let Some(&first) = buf.first() else { return Sniff::NeedMore };
    let verdict = if first == 0x16 { tls(buf) } else { http(buf) };
    match verdict {
        Sniff::NeedMore if buf.len() >= MAX_SNIFF_BYTES => Sniff::Opaque,
        v => v,
    }
}

fn tls(buf: &[u8]) -> Sniff {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    // read_tls takes at most one record per call; a ClientHello may span several.
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(None) => Sniff::NeedMore,
        Ok(Some(accepted)) => {
            let name = accepted.client_hello().server_name().and_then(|n| Hostname::parse(n).ok());
            Sniff::Tls { name }
        }
        Err(_) => Sniff::Opaque,
    }
}

fn http(buf: &[u8]) -> Sniff {
    // A request line starts with an upper-case method token; anything else
    // is not HTTP/1.x, and saying so early keeps opaque protocols moving.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len < 16 { Sniff::NeedMore } else { Sniff::Opaque };
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return Sniff::Opaque;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Sniff::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value);
            let name = host.and_then(|v| std::str::from_utf8(v).ok()).and_then(host_of_authority);
            Sniff::Http { name }
        }
        // Too many headers: it is HTTP, we just cannot see the Host.
        Err(httparse::Error::TooManyHeaders) => Sniff::Http { name: None },
        Err(_) => Sniff::Opaque,
    }
}

/// `example.com:8080` → `example.com`; an IP literal (`[::1]:80`, `1.2.3.4`) is no name.
fn host_of_authority(authority: &str) -> Option<Hostname> {
    let a = authority.trim();
    if a.starts_with('[') {
        return None;
    }
    let host = match a.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Hostname::parse(host).ok()
}

#[cfg(test)]
mod tests;
