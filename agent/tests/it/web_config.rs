//! `--web-config FILE`: the metrics endpoint over TLS and behind basic auth, in the Prometheus
//! exporter toolkit's format. A CA, the server's certificate and clients' certificates are made
//! by the test (rcgen); a real TLS client (rustls) talks to `attach` on the fake llama.cpp's
//! driver and to the host agent (selecting only a driver copied under a name of its own).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use crate::common::{
    daemon::{driver_copy, held_driver},
    server::{free_port, path, Probe},
    *,
};

/// A PEM certificate and its key.
struct Leaf {
    cert: String,
    key: String,
}

/// The test's PKI: a CA, the server's certificate from it (localhost, 127.0.0.1), a client's
/// from it, and a client's from a CA the server does not know.
struct Pki {
    ca: String,
    server: Leaf,
    client: Leaf,
    stranger: Leaf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Leaf {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, sans[0]);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    fn new() -> Self {
        let ca1 = ca("llamaprobe test CA");
        let ca2 = ca("another CA");
        Self {
            ca: ca1.pem(),
            server: leaf(
                &ca1,
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(
                &ca1,
                &["prometheus.example"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            stranger: leaf(
                &ca2,
                &["intruder.example"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        }
    }

    /// Writes tls/ca.crt, tls/server.crt and tls/server.key under `dir`.
    fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        std::fs::write(dir.join("tls/ca.crt"), &self.ca).unwrap();
        std::fs::write(dir.join("tls/server.crt"), &self.server.cert).unwrap();
        std::fs::write(dir.join("tls/server.key"), &self.server.key).unwrap();
    }
}

/// A bcrypt hash of `password`, as `htpasswd -nB` would make it.
fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 6).unwrap()
}

/// One HTTP response: its status, its header block (names lower-case) and its body.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// How a test's client connects.
struct Client {
    /// The CA it trusts for the server's certificate.
    trust: String,
    /// The certificate it shows, if any.
    cert: Option<Leaf>,
}

impl Client {
    fn new(pki: &Pki, cert: Option<&Leaf>) -> Self {
        Self {
            trust: pki.ca.clone(),
            cert: cert.map(|l| Leaf {
                cert: l.cert.clone(),
                key: l.key.clone(),
            }),
        }
    }

    /// GET `path` over TLS (server name localhost), with basic auth if given. `Err` is a
    /// connection or TLS failure (no HTTP answer).
    fn get(&self, port: u16, path: &str, auth: Option<(&str, &str)>) -> Result<Reply, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.trust.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match &self.cert {
            Some(l) => b
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(l.cert.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        let conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .map_err(|e| e.to_string())?;
        let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(request(path, auth).as_bytes())
            .map_err(|e| format!("sending: {e}"))?;
        let mut out = Vec::new();
        match tls.read_to_end(&mut out) {
            Ok(_) => {}
            // A peer that closes without close_notify after its whole answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
            Err(e) => return Err(format!("reading: {e}")),
        }
        parse(&out).ok_or_else(|| format!("no HTTP answer: {:?}", String::from_utf8_lossy(&out)))
    }
}

fn request(path: &str, auth: Option<(&str, &str)>) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some((u, p)) = auth {
        req.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ));
    }
    req + "\r\n"
}

