//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer in front of
//! the proxy sends first on each connection to say whose connection it is.
//!
//! Behind a cloud or Kubernetes load balancer every agent would otherwise show the balancer's
//! address, and source balancing, per-source limits, the `client.keys` address check and the
//! session table would all see one client. With `proxy_protocol` on, a listener reads the
//! header before anything else and uses the address it carries as the client's address.
//!
//! Only senders in the listener's trusted networks may send it: a connection from anywhere
//! else is refused (anyone could claim any address), and so is a connection from a trusted
//! sender without a valid header.
//!
//! The parser is pure: [`next`] says how many more bytes to read (never more than the header
//! holds, so the first frame behind it stays in the socket) or returns the parsed header.
//! [`read_header`] is the thin I/O shell around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// The longest version 2 header accepted (16 fixed bytes and the announced length; real
/// headers with TLVs stay well under this).
pub const V2_MAX: usize = 16 + 1024;
/// Time a sender has to deliver the whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A version 1 line that does not follow the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    /// A version 2 header that does not follow the format.
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    /// Longer than [`V1_MAX`] or [`V2_MAX`].
    #[error("PROXY header too long")]
    TooLong,
    /// The stream ended inside the header.
    #[error("connection closed inside the PROXY header")]
    Truncated,
    /// Not complete within [`HEADER_TIMEOUT`].
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The sender is not in the listener's trusted networks.
    #[error("PROXY protocol sender {0} is not trusted (proxy_protocol_trusted)")]
    Untrusted(IpAddr),
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The original client (source) address; `None` for `UNKNOWN` (v1) and `LOCAL` or
    /// unspecified families (v2): the connection's own address is used then.
    pub source: Option<SocketAddr>,
    /// The address the client connected to, when carried.
    pub destination: Option<SocketAddr>,
    /// 1 or 2.
    pub version: u8,
}

/// What [`next`] found in the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read this many more bytes (at least 1), then call [`next`] again.
    More(usize),
    /// A complete header of `len` bytes.
    Done(Header, usize),
}

/// Parses the start of a connection: the bytes read so far, `buf`, were all asked for by
/// earlier calls (start with an empty `buf`).
///
/// # Errors
/// [`HeaderError`] as soon as the bytes cannot start a valid header.
pub fn next(buf: &[u8]) -> Result<Step, HeaderError> {
    if buf.len() < 5 {
        // Both versions start with 5 distinct bytes: "PROXY" and "\r\n\r\n\0".
        let want = 5 - buf.len();
        if !(b"PROXY".starts_with(buf) || V2_SIGNATURE.starts_with(buf)) {
            return Err(HeaderError::Missing);
        }
        return Ok(Step::More(want));
    }
    if buf.starts_with(b"PROXY") {
        return next_v1(buf);
    }
    if V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]) {
        return next_v2(buf);
    }
    Err(HeaderError::Missing)
}

fn next_v1(buf: &[u8]) -> Result<Step, HeaderError> {
    if !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::TooLong);
        }
        // A bare LF, or any byte that is not printable ASCII, cannot be part of the line.
        let last = buf[buf.len() - 1];
        if last != b'\r' && !(0x20..0x7f).contains(&last) {
            return Err(HeaderError::V1("not printable ASCII"));
        }
        if buf.len() >= 2 && buf[buf.len() - 2] == b'\r' {
            return Err(HeaderError::V1("CR not followed by LF"));
        }
        return Ok(Step::More(1));
    }
    let line =
        std::str::from_utf8(&buf[..buf.len() - 2]).map_err(|_| HeaderError::V1("not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = |source, destination| Header {
        source,
        destination,
        version: 1,
    };
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Step::Done(header(None, None), buf.len())),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v6 = *family == "TCP6";
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip = if v6 {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                } else {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                };
                ip.map_err(|_| HeaderError::V1("bad address"))
            };
            let port = |s: &str| -> Result<u16, HeaderError> {
                // Decimal without a sign or leading zeros, as the specification writes them.
                if s.is_empty()
                    || (s.len() > 1 && s.starts_with('0'))
                    || !s.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(HeaderError::V1("bad port"));
                }
                s.parse().map_err(|_| HeaderError::V1("bad port"))
            };
            let source = SocketAddr::new(ip(src)?, port(sport)?);
            let destination = SocketAddr::new(ip(dst)?, port(dport)?);
            Ok(Step::Done(
                header(Some(source), Some(destination)),
                buf.len(),
            ))
        }
        ["PROXY", "TCP4" | "TCP6", ..] => Err(HeaderError::V1("wrong number of fields")),
        _ => Err(HeaderError::V1("unknown protocol family")),
    }
}

