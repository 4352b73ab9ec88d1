//! The lean client against scripted receivers on loopback.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a scripted receiver does with each request on a connection.
#[derive(Clone, Copy)]
enum Reply {
    Raw(&'static str),
    /// Closes without answering.
    Close,
    /// Never answers.
    Hang,
}

/// A receiver that answers the n-th request of each connection with `script[n]` (the
/// last entry for the rest); returns its URL, its accepted connections and the requests
/// it read (head and body).
async fn receiver(script: Vec<Reply>) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/hook/a?x=1",
        l.local_addr().unwrap().port()
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, s) = (accepted.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(sock, script.clone(), s.clone()));
        }
    });
    (url, accepted, seen)
}

async fn serve(sock: TcpStream, script: Vec<Reply>, seen: Arc<Mutex<Vec<String>>>) {
    let mut r = tokio::io::BufReader::new(sock);
    for k in 0.. {
        let mut head = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        head.push_str(&String::from_utf8(body).unwrap());
        seen.lock().unwrap().push(head);
        match script[k.min(script.len() - 1)] {
            Reply::Raw(a) => r.get_mut().write_all(a.as_bytes()).await.unwrap(),
            Reply::Close => return,
            Reply::Hang => std::future::pending::<()>().await,
        }
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

async fn post(http: &Http1, url: &str, headers: &[(String, String)]) -> Result<Answer, SendError> {
    let t = http.target(url)?.unwrap();
    let p = Post {
        target: &t,
        content_type: "application/fhir+json",
        headers,
        body: b"{\"resourceType\":\"Bundle\"}",
    };
    tokio::time::timeout(Duration::from_secs(2), http.post(&p))
        .await
        .map_err(|_| SendError::Timeout(Duration::from_secs(2)))?
}

#[tokio::test]
async fn one_connection_carries_request_after_request() {
    let chunked = "HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
    let (url, accepted, seen) = receiver(vec![
        Reply::Raw(OK),
        Reply::Raw(chunked),
        Reply::Raw("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    ])
    .await;
    let http = Http1::new(true, 8);
    let h = vec![("X-Test".to_string(), "yes".to_string())];
    for want in [200, 202, 204, 204] {
        assert_eq!(post(&http, &url, &h).await.unwrap().status, want);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "kept alive through every body kind"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    let port = url.split(':').nth(2).unwrap().split('/').next().unwrap();
    assert!(
        seen[0].starts_with(&format!(
            "POST /hook/a?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        )),
        "{}",
        seen[0]
    );
    assert!(seen[0].contains("Content-Type: application/fhir+json\r\n"));
    assert!(seen[0].contains("X-Test: yes\r\n"));
    assert!(seen[0].ends_with("\r\n\r\n{\"resourceType\":\"Bundle\"}"));
}

#[tokio::test]
async fn a_closing_answer_or_a_stale_connection_takes_a_new_one() {
    // Each connection: the first request answered with close, ...
    let (url, accepted, _) = receiver(vec![Reply::Raw(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )])
    .await;
    let http = Http1::new(true, 8);
    for _ in 0..3 {
        post(&http, &url, &[]).await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // ... or the second request met by a close without an answer: retried once on a new
    // connection, which answers it.
    let (url, accepted, seen) = receiver(vec![Reply::Raw(OK), Reply::Close]).await;
    post(&http, &url, &[]).await.unwrap();
    assert_eq!(post(&http, &url, &[]).await.unwrap().status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "the retried request went out twice, once per connection"
    );
    // A fresh connection closed without an answer is a failure, not retried.
    let (url, accepted, _) = receiver(vec![Reply::Close]).await;
    let e = post(&http, &url, &[]).await.unwrap_err();
    assert!(matches!(e, SendError::Other(_)), "{e}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refusals_and_hangs_are_told_apart() {
    let (url, _, _) = receiver(vec![Reply::Raw(
        "HTTP/1.1 503 Busy\r\nRetry-After: 120\r\nContent-Length: 4\r\n\r\nbusy",
    )])
    .await;
    let http = Http1::new(true, 8);
    let a = post(&http, &url, &[]).await.unwrap();
    assert_eq!(
        a,
        Answer {
            status: 503,
            retry_after: Some("120".into())
        }
    );
    let (url, _, _) = receiver(vec![Reply::Hang]).await;
    assert!(matches!(
        post(&http, &url, &[]).await,
        Err(SendError::Timeout(_))
    ));
    let (url, _, _) = receiver(vec![Reply::Raw("HTTP/1.1 2x0 what\r\n\r\n")]).await;
    let e = post(&http, &url, &[]).await.unwrap_err();
    assert!(e.to_string().contains("bad HTTP answer"), "{e}");
}

#[tokio::test]
async fn a_header_that_could_smuggle_a_request_is_refused_before_connecting() {
    let (url, accepted, _) = receiver(vec![Reply::Raw(OK)]).await;
    let http = Http1::new(true, 8);
    let bad = vec![(
        "X-A".to_string(),
        "1\r\n\r\nPOST /other HTTP/1.1".to_string(),
    )];
    let e = post(&http, &url, &bad).await.unwrap_err();
    assert!(matches!(e, SendError::Refused(_)), "{e}");
    let bad = vec![("X A".to_string(), "1".to_string())];
    assert!(matches!(
        post(&http, &url, &bad).await,
        Err(SendError::Refused(_))
    ));
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // Framing headers of the subscription's are left out; the client's own stand.
    let (url, _, seen) = receiver(vec![Reply::Raw(OK)]).await;
    let h = vec![
        ("Content-Length".to_string(), "1".to_string()),
        ("Host".to_string(), "x".to_string()),
    ];
    post(&http, &url, &h).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].matches("Content-Length").count(), 1, "{}", seen[0]);
    assert!(!seen[0].contains("Host: x"));
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let (url, accepted, _) = receiver(vec![Reply::Raw(OK)]).await;
    let e = post(&Http1::new(false, 8), &url, &[]).await.unwrap_err();
    assert!(matches!(e, SendError::Refused(_)), "{e}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn targets_keep_the_url_as_written() {
    let t = Target::parse("https://[::1]:8443/a/b?c=d#frag")
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.origin.tls, t.origin.host.as_str(), t.origin.port),
        (true, "::1", 8443)
    );
    assert_eq!(
        (t.host_header.as_str(), t.path.as_str()),
        ("[::1]:8443", "/a/b?c=d")
    );
    assert_eq!(t.literal(), Some("::1".parse().unwrap()));
    let t = Target::parse("http://example.org").unwrap().unwrap();
    assert_eq!(t.literal(), None);
    assert_eq!(
        (t.origin.port, t.host_header.as_str(), t.path.as_str()),
        (80, "example.org", "/")
    );
    assert!(
        Target::parse("https://u:p@example.org/x")
            .unwrap()
            .is_none(),
        "credentials: reqwest"
    );
    assert!(matches!(
        Target::parse("ftp://example.org/x"),
        Err(SendError::Refused(_))
    ));
}

type Der = rustls::pki_types::CertificateDer<'static>;

/// A CA made here (openssl) and a server certificate for 127.0.0.1 it signed: the CA's
/// certificate and the server's config.
fn test_ca_and_server() -> (Der, rustls::ServerConfig) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &str| {
        let args: Vec<&str> = args.split(' ').collect();
        let ok = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    };
    run("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.crt");
    run("req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout s.key -out s.csr");
    std::fs::write(d.join("s.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run("x509 -req -in s.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile s.ext -out s.crt");
    let ca = Der::from_pem_file(d.join("ca.crt")).unwrap();
    let chain = vec![Der::from_pem_file(d.join("s.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(d.join("s.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    (ca, cfg)
}

/// A TLS receiver on 127.0.0.1 that answers OK to every request. Returns its URL, its
/// established TLS sessions and its CA's certificate.
async fn tls_receiver() -> (String, Arc<AtomicUsize>, Der) {
    let (ca, cfg) = test_ca_and_server();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/hook", l.local_addr().unwrap().port());
    let sessions = Arc::new(AtomicUsize::new(0));
    let s = sessions.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(sock).await {
                    s.fetch_add(1, Ordering::SeqCst);
                    answer_each(tls).await;
                }
            });
        }
    });
    (url, sessions, ca)
}

/// Answers OK to each request (small ones: a head and a JSON body) until the client closes.
async fn answer_each(mut io: impl AsyncReadExt + AsyncWriteExt + Unpin) {
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    loop {
        let n = io.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
            got.clear();
            io.write_all(OK.as_bytes()).await.unwrap();
        }
    }
}

#[tokio::test]
async fn tls_is_verified_and_kept_alive() {
    let (url, sessions, ca) = tls_receiver().await;
    // The system's trust store does not know the test's CA: refused in the handshake.
    let e = post(&Http1::new(true, 8), &url, &[]).await.unwrap_err();
    assert!(matches!(e, SendError::Connect(_)), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert_eq!(sessions.load(Ordering::SeqCst), 0, "no session was set up");
    // Trusting it: three requests on one TLS session.
    let http = Http1::trusting(true, ca);
    for _ in 0..3 {
        assert_eq!(post(&http, &url, &[]).await.unwrap().status, 200);
    }
    assert_eq!(sessions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connections_idle_too_long_are_closed_for_every_receiver() {
    let (a, _, _) = receiver(vec![Reply::Raw(OK)]).await;
    let (b, _, _) = receiver(vec![Reply::Raw(OK)]).await;
    let mut http = Http1::new(true, 8);
    http.idle_for = Duration::from_millis(200);
    post(&http, &a, &[]).await.unwrap();
    post(&http, &b, &[]).await.unwrap();
    assert_eq!(http.idle_count(), 2, "both kept alive");
    tokio::time::sleep(Duration::from_millis(250)).await;
    // A send to b sweeps: a's connection, aged, is closed although a is not sent to.
    post(&http, &b, &[]).await.unwrap();
    assert_eq!(http.idle_count(), 1, "only b's fresh connection is kept");
}
