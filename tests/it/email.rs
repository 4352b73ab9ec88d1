//! The email channel against a real SMTP server (aiosmtpd, started by the test): mails read
//! back from what the server stored, the attached Bundle validated; STARTTLS with a
//! self-signed certificate; full-resource without TLS refused.

use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOPIC: &str = "http://fhir-cdc.test/topic/encounter-all";
const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter-all"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update", "delete"] }]
"#;

/// An aiosmtpd server storing mails in its own directory; stopped on drop.
struct Smtp {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Smtp {
    fn start(tls: Option<&Path>) -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(repo().join("scripts/smtp-sink.sh"));
        cmd.args(["--port", &port.to_string(), "--dir"])
            .arg(dir.path());
        if let Some(certs) = tls {
            cmd.arg("--cert").arg(certs.join("smtp.crt"));
            cmd.arg("--key").arg(certs.join("smtp.key"));
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("start smtp-sink.sh");
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "smtp-sink did not start");
        Smtp { child, port, dir }
    }

    /// The stored mails, oldest first.
    fn mails(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mail parsed with Python's own email package: headers, the text part, the attachment.
fn parse(mail: &Path) -> Value {
    let script = r#"
import email, json, sys
from email import policy
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=policy.default)
out = {k: str(m[k]) for k in ('Subject', 'From', 'To', 'Cc', 'Reply-To') if m[k]}
for part in m.walk():
    if part.get_content_maintype() == 'multipart':
        continue
    if part.get_filename():
        out['attachment_name'] = part.get_filename()
        out['attachment_type'] = part.get_content_type()
        out['attachment'] = json.loads(part.get_payload(decode=True))
    elif part.get_content_type() == 'text/plain':
        out['text'] = part.get_content()
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(mail)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn email_subscription(api: u16, to: &str, content: &str) -> reqwest::Response {
    let body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "topic": TOPIC,
        "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "email"},
        "endpoint": to,
        "content": content,
        "contentType": "application/fhir+json",
        "parameter": [{"name": "Subject", "value": "Critical lab"}, {"name": "Cc", "value": "oncall@example.org"}]
    });
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/Subscription"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn created(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An in-progress Encounter of Patient/p1 (the mails name the patient reference).
async fn put_encounter(store: &tokio_postgres::Client, id: &str) {
    let body = json!({"resourceType": "Encounter", "status": "in-progress", "class": [{"coding": [{"code": "AMB"}]}], "subject": {"reference": "Patient/p1"}});
    aidbox_put(store, "Encounter", id, &body).await;
}

async fn wait_mails(smtp: &Smtp, n: usize) -> Vec<Value> {
    wait_until("mails", Duration::from_secs(30), || async {
        smtp.mails().len() >= n
    })
    .await;
    smtp.mails().iter().map(|m| parse(m)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_carry_a_summary_and_the_bundle_and_plain_smtp_refuses_full_resource() {
    let smtp = Smtp::start(None);
    let port = smtp.port;
    let env = TestEnv::aidbox(TOPICS)
        .config(move |c| {
            c.channels.email = Some(
                toml::from_str(&format!(
                    "smtp = \"smtp://127.0.0.1:{port}\"\nfrom = \"fhir-cdc@example.org\""
                ))
                .unwrap(),
            )
        })
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(["check", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains(&format!(
            "ok    SMTP server smtp://127.0.0.1:{port} answers (no TLS"
        )),
        "{check}"
    );

    let r = email_subscription(api, "mailto:ward@example.org", "full-resource").await;
    assert_eq!(r.status(), 422);
    assert!(
        r.text().await.unwrap().contains("TLS"),
        "the refusal says why"
    );

    let id = created(
        email_subscription(api, "mailto:ward@example.org,lab@example.org", "id-only").await,
    )
    .await;
    wait_until(
        "active without a handshake mail",
        Duration::from_secs(30),
        || async { status(api, &id).await["status"] == "active" },
    )
    .await;
    put_encounter(&env.store, "e1").await;
    put_encounter(&env.store, "e2").await;
    let mails = wait_mails(&smtp, 2).await;
    assert_eq!(mails.len(), 2, "no handshake mail, one per event");
    let mut bundles = vec![];
    for (i, m) in mails.iter().enumerate() {
        assert_eq!(m["Subject"], "Critical lab");
        assert_eq!(m["To"], "ward@example.org, lab@example.org");
        assert_eq!(m["Cc"], "oncall@example.org");
        assert_eq!(m["From"], "fhir-cdc@example.org");
        let text = m["text"].as_str().unwrap();
        assert!(text.contains(&format!("Subscription: {id}")), "{text}");
        assert!(
            text.contains(&format!("(event number {})", i + 1)),
            "{text}"
        );
        assert!(
            !text.contains("Patient/p1") && !text.contains("in-progress"),
            "no content in the text"
        );
        assert_eq!(m["attachment_name"], "notification.json");
        assert_eq!(m["attachment_type"], "application/fhir+json");
        bundles.push(m["attachment"].clone());
    }
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(
        &bundles,
        "r5",
        &[
            "--expect-subscription",
            &sub,
            "--content",
            "id-only",
            "--sequence",
            "strict",
        ],
    );
}

fn self_signed(dir: &Path) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            "smtp.key",
            "-out",
            "smtp.crt",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_a_self_signed_certificate_carries_full_resources() {
    let certs = tempfile::tempdir().unwrap();
    self_signed(certs.path());
    let smtp = Smtp::start(Some(certs.path()));
    let (port, ca) = (smtp.port, certs.path().join("smtp.crt"));
    let env = TestEnv::aidbox(TOPICS)
        .config(move |c| {
            c.channels.email = Some(toml::from_str(&format!(
                "smtp = \"smtp+starttls://localhost:{port}\"\nfrom = \"fhir-cdc@example.org\"\nca_file = \"{}\"\nhandshake_and_heartbeat = true",
                ca.display()
            )).unwrap())
        })
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;
    let id =
        created(email_subscription(api, "mailto:ward@example.org", "full-resource").await).await;
    let hs = wait_mails(&smtp, 1).await;
    assert!(hs[0]["text"].as_str().unwrap().contains("Type: handshake"));
    put_encounter(&env.store, "t1").await;
    let mails = wait_mails(&smtp, 2).await;
    let b = &mails[1]["attachment"];
    assert_eq!(
        b["entry"][1]["resource"]["subject"]["reference"],
        "Patient/p1"
    );
    let bundles: Vec<Value> = mails.iter().map(|m| m["attachment"].clone()).collect();
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(
        &bundles,
        "r5",
        &["--expect-subscription", &sub, "--sequence", "strict"],
    );
}
