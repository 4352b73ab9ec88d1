//! A lean HTTP/1.1 client for rest-hook: one POST and its answer on a kept-alive
//! connection, written and read by the send task that waits for it.
//!
//! Why not reqwest for every send: with 100 subscriptions on one receiver, reqwest's stack
//! (its tower layers, hyper's connection task with two channel hops and wake-ups per
//! request, the endpoint parsed three times) was most of the daemon's CPU per notification
//! (docs/performance.md). Here a request is one buffer written with one syscall and its
//! answer is parsed with `httparse` in place. reqwest stays for what this client does not
//! do: client certificates (`endpoint_auth` mTLS routes), proxies from the environment, and
//! endpoints with credentials in the URL.

use bytes::BytesMut;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::private::{is_private_ip, PrivateAddress};
use super::SendError;
use wire::{exchange, write_head, Failure};

mod wire;

/// An answer's body is read (and dropped) only to reuse its connection; a longer one
/// closes the connection instead.
const BODY_CAP: u64 = 1 << 20;
/// A response head longer than this is not HTTP a webhook receiver sends.
const HEAD_CAP: usize = 64 << 10;
/// An idle connection older than this is closed rather than reused (reqwest kept them
/// 90 s). One the server closed meanwhile is seen before reuse (it is readable), and one it
/// closes just as the request goes out is retried on a new connection.
const IDLE_FOR: Duration = Duration::from_secs(30);
/// Parsed endpoints kept; more subscriptions than this parse their endpoint per send.
const TARGETS_KEPT: usize = 16_384;

/// Where connections go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    tls: bool,
    /// The host as DNS and TLS know it (an IPv6 literal without brackets).
    host: String,
    port: u16,
}

/// An endpoint URL, parsed once.
#[derive(Debug)]
pub(crate) struct Target {
    origin: Origin,
    /// `Host:` as the URL spells it (an IPv6 literal in brackets, the port when not the
    /// scheme's).
    host_header: String,
    /// Path and query.
    path: String,
    /// The host, when the URL gives it as an IP literal: the private-address rule checks it
    /// before any connection, without parsing the URL again.
    literal: Option<IpAddr>,
}

impl Target {
    /// `None` for what this client leaves to reqwest: URLs with credentials in them.
    fn parse(endpoint: &str) -> Result<Option<Target>, SendError> {
        let url = url::Url::parse(endpoint).map_err(|e| SendError::Refused(e.to_string()))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            s => return Err(SendError::Refused(format!("scheme {s} is not http(s)"))),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Ok(None);
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(SendError::Refused("the endpoint has no host".into())),
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let name = url.host_str().unwrap_or(&host);
        let host_header = match url.port() {
            Some(p) => format!("{name}:{p}"),
            None => name.to_string(),
        };
        let literal = literal(&url);
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Some(Target {
            origin: Origin { tls, host, port },
            host_header,
            path,
            literal,
        }))
    }

    pub(crate) fn literal(&self) -> Option<IpAddr> {
        self.literal
    }
}

/// The URL's host when it is an IP literal.
pub(crate) fn literal(url: &url::Url) -> Option<IpAddr> {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// One POST: the target, its headers beyond the client's own, its body.
pub(crate) struct Post<'a> {
    pub(crate) target: &'a Target,
    pub(crate) content_type: &'a str,
    pub(crate) headers: &'a [(String, String)],
    pub(crate) body: &'a [u8],
}

/// The final answer's status and its `Retry-After`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<String>,
}

/// Kept-alive connections per origin, and the TLS settings new ones use.
pub(crate) struct Http1 {
    idle: Mutex<Idle>,
    max_idle: usize,
    /// [`IDLE_FOR`]; shorter in tests.
    idle_for: Duration,
    allow_private: bool,
    targets: Mutex<HashMap<String, Arc<Target>>>,
    tls: OnceLock<Result<tokio_rustls::TlsConnector, String>>,
}

impl Http1 {
    /// `max_idle`: connections kept per origin between sends.
    pub(crate) fn new(allow_private: bool, max_idle: usize) -> Self {
        Http1 {
            idle: Mutex::new(Idle {
                by_origin: HashMap::new(),
                swept: Instant::now(),
            }),
            max_idle,
            idle_for: IDLE_FOR,
            allow_private,
            targets: Mutex::default(),
            tls: OnceLock::new(),
        }
    }

    /// The same, also trusting `root` (tests: a CA of their own).
    #[cfg(test)]
    fn trusting(allow_private: bool, root: rustls::pki_types::CertificateDer<'static>) -> Self {
        let http = Self::new(allow_private, 8);
        let _ = http.tls.set(connector_trusting(vec![root]));
        http
    }

    /// The parsed endpoint, `None` when reqwest must send to it.
    pub(crate) fn target(&self, endpoint: &str) -> Result<Option<Arc<Target>>, SendError> {
        let mut kept = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = kept.get(endpoint) {
            return Ok(Some(t.clone()));
        }
        let Some(t) = Target::parse(endpoint)? else {
            return Ok(None);
        };
        let t = Arc::new(t);
        if kept.len() >= TARGETS_KEPT {
            kept.clear();
        }
        kept.insert(endpoint.to_string(), t.clone());
        Ok(Some(t))
    }

