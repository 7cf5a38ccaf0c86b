//! The GitHub token goes only to GitHub, also when GitHub's host redirects the clone
//! elsewhere: a fake https git host (its certificate trusted through `SSL_CERT_FILE`)
//! sends the first request of a fetch to another host name, which then asks for
//! credentials, and must never get the token.

use super::*;
use std::net::TcpListener;

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

const GITHUB_TOKEN: &str = "ghs_clone-token-4e1b7a-never-elsewhere";

/// A self-signed certificate for `127.0.0.1` and `localhost`, its own trust anchor.
fn certificate() -> (X509, PKey<Private>) {
    let key = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "hookci test git host")
        .unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let serial = openssl::bn::BigNum::from_u32(1).unwrap().to_asn1_integer();
    cert.set_serial_number(&serial.unwrap()).unwrap();
    let ca = BasicConstraints::new().critical().ca().build().unwrap();
    cert.append_extension(ca).unwrap();
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .dns("localhost")
        .build(&cert.x509v3_context(None, None))
        .unwrap();
    cert.append_extension(san).unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    (cert.build(), key)
}

/// One request the fake host received: the host it was sent to, and its
/// Authorization header.
#[derive(Debug, Clone)]
struct Asked {
    host: String,
    path: String,
    authorization: Option<String>,
}

/// Serves https on `listener`: a request for `127.0.0.1:PORT` is redirected to
/// `localhost:PORT`, which answers 401 asking for a password (and 404 once given one).
fn serve_redirecting(listener: TcpListener, acceptor: SslAcceptor) -> Arc<Mutex<Vec<Asked>>> {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::clone(&asked);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(mut tls) = acceptor.accept(stream) else {
                continue;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
            };
            let path = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let host = header("host").unwrap_or_default();
            let authorization = header("authorization");
            let answer = if host == format!("127.0.0.1:{port}") {
                format!("HTTP/1.1 302 Found\r\nLocation: https://localhost:{port}{path}\r\n")
            } else if authorization.is_none() {
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n".to_owned()
            } else {
                "HTTP/1.1 404 Not Found\r\n".to_owned()
            };
            seen.lock().unwrap().push(Asked {
                host,
                path,
                authorization,
            });
            let _ = write!(
                tls,
                "{answer}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = tls.shutdown();
        }
    });
    asked
}

#[test]
fn a_redirect_from_the_github_host_does_not_take_the_clone_token_elsewhere() {
    let b = Builder::new();
    let (cert, key) = certificate();
    let cert_file = b.path().join("git-host.pem");
    std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = serve_redirecting(listener, acceptor.build());

    let token_file = b.path().join("github-token");
    std::fs::write(&token_file, GITHUB_TOKEN).unwrap();
    let clone_url = format!("https://127.0.0.1:{port}/octo-org/octo-repo.git");
    let yaml =
        format!("repo: {REPO}\nclone_url: {clone_url}\nsteps:\n  - name: s\n    run: echo built\n");
    let d = b
        .pipeline("p", &yaml)
        .config(&format!(
            "github:\n  token_file: {}\n  api_url: https://127.0.0.1:{port}/api/v3\n  statuses: false",
            token_file.display()
        ))
        .env("SSL_CERT_FILE", cert_file.to_str().unwrap())
        .start();
    let sha = "1111111111111111111111111111111111111111";
    let id = push(&d, "redirect-1", "refs/heads/main", ZERO, sha);
    let run = d.wait_run(id);
    let asked = asked.lock().unwrap().clone();
    assert_eq!(run["status"], "failed", "{run:#}");
    let elsewhere: Vec<&Asked> = asked
        .iter()
        .filter(|a| a.host.starts_with("localhost"))
        .collect();
    assert!(
        !elsewhere.is_empty(),
        "the redirect was never followed: {asked:?}\n{}",
        d.log()
    );
    assert!(
        elsewhere.iter().any(|a| a.path.contains("/info/refs")),
        "{elsewhere:?}"
    );
    assert!(
        elsewhere.iter().all(|a| a.authorization.is_none()),
        "credentials went to another host: {:?}",
        elsewhere
            .iter()
            .map(|a| (&a.host, a.authorization.is_some()))
            .collect::<Vec<_>>()
    );
    assert!(!d.log().contains(GITHUB_TOKEN));
}