fn parse(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .strip_prefix("HTTP/1.1 ")?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(Reply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

/// What a plain-HTTP GET on the port gets back (bytes until the server closes, or 5 s).
fn plain_http(port: u16) -> Vec<u8> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock.write_all(request("/metrics", Some(("prometheus", "s3cret"))).as_bytes());
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    out
}

/// Asserts that a plain-HTTP request on a TLS port gets no HTTP answer: a TLS alert record
/// (content type 21) or nothing.
fn plain_http_refused(port: u16) {
    let got = plain_http(port);
    eprintln!("plain HTTP got {:?}", String::from_utf8_lossy(&got));
    assert!(
        !got.starts_with(b"HTTP/") && got.first().is_none_or(|b| *b == 21),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        !String::from_utf8_lossy(&got).contains("llamaprobe_"),
        "{got:?}"
    );
}

const BASIC_REALM: &str = "www-authenticate: basic realm=\"llamaprobe\"";

#[test]
fn web_config_tls_and_basic_auth_on_attach() {
    if !root_or_skip("web_config_tls_and_basic_auth_on_attach") {
        return;
    }
    let _serial = serial();
    let dir = scratch("web-config-attach");
    let pki = Pki::new();
    pki.write(&dir);
    // Relative paths: from the web config file's directory, whatever llamaprobe's.
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\nbasic_auth_users:\n  prometheus: {}\n",
            bcrypt_hash("s3cret")
        ),
    )
    .unwrap();
    let exe = driver_copy(&dir, "webcfg_driver");
    let (mut driver, pid) = held_driver(&exe);
    let port = free_port();
    let mut probe = Probe::spawn(
        llamaprobe()
            .current_dir("/")
            .args(["attach", "--pid", &pid.to_string(), "--quiet"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--web-config", path(&web)]),
    );
    probe.wait_for("probes attached");
    let line = probe.wait_for("Prometheus metrics at");
    assert!(
        line.contains(&format!("https://127.0.0.1:{port}/metrics"))
            && line.contains("TLS, client certificates NoClientCert, basic auth (1 user)"),
        "{line}"
    );

    let client = Client::new(&pki, None);
    // The right password: the metrics.
    let ok = client
        .get(port, "/metrics", Some(("prometheus", "s3cret")))
        .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(
        ok.body.contains("llamaprobe_probes_attached") && ok.head.contains("text/plain"),
        "{ok:?}"
    );
    // Again (the cached check), then a wrong password, an unknown user, none at all.
    assert_eq!(
        client
            .get(port, "/metrics", Some(("prometheus", "s3cret")))
            .unwrap()
            .status,
        200
    );
    for auth in [
        Some(("prometheus", "wrong")),
        Some(("nobody", "s3cret")),
        None,
    ] {
        let r = client.get(port, "/metrics", auth).unwrap();
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
        assert!(r.head.contains(BASIC_REALM), "{r:?}");
        assert!(!r.body.contains("llamaprobe_"), "{r:?}");
    }
    // Nothing is open without credentials unless the file says so: /healthz too (attach serves
    // no health paths: with credentials it is not found).
    assert_eq!(client.get(port, "/healthz", None).unwrap().status, 401);
    assert_eq!(
        client
            .get(port, "/healthz", Some(("prometheus", "s3cret")))
            .unwrap()
            .status,
        404
    );
    // Plain HTTP on the TLS port gets no answer; a client that does not trust the CA refuses
    // the server's certificate.
    plain_http_refused(port);
    let stranger = Client {
        trust: Pki::new().ca,
        cert: None,
    };
    let e = stranger
        .get(port, "/metrics", Some(("prometheus", "s3cret")))
        .unwrap_err();
    eprintln!("a client not trusting the CA: {e}");
    assert!(e.contains("invalid peer certificate"), "{e}");

    // The driver runs to its end and the session with it.
    driver.stdin.take().unwrap().write_all(b"g").unwrap();
    assert!(driver.wait().unwrap().success());
    let (code, _) = probe.finish();
    assert_eq!(code, 0);
}

/// The host agent with `web` (client certificates required), until /readyz answers `client`.
fn daemon(web: &Path, client: &Client) -> (Probe, u16) {
    let port = free_port();
    let mut cmd = llamaprobe();
    cmd.args(["daemon", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--include", "exe:webcfg_daemon_driver"])
        .env("LLAMAPROBE_WEB_CONFIG", web)
        .env("LLAMAPROBE_LOG", "info");
    let probe = Probe::spawn(&mut cmd);
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(port, "/readyz", None) {
            if r.status == 200 {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "daemon not ready after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (probe, port)
}

#[test]
fn web_config_client_certificates_and_open_health_paths_on_the_daemon() {
    if !root_or_skip("web_config_client_certificates_and_open_health_paths_on_the_daemon") {
        return;
    }
    let _serial = serial();
    let dir = scratch("web-config-daemon");
    let pki = Pki::new();
    pki.write(&dir);
    let tls = format!(
        "tls_server_config:\n  cert_file: {d}/tls/server.crt\n  key_file: {d}/tls/server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {d}/tls/ca.crt\n  min_version: TLS12\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\nbasic_auth_users:\n  prometheus: {h}\n",
        d = dir.display(),
        h = bcrypt_hash("s3cret")
    );
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!("{tls}llamaprobe:\n  unauthenticated_paths: [/healthz, /readyz]\n"),
    )
    .unwrap();
    let client = Client::new(&pki, Some(&pki.client));
    let exe = driver_copy(&dir, "webcfg_daemon_driver");
    let (mut driver, pid) = held_driver(&exe);
    let (mut probe, port) = daemon(&web, &client);

    // With the CA's client certificate: the health paths open, /metrics behind the password.
    let h = client.get(port, "/healthz", None).unwrap();
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{h:?}");
    assert!(h.head.contains("x-content-type-options: nosniff"), "{h:?}");
    assert_eq!(client.get(port, "/readyz", None).unwrap().status, 200);
    let r = client.get(port, "/metrics", None).unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.head.contains(BASIC_REALM), "{r:?}");
    assert_eq!(
        client
            .get(port, "/metrics", Some(("prometheus", "wrong")))
            .unwrap()
            .status,
        401
    );
    // The driver it selected is traced and its series are served to the right password.
    while !probe.wait_for("traced").contains(&format!("pid={pid}")) {}
    let m = client
        .get(port, "/metrics", Some(("prometheus", "s3cret")))
        .unwrap();
    assert_eq!(m.status, 200, "{m:?}");
    assert!(
        m.body.contains("llamaprobe_build_info")
            && m.body.contains("llamaprobe_processes_traced 1"),
        "{}",
        m.body
    );

    // Without a client certificate, or with one of another CA, the handshake fails: no HTTP.
    for (what, c, alert) in [
        (
            "no client certificate",
            Client::new(&pki, None),
            "CertificateRequired",
        ),
        (
            "another CA's certificate",
            Client::new(&pki, Some(&pki.stranger)),
            "UnknownCA",
        ),
    ] {
        let e = c.get(port, "/healthz", None).unwrap_err();
        eprintln!("{what}: {e}");
        assert!(
            e.contains(&format!("received fatal alert: {alert}")),
            "{what}: {e}"
        );
    }
    plain_http_refused(port);

    // The file is read again when it changes: without the extension key /healthz needs the
    // password like the rest.
    std::fs::write(&web, &tls).unwrap();
    let t0 = Instant::now();
    loop {
        let r = client.get(port, "/healthz", None).unwrap();
        if r.status == 401 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        client
            .get(port, "/healthz", Some(("prometheus", "s3cret")))
            .unwrap()
            .status,
        200
    );
    probe.wait_for("read again");

    // client_allowed_sans: a certificate of the CA naming none of them is refused too.
    let sans = |names: &str| {
        tls.replace(
            "  min_version: TLS12\n",
            &format!("  min_version: TLS12\n  client_allowed_sans: [{names}]\n"),
        )
    };
    std::fs::write(&web, sans("scraper.example, 10.0.0.1")).unwrap();
    let t0 = Instant::now();
    let e = loop {
        match client.get(port, "/healthz", None) {
            Err(e) => break e,
            Ok(r) => assert!(t0.elapsed() < Duration::from_secs(10), "{r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("a SAN not allowed: {e}");
    assert!(e.contains("received fatal alert"), "{e}");
    std::fs::write(&web, sans("scraper.example, prometheus.example")).unwrap();
    let t0 = Instant::now();
    while client.get(port, "/healthz", None).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        client
            .get(port, "/metrics", Some(("prometheus", "s3cret")))
            .unwrap()
            .status,
        200
    );

    driver.stdin.take().unwrap().write_all(b"g").unwrap();
    assert!(driver.wait().unwrap().success());
    let (code, _) = probe.terminate();
    assert_eq!(code, 0);
}

/// A bad web config stops every command before anything is attached: exit 2, the file and
/// what to fix. The daemon's `--check-config` checks it, from its TOML file too.
#[test]
fn web_config_bad_files_exit_2_and_check_config_reads_them() {
    let dir = scratch("web-config-bad");
    let pki = Pki::new();
    pki.write(&dir);
    let bad = dir.join("bad.yml");
    std::fs::write(&bad, "basic_auth_users:\n  prometheus: not-a-hash\n").unwrap();
    let unknown = dir.join("unknown.yml");
    std::fs::write(&unknown, "tls_server_config:\n  certfile: x\n").unwrap();
    let missing = dir.join("missing.yml");
    let marker = dir.join("ran");
    for (file, says) in [
        (&bad, "basic_auth_users.prometheus: not a bcrypt hash"),
        (&unknown, "unknown key `certfile`"),
        (&missing, "cannot read it"),
    ] {
        for args in [
            vec!["attach", "--pid", "1"],
            vec!["run", "--", "/bin/sh", "-c"],
            vec!["daemon", "--check-config"],
        ] {
            let mut cmd = llamaprobe();
            cmd.args(&args);
            if args[0] == "run" {
                cmd.arg(format!("touch {}", marker.display()));
            }
            cmd.env("LLAMAPROBE_WEB_CONFIG", file)
                .env_remove("LLAMAPROBE_CONFIG");
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
            assert!(
                err.contains(&format!("web config {}: {says}", file.display())),
                "{args:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    assert!(!marker.exists(), "the program must not run");

    // The daemon's TOML file: `web-config` is a key like the others.
    let good = dir.join("web.yml");
    std::fs::write(
        &good,
        "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n",
    )
    .unwrap();
    let toml = dir.join("llamaprobe.toml");
    for (web, code, says) in [
        (
            &good,
            0,
            "web.yml: TLS, client certificates NoClientCert, no basic auth)".to_string(),
        ),
        (
            &bad,
            2,
            format!("configuration file {}: `web-config`: ", toml.display()),
        ),
    ] {
        std::fs::write(&toml, format!("web-config = \"{}\"\n", web.display())).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_llamaprobe"))
            .args(["daemon", "--config", path(&toml), "--check-config"])
            .env_remove("LLAMAPROBE_WEB_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        assert!(text(&out).contains(&says), "{}", text(&out));
    }
}