    /// Sends `post` and reads the answer. A kept-alive connection the server closed before
    /// answering (nothing came back) is retried once on a new connection: the server did
    /// not take the request. The caller bounds the whole exchange with its timeout.
    pub(crate) async fn post(&self, post: &Post<'_>) -> Result<Answer, SendError> {
        let mut head = Vec::with_capacity(256 + post.body.len());
        write_head(&mut head, post)?;
        head.extend_from_slice(post.body);
        let origin = &post.target.origin;
        let mut conn = match self.take_idle(origin) {
            Some(c) => c,
            None => self.connect(origin).await?,
        };
        let answer = match exchange(&mut conn, &head).await {
            Err(Failure::Stale(_)) if conn.reused => {
                conn = self.connect(origin).await?;
                exchange(&mut conn, &head).await
            }
            other => other,
        };
        match answer {
            Ok((answer, keep)) => {
                if keep {
                    self.put_idle(origin, conn);
                }
                Ok(answer)
            }
            Err(Failure::Stale(e) | Failure::Io(e)) => Err(SendError::Other(e)),
            Err(Failure::Protocol(e)) => Err(SendError::Other(format!("bad HTTP answer: {e}"))),
        }
    }

    fn take_idle(&self, origin: &Origin) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.by_origin.get_mut(origin)?;
        while let Some(mut c) = list.pop() {
            if c.usable(self.idle_for) {
                c.reused = true;
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, origin: &Origin, mut conn: Conn) {
        conn.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.swept.elapsed() >= self.idle_for / 2 {
            idle.sweep(self.idle_for);
        }
        let list = idle.by_origin.entry(origin.clone()).or_default();
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// Idle connections kept, over all origins.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.by_origin.values().map(Vec::len).sum()
    }

    async fn connect(&self, o: &Origin) -> Result<Conn, SendError> {
        let tcp = self.tcp(o).await?;
        let io = if o.tls {
            let tls = self
                .tls
                .get_or_init(tls_connector)
                .as_ref()
                .map_err(|e| SendError::Connect(e.clone()))?;
            let name = rustls::pki_types::ServerName::try_from(o.host.clone())
                .map_err(|e| SendError::Refused(format!("{}: {e}", o.host)))?;
            let s = tls
                .connect(name, tcp)
                .await
                .map_err(|e| SendError::Connect(format!("TLS with {}: {e}", o.host)))?;
            Io::Tls(Box::new(s))
        } else {
            Io::Tcp(tcp)
        };
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(4096),
            since: Instant::now(),
            reused: false,
        })
    }

    /// A TCP connection to the first address of `o` that answers; only public addresses
    /// unless private endpoints are allowed (checked on what the name resolves to now).
    async fn tcp(&self, o: &Origin) -> Result<TcpStream, SendError> {
        let found = tokio::net::lookup_host((o.host.as_str(), o.port))
            .await
            .map_err(|e| SendError::Connect(format!("{}: {e}", o.host)))?;
        let addrs: Vec<SocketAddr> = found
            .filter(|a| self.allow_private || !is_private_ip(a.ip()))
            .collect();
        if addrs.is_empty() {
            let why = PrivateAddress(o.host.clone()).to_string();
            return Err(SendError::Refused(why));
        }
        let mut last = String::new();
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    // The request is one write; no reason to hold back its last segment.
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        Err(SendError::Connect(last))
    }
}

/// The system's trust store, as reqwest uses it (rustls-platform-verifier).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    connector_trusting(Vec::new())
}

/// The system's trust store and `extra` roots.
fn connector_trusting(
    extra: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match extra.is_empty() {
        true => rustls_platform_verifier::Verifier::new(provider.clone()),
        false => rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone()),
    }
    .map_err(|e| format!("the system's trust store: {e}"))?;
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(c)))
}

/// Idle connections by origin. The most recently used is taken first, so the others age;
/// a sweep, at most every half [`IDLE_FOR`] when a connection is put back, closes the aged
/// and the closed ones of every origin: with many receivers, those no longer sent to would
/// otherwise keep their sockets open for the life of the process.
struct Idle {
    by_origin: HashMap<Origin, Vec<Conn>>,
    swept: Instant,
}

impl Idle {
    fn sweep(&mut self, idle_for: Duration) {
        for list in self.by_origin.values_mut() {
            list.retain(|c| c.usable(idle_for));
        }
        self.by_origin.retain(|_, list| !list.is_empty());
        self.swept = Instant::now();
    }
}

/// A connection and what was read on it beyond the last answer.
struct Conn {
    io: Io,
    buf: BytesMut,
    /// When it was last put back (or opened).
    since: Instant,
    /// It carried a request before.
    reused: bool,
}

impl Conn {
    /// Not idle too long, and nothing arrived on it meanwhile.
    fn usable(&self, idle_for: Duration) -> bool {
        self.since.elapsed() < idle_for && !self.io.readable_now()
    }
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Tcp(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }

    /// Something arrived on an idle connection: the server closed it (EOF, a TLS
    /// close_notify) or sent what no request asked for. Either way it is not reused.
    fn readable_now(&self) -> bool {
        let mut b = [0u8; 1];
        let mut rb = ReadBuf::new(&mut b);
        let mut cx = Context::from_waker(Waker::noop());
        !matches!(self.tcp().poll_peek(&mut cx, &mut rb), Poll::Pending)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests;
