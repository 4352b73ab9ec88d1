//! HTTP/1.1 on one connection: the request head, and the answer's head and body read
//! far enough to reuse the connection.

use bytes::{Buf, BytesMut};
use std::io::Write as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Answer, Conn, Post, BODY_CAP, HEAD_CAP};
use crate::channel::SendError;

/// Headers the client writes itself; a subscription's header of one of these names would
/// break the message's framing, so it is left out.
const OWN: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "user-agent",
    "te",
];

/// The request line and headers. A header that is not valid HTTP (a line break in a
/// value, say) refuses the send: it could smuggle a second request.
pub(super) fn write_head(out: &mut Vec<u8>, p: &Post<'_>) -> Result<(), SendError> {
    let t = p.target;
    let _ = write!(
        out,
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fhir-cdc/{}\r\nContent-Length: {}\r\n",
        t.path,
        t.host_header,
        env!("CARGO_PKG_VERSION"),
        p.body.len()
    );
    header(out, "Content-Type", p.content_type)?;
    for (k, v) in p.headers {
        if !OWN.iter().any(|o| k.eq_ignore_ascii_case(o)) {
            header(out, k, v)?;
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

fn header(out: &mut Vec<u8>, name: &str, value: &str) -> Result<(), SendError> {
    let ok_name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok();
    let ok_value = reqwest::header::HeaderValue::from_str(value).is_ok();
    if !(ok_name && ok_value) {
        return Err(SendError::Refused(format!(
            "header {name:?} is not a valid HTTP header"
        )));
    }
    for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
        out.extend_from_slice(part);
    }
    Ok(())
}

/// Why an exchange failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The connection was closed or reset before any byte of an answer came back.
    Stale(String),
    Io(String),
    Protocol(String),
}

/// What the answer's head says about its body and its connection.
struct Head {
    answer: Answer,
    body: Body,
    keep: bool,
}

enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// Writes the request and reads its answer. Returns the answer and whether the
/// connection can carry another request.
pub(super) async fn exchange(conn: &mut Conn, request: &[u8]) -> Result<(Answer, bool), Failure> {
    let stale = |e: std::io::Error| Failure::Stale(e.to_string());
    conn.buf.clear();
    conn.io.write_all(request).await.map_err(stale)?;
    conn.io.flush().await.map_err(stale)?;
    let head = read_head(conn).await?;
    let complete = match head.body {
        Body::None => true,
        Body::Length(n) if n <= BODY_CAP => skip(conn, n).await?,
        Body::Chunked => skip_chunked(conn).await?,
        Body::Length(_) | Body::Close => false,
    };
    Ok((head.answer, head.keep && complete && conn.buf.is_empty()))
}

/// Reads until a final (not 1xx) response head is complete, and consumes it.
async fn read_head(conn: &mut Conn) -> Result<Head, Failure> {
    let mut got_any = false;
    loop {
        if let Some(h) = parse_head(&mut conn.buf)? {
            return Ok(h);
        }
        if conn.buf.len() > HEAD_CAP {
            return Err(Failure::Protocol("response head too long".into()));
        }
        let n = match conn.io.read_buf(&mut conn.buf).await {
            Ok(n) => n,
            Err(e) if !got_any => return Err(Failure::Stale(e.to_string())),
            Err(e) => return Err(Failure::Io(e.to_string())),
        };
        if n == 0 {
            let why = "the connection closed before an answer";
            return Err(match got_any {
                false => Failure::Stale(why.into()),
                true => Failure::Io(why.into()),
            });
        }
        got_any = true;
    }
}

/// A complete final head at the start of `buf`, consumed; interim (1xx) answers are
/// consumed and skipped.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Failure> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let n = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Failure::Protocol(e.to_string())),
        };
        let status = r.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            buf.advance(n);
            continue;
        }
        let head = head_of(status, r.version == Some(1), r.headers)?;
        buf.advance(n);
        return Ok(Some(head));
    }
}

fn head_of(status: u16, http11: bool, headers: &[httparse::Header<'_>]) -> Result<Head, Failure> {
    let mut length = None;
    let mut chunked = false;
    let mut close = !http11;
    let mut retry_after = None;
    for h in headers {
        let v = std::str::from_utf8(h.value).unwrap_or("");
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| Failure::Protocol(format!("Content-Length {v:?}")))?;
            if length.is_some_and(|m| m != n) {
                return Err(Failure::Protocol("two Content-Lengths".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            close |= v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(v.to_string());
        }
    }
    let body = match (status, chunked, length) {
        (101 | 204 | 304, _, _) => Body::None,
        (_, true, _) => Body::Chunked,
        (_, false, Some(n)) => Body::Length(n),
        (_, false, None) => Body::Close,
    };
    Ok(Head {
        answer: Answer {
            status,
            retry_after,
        },
        keep: !close && status != 101,
        body,
    })
}

/// Reads at least `want` bytes into the buffer.
async fn fill(conn: &mut Conn, want: usize) -> Result<(), Failure> {
    while conn.buf.len() < want {
        let n = conn
            .io
            .read_buf(&mut conn.buf)
            .await
            .map_err(|e| Failure::Io(e.to_string()))?;
        if n == 0 {
            return Err(Failure::Io("the connection closed inside an answer".into()));
        }
    }
    Ok(())
}

/// Consumes a body of `n` bytes.
async fn skip(conn: &mut Conn, n: u64) -> Result<bool, Failure> {
    fill(conn, n as usize).await?;
    conn.buf.advance(n as usize);
    Ok(true)
}

/// Consumes a chunked body and its trailers; `false` (leave the connection) past
/// [`BODY_CAP`].
async fn skip_chunked(conn: &mut Conn) -> Result<bool, Failure> {
    let mut total = 0u64;
    loop {
        let (n, size) = match httparse::parse_chunk_size(&conn.buf) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => {
                let want = conn.buf.len() + 1;
                fill(conn, want).await?;
                continue;
            }
            Err(_) => return Err(Failure::Protocol("bad chunk size".into())),
        };
        conn.buf.advance(n);
        if size == 0 {
            return skip_trailers(conn).await.map(|()| true);
        }
        total += size;
        if total > BODY_CAP {
            return Ok(false);
        }
        fill(conn, size as usize + 2).await?;
        conn.buf.advance(size as usize + 2);
    }
}

/// Trailer lines up to the empty one.
async fn skip_trailers(conn: &mut Conn) -> Result<(), Failure> {
    loop {
        match conn.buf.windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                conn.buf.advance(2);
                return Ok(());
            }
            Some(i) => conn.buf.advance(i + 2),
            None if conn.buf.len() > HEAD_CAP => {
                return Err(Failure::Protocol("trailers too long".into()))
            }
            None => {
                let want = conn.buf.len() + 1;
                fill(conn, want).await?;
            }
        }
    }
}