fn next_v2(buf: &[u8]) -> Result<Step, HeaderError> {
    if buf.len() < 16 {
        return Ok(Step::More(16 - buf.len()));
    }
    if buf[..12] != V2_SIGNATURE {
        return Err(HeaderError::Missing);
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err(HeaderError::V2("version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_MAX {
        return Err(HeaderError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(Step::More(16 + len - buf.len()));
    }
    let body = &buf[16..16 + len];
    let header = |source, destination| Header {
        source,
        destination,
        version: 2,
    };
    match command {
        // LOCAL: the balancer's own connection (health checks); no client address.
        0x0 => return Ok(Step::Done(header(None, None), 16 + len)),
        0x1 => {}
        _ => return Err(HeaderError::V2("unknown command")),
    }
    let family = buf[13] >> 4;
    let transport = buf[13] & 0x0f;
    if transport > 2 {
        return Err(HeaderError::V2("unknown transport"));
    }
    let (source, destination) = match family {
        0x0 => (None, None),
        0x1 => {
            let a = body
                .get(..12)
                .ok_or(HeaderError::V2("IPv4 addresses truncated"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        0x2 => {
            let a = body
                .get(..36)
                .ok_or(HeaderError::V2("IPv6 addresses truncated"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        // AF_UNIX: no network address to use.
        0x3 => (None, None),
        _ => return Err(HeaderError::V2("unknown address family")),
    };
    Ok(Step::Done(header(source, destination), 16 + len))
}

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Every IPv4 and every IPv6 address.
    pub const ANY: [Cidr; 2] = [
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
        },
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix: 0,
        },
    ];

    /// Whether `ip` is in the network (an IPv4 address seen as `::ffff:a.b.c.d` counts as
    /// IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A listener's PROXY protocol setting: who may send the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Networks allowed to send the header; connections from anywhere else are refused.
    pub trusted: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether `ip` may send a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Reads the header at the start of `stream` (nothing after it), from a trusted sender,
    /// and returns the client address to use: the carried source, or `peer` when the header
    /// carries none (`UNKNOWN`, `LOCAL`).
    ///
    /// # Errors
    /// [`HeaderError`]: the caller closes the connection.
    pub async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, HeaderError> {
        if !self.trusts(peer.ip()) {
            return Err(HeaderError::Untrusted(peer.ip()));
        }
        let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(stream))
            .await
            .map_err(|_| HeaderError::Timeout(HEADER_TIMEOUT))??;
        Ok(header.source.unwrap_or(peer))
    }
}

impl ProxyProtocol {
    /// Reads the header of an accepted connection, then runs `serve` with the client's
    /// address; a connection without a valid header from a trusted sender is closed, counted
    /// (`proxy_protocol`) and logged (at most once a second per process).
    pub async fn then<F, Fut>(
        self,
        mut stream: TcpStream,
        peer: SocketAddr,
        stats: std::sync::Arc<crate::stats::RelayStats>,
        listener: String,
        serve: F,
    ) where
        F: FnOnce(TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        match self.accept(&mut stream, peer).await {
            Ok(client) => serve(stream, client).await,
            Err(e) => {
                stats
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats.reject(crate::stats::Rejection::ProxyProtocol);
                if log_allowed() {
                    tracing::warn!(listener, client = %peer, "closing connection: {e}");
                }
            }
        }
    }
}

/// One refusal log line per second per process: a flood must not become a log flood.
fn log_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(u64::MAX);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.swap(now, Ordering::Relaxed) != now
}

/// Reads one header from `stream`, never past its end.
///
/// # Errors
/// [`HeaderError`] when the bytes are not a valid header or the stream ends.
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, HeaderError> {
    let mut buf = Vec::with_capacity(108);
    loop {
        match next(&buf)? {
            Step::Done(h, _) => return Ok(h),
            Step::More(n) => {
                let at = buf.len();
                buf.resize(at + n, 0);
                match stream.read_exact(&mut buf[at..]).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(HeaderError::Truncated)
                    }
                    Err(e) => return Err(HeaderError::Io(e.to_string())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` the way the reader does: only what `next` asks for.
    fn parse(bytes: &[u8]) -> Result<(Header, usize), HeaderError> {
        let mut at = 0;
        loop {
            match next(&bytes[..at])? {
                Step::Done(h, n) => return Ok((h, n)),
                Step::More(n) => {
                    if at + n > bytes.len() {
                        return Err(HeaderError::Truncated);
                    }
                    at += n;
                }
            }
        }
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 198.18.0.7 10.0.0.1 40001 1514\r\n";
        let mut bytes = line.to_vec();
        bytes.extend_from_slice(b"\x10\x00\x00\x00!001!#AES:");
        let (h, n) = parse(&bytes).unwrap();
        assert_eq!(n, line.len(), "stops at the end of the line");
        assert_eq!(h.source, Some("198.18.0.7:40001".parse().unwrap()));
        assert_eq!(h.destination, Some("10.0.0.1:1514".parse().unwrap()));
        assert_eq!(h.version, 1);
        let (h, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 1514\r\n").unwrap();
        assert_eq!(h.source, Some("[2001:db8::7]:40001".parse().unwrap()));
        let (h, n) = parse(b"PROXY UNKNOWN\r\n").unwrap();
        assert_eq!((h.source, n), (None, 15));
        let (h, _) = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap();
        assert_eq!(h.source, None);
    }

    #[test]
    fn v1_errors() {
        for (bad, want) in [
            (&b"PROXY TCP4 198.18.0.7 10.0.0.1 40001\r\n"[..], "fields"),
            (b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n", "address"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "family"),
            (b"PROXY TCP4 1.2.3.4\n", "printable"),
            (b"PROXY TCP4 1.2.3.4\rx", "CR"),
            (b"PROXY TCP4 1.2.3.4 \xff", "printable"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 200]].concat();
        assert_eq!(parse(&long).unwrap_err(), HeaderError::TooLong);
        assert_eq!(
            parse(b"PROXY TCP4 1.2").unwrap_err(),
            HeaderError::Truncated
        );
    }

    #[test]
    fn not_a_header() {
        for bad in [
            &b"\x10\x00\x00\x00!001!"[..],
            b"GET / HTTP/1.1\r\n",
            b"PROXX",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\0",
        ] {
            assert_eq!(parse(bad).unwrap_err(), HeaderError::Missing, "{bad:?}");
        }
        // Refused at the first byte that cannot start a header: nothing more is read.
        assert_eq!(next(b"\x10").unwrap_err(), HeaderError::Missing);
    }

    #[test]
    fn v2_ipv4_ipv6_local_unspec_and_tlvs() {
        let mut body = vec![198, 18, 0, 7, 10, 0, 0, 1];
        body.extend_from_slice(&40001u16.to_be_bytes());
        body.extend_from_slice(&1514u16.to_be_bytes());
        // A TLV (PP2_TYPE_AUTHORITY "x") after the addresses is skipped.
        body.extend_from_slice(&[0x02, 0x00, 0x01, b'x']);
        let mut bytes = v2(1, 0x11, &body);
        let len = bytes.len();
        bytes.extend_from_slice(b"\x10\x00\x00\x00");
        let (h, n) = parse(&bytes).unwrap();
        assert_eq!(n, len);
        assert_eq!(h.source, Some("198.18.0.7:40001".parse().unwrap()));
        assert_eq!(h.destination, Some("10.0.0.1:1514".parse().unwrap()));
        assert_eq!(h.version, 2);

        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0x9c, 0x41, 0x05, 0xea]);
        let (h, _) = parse(&v2(1, 0x21, &body)).unwrap();
        assert_eq!(h.source, Some("[2001:db8::7]:40001".parse().unwrap()));

        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().0.source, None, "LOCAL");
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().0.source, None, "UNSPEC");
        assert_eq!(
            parse(&v2(0, 0x11, &[0; 12])).unwrap().0.source,
            None,
            "LOCAL ignores addresses"
        );
    }

    #[test]
    fn v2_errors() {
        let e = |b: &[u8]| parse(b).unwrap_err();
        assert!(matches!(e(&v2(1, 0x11, &[0; 11])), HeaderError::V2(m) if m.contains("truncated")));
        assert!(matches!(e(&v2(1, 0x21, &[0; 35])), HeaderError::V2(m) if m.contains("truncated")));
        assert!(matches!(e(&v2(2, 0x11, &[0; 12])), HeaderError::V2(m) if m.contains("command")));
        assert!(matches!(e(&v2(1, 0x41, &[0; 12])), HeaderError::V2(m) if m.contains("family")));
        assert!(matches!(e(&v2(1, 0x13, &[0; 12])), HeaderError::V2(m) if m.contains("transport")));
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(matches!(e(&wrong_version), HeaderError::V2(m) if m.contains("version")));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(e(&huge), HeaderError::TooLong);
        assert_eq!(e(&v2(1, 0x11, &[0; 12])[..20]), HeaderError::Truncated);
    }

    #[test]
    fn networks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        assert!("::/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
    }
}
