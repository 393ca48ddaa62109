//! `--web-config FILE`: TLS and basic authentication for the metrics endpoint, in the format
//! of the Prometheus exporter toolkit's web configuration file (what node exporter's
//! `--web.config.file` reads), so a node's exporters and llamaprobe share one file:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths: from the file's own directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! llamaprobe:                      # llamaprobe's own key (the toolkit has none such)
//!   unauthenticated_paths: [/healthz, /readyz]
//! ```
//!
//! As in the toolkit, a key it does not know is an error that names it, and the file is read
//! again when it or a file it names changes (certificates rotated in place are served from the
//! next connection on; a change that does not load is logged and the previous configuration
//! kept). TLS is rustls with ring: TLS 1.2 and 1.3 only. Successful and failed password checks
//! are cached by a SHA-256 of user, hash and password (bcrypt costs tens of milliseconds of CPU
//! a check), and bcrypt runs off the event loop, one check at a time.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use serde::Deserialize;

/// The paths `llamaprobe.unauthenticated_paths` may open.
pub const OPENABLE_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// What a bad web configuration file gets: the file and what to fix, on one line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("web config {}: {message}", path.display())]
pub struct WebConfigError {
    pub path: PathBuf,
    pub message: String,
}

// ---- the file, as the toolkit spells it ----------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// The toolkit's rate limiter (newer releases): refused by name, not silently dropped.
    rate_limit: Option<serde::de::IgnoredAny>,
    llamaprobe: Option<RawExtension>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    /// Inline PEM (the toolkit's `cert`, `key`, `client_ca`).
    cert: Option<String>,
    key: Option<String>,
    client_ca_file: Option<String>,
    client_ca: Option<String>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    #[serde(default)]
    cipher_suites: Vec<String>,
    #[serde(default)]
    curve_preferences: Vec<String>,
    #[serde(default)]
    prefer_server_cipher_suites: Option<bool>,
    #[serde(default)]
    client_allowed_sans: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Accepted for the toolkit's files; llamaprobe speaks HTTP/1.1 (ALPN offers only it).
    #[allow(dead_code)]
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// llamaprobe's own settings, under the top-level key `llamaprobe`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExtension {
    /// Paths served without basic auth (liveness and readiness probes have no credentials).
    #[serde(default)]
    unauthenticated_paths: Vec<String>,
}

// ---- what it means --------------------------------------------------------------------------

/// How client certificates are asked for (the toolkit's `client_auth_type`, Go's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl ClientAuth {
    const NAMES: [(&'static str, ClientAuth); 6] = [
        ("NoClientCert", ClientAuth::NoClientCert),
        ("RequestClientCert", ClientAuth::RequestClientCert),
        ("RequireAnyClientCert", ClientAuth::RequireAnyClientCert),
        // The toolkit's older name, kept by it for compatibility.
        ("RequireClientCert", ClientAuth::RequireAnyClientCert),
        (
            "VerifyClientCertIfGiven",
            ClientAuth::VerifyClientCertIfGiven,
        ),
        (
            "RequireAndVerifyClientCert",
            ClientAuth::RequireAndVerifyClientCert,
        ),
    ];

    fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(ClientAuth::NoClientCert);
        }
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                format!(
                    "tls_server_config.client_auth_type `{s}` is not one of NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
                )
            })
    }

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("NoClientCert")
    }

    fn verifies(self) -> bool {
        matches!(
            self,
            ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert
        )
    }

    fn mandatory(self) -> bool {
        matches!(
            self,
            ClientAuth::RequireAnyClientCert | ClientAuth::RequireAndVerifyClientCert
        )
    }
}

/// One loaded web configuration.
pub struct WebConfig {
    tls: Option<Arc<ServerConfig>>,
    client_auth: ClientAuth,
    /// user → bcrypt hash.
    users: HashMap<String, String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    open_paths: Vec<String>,
    /// The files it was read from (the configuration, then the certificates and keys it
    /// names): what is watched for changes.
    files: Vec<PathBuf>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The headers the toolkit lets a file set, with the values it allows (`None`: any).
const SETTABLE_HEADERS: [(&str, Option<&[&str]>); 5] = [
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

/// A bcrypt hash checked for an unknown user, so that a wrong user costs what a wrong password
/// does (the toolkit's way against finding users by timing). Of no password anyone uses.
const DUMMY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// The authentication cache keeps at most this many (user, password) results.
const CACHE_ENTRIES: usize = 100;

impl WebConfig {
    /// Reads and checks `path`: every key known, every file readable, the key matching the
    /// certificate, every hash a bcrypt hash.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        Self::load_inner(path).map_err(|message| WebConfigError {
            path: path.to_path_buf(),
            message,
        })
    }

    fn load_inner(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!("cannot read it ({e}): give --web-config the path of an existing YAML file")
        })?;
        let raw: RawFile = if is_empty_yaml(&text) {
            RawFile::default()
        } else {
            serde_saphyr::from_str(&text).map_err(|e| yaml_error(&e.to_string()))?
        };
        if raw.rate_limit.is_some() {
            return Err(
                "rate_limit is not supported by llamaprobe: remove it (or keep a copy of the file without it)"
                    .into(),
            );
        }
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut files = vec![path.to_path_buf()];
        let (tls, client_auth) = match raw.tls_server_config {
            Some(t) if !tls_is_empty(&t) => {
                let (cfg, auth) = tls_config(&t, &dir, &mut files)?;
                (Some(Arc::new(cfg)), auth)
            }
            _ => (None, ClientAuth::NoClientCert),
        };
        let mut users = HashMap::new();
        for (user, hash) in raw.basic_auth_users.unwrap_or_default() {
            check_bcrypt(&hash).map_err(|why| {
                format!(
                    "basic_auth_users.{user}: not a bcrypt hash ({why}); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
                )
            })?;
            users.insert(user, hash);
        }
        let http = raw.http_server_config.unwrap_or_default();
        let mut headers = Vec::new();
        for (name, value) in &http.headers {
            headers.push(header(name, value)?);
        }
        let open_paths = raw.llamaprobe.unwrap_or_default().unauthenticated_paths;
        for p in &open_paths {
            if !OPENABLE_PATHS.contains(&p.as_str()) {
                return Err(format!(
                    "llamaprobe.unauthenticated_paths: `{p}` cannot be served without credentials (only {})",
                    OPENABLE_PATHS.join(" and ")
                ));
            }
        }
        Ok(Self {
            tls,
            client_auth,
            users,
            headers,
            open_paths,
            files,
        })
    }

    /// Whether connections are TLS.
    pub fn tls(&self) -> Option<&Arc<ServerConfig>> {
        self.tls.as_ref()
    }

    /// The URL scheme it serves.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The headers every response gets.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// Whether `path` needs credentials.
    pub fn needs_auth(&self, path: &str) -> bool {
        !self.users.is_empty() && !self.open_paths.iter().any(|p| p == path)
    }

    /// One line for `--check-config` and the log.
    pub fn describe(&self) -> String {
        let mut parts = vec![match &self.tls {
            Some(_) => format!("TLS, client certificates {}", self.client_auth.name()),
            None => "plain HTTP".to_string(),
        }];
        parts.push(match self.users.len() {
            0 => "no basic auth".to_string(),
            1 => "basic auth (1 user)".to_string(),
            n => format!("basic auth ({n} users)"),
        });
        if !self.users.is_empty() && !self.open_paths.is_empty() {
            parts.push(format!("open: {}", self.open_paths.join(", ")));
        }
        parts.join(", ")
    }

    /// The user and password of an `Authorization: Basic` header, if it is one.
    fn credentials(header: Option<&HeaderValue>) -> Option<(String, String)> {
        let v = header?.to_str().ok()?;
        let (scheme, rest) = v.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }
}

/// Whether a YAML text holds nothing but comments and blank lines (the toolkit takes an empty
/// file as no TLS and no users).
fn is_empty_yaml(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---")
}

/// serde's message for a key not in the format, said the toolkit's way and on one line.
fn yaml_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or(e).trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if let Some((before, rest)) = first.split_once("unknown field `") {
        if let Some((key, after)) = rest.split_once('`') {
            let at = before.trim().trim_end_matches(':');
            let known = after.trim_start_matches(',').trim();
            let known = known.strip_prefix("expected ").unwrap_or(known);
            let at = if at.is_empty() {
                String::new()
            } else {
                format!("{at}: ")
            };
            return format!(
                "unknown key `{key}` ({at}expected {known}); the format is the Prometheus exporter toolkit's, llamaprobe's own keys go under `llamaprobe:`"
            );
        }
    }
    format!("not valid YAML of the web configuration format: {first}")
}

fn tls_is_empty(t: &RawTls) -> bool {
    [
        &t.cert_file,
        &t.key_file,
        &t.cert,
        &t.key,
        &t.client_ca_file,
        &t.client_ca,
        &t.client_auth_type,
    ]
    .iter()
    .all(|v| v.as_deref().is_none_or(str::is_empty))
}

/// A PEM source: inline text or a file (relative to `dir`); the name says which key it is.
fn pem(
    name: &str,
    file: &Option<String>,
    inline: &Option<String>,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<Option<(Vec<u8>, String)>, String> {
    let file = file.as_deref().filter(|s| !s.is_empty());
    let inline = inline.as_deref().filter(|s| !s.is_empty());
    match (file, inline) {
        (Some(_), Some(_)) => Err(format!(
            "tls_server_config: both {name}_file and {name} are given: keep one"
        )),
        (None, Some(text)) => Ok(Some((text.as_bytes().to_vec(), format!("{name} (inline)")))),
        (Some(f), None) => {
            let p = dir.join(f);
            let bytes = std::fs::read(&p).map_err(|e| {
                format!(
                    "tls_server_config.{name}_file: cannot read {} ({e}); a relative path is taken from the web config file's directory",
                    p.display()
                )
            })?;
            files.push(p.clone());
            Ok(Some((bytes, p.display().to_string())))
        }
        (None, None) => Ok(None),
    }
}

fn certificates(bytes: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no certificate in it (a PEM `-----BEGIN CERTIFICATE-----` block)"
        ));
    }
    Ok(certs)
}

/// The versions `min_version`..`max_version` allow of those rustls speaks.
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    // Go's names, in order; TLS 1.0 and 1.1 are below what rustls speaks.
    let rank = |key: &str, v: &str| -> Result<u8, String> {
        match v {
            "TLS10" => Ok(10),
            "TLS11" => Ok(11),
            "TLS12" => Ok(12),
            "TLS13" => Ok(13),
            _ => Err(format!(
                "tls_server_config.{key} `{v}` is not one of TLS10, TLS11, TLS12, TLS13"
            )),
        }
    };
    let lo = min
        .filter(|s| !s.is_empty())
        .map(|v| rank("min_version", v))
        .transpose()?
        .unwrap_or(12);
    let hi = max
        .filter(|s| !s.is_empty())
        .map(|v| rank("max_version", v))
        .transpose()?
        .unwrap_or(13);
    if hi < 12 {
        return Err(
            "tls_server_config.max_version: llamaprobe speaks TLS 1.2 and 1.3 only; set TLS12 or TLS13"
                .into(),
        );
    }
    if lo > hi {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    let mut out = Vec::new();
    if lo <= 12 {
        out.push(&rustls::version::TLS12);
    }
    if hi >= 13 {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}

/// ring's provider limited to the named TLS 1.2 cipher suites (TLS 1.3's are not
/// configurable, as in Go) and the named curves, in their order.
fn provider(t: &RawTls) -> Result<CryptoProvider, String> {
    let mut p = rustls::crypto::ring::default_provider();
    if !t.cipher_suites.is_empty() {
        let all = p.cipher_suites.clone();
        let tls12: Vec<_> = all
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .collect();
        let mut keep: Vec<_> = all
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .copied()
            .collect();
        for name in &t.cipher_suites {
            if name.starts_with("TLS_AES_") || name.starts_with("TLS_CHACHA20_") {
                continue; // a TLS 1.3 suite: always on
            }
            // Go also accepts the ChaCha suites without their hash.
            let full = if name.ends_with("_CHACHA20_POLY1305") {
                format!("{name}_SHA256")
            } else {
                name.clone()
            };
            let Some(s) = tls12.iter().find(|s| s.suite().as_str() == Some(&full)) else {
                return Err(format!(
                    "tls_server_config.cipher_suites: `{name}` is not one llamaprobe offers ({})",
                    tls12
                        .iter()
                        .filter_map(|s| s.suite().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            keep.push(**s);
        }
        p.cipher_suites = keep;
    }
    if !t.curve_preferences.is_empty() {
        let all = p.kx_groups.clone();
        let mut keep = Vec::new();
        for name in &t.curve_preferences {
            let group = match name.as_str() {
                "X25519" => rustls::NamedGroup::X25519,
                "CurveP256" => rustls::NamedGroup::secp256r1,
                "CurveP384" => rustls::NamedGroup::secp384r1,
                _ => {
                    return Err(format!(
                    "tls_server_config.curve_preferences: `{name}` is not one llamaprobe offers (X25519, CurveP256, CurveP384)"
                ))
                }
            };
            keep.extend(all.iter().filter(|g| g.name() == group).copied());
        }
        p.kx_groups = keep;
    }
    Ok(p)
}

fn tls_config(
    t: &RawTls,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<(ServerConfig, ClientAuth), String> {
    let (cert_bytes, cert_name) = pem("cert", &t.cert_file, &t.cert, dir, files)?
        .ok_or("tls_server_config: cert_file is missing (the server's certificate, PEM)")?;
    let (key_bytes, key_name) = pem("key", &t.key_file, &t.key, dir, files)?
        .ok_or("tls_server_config: key_file is missing (the certificate's private key, PEM)")?;
    let certs = certificates(&cert_bytes, &cert_name)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!("{key_name}: no private key read from it ({e}); it must be a PEM PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key")
    })?;
    let auth = ClientAuth::parse(t.client_auth_type.as_deref().unwrap_or(""))?;
    let ca = pem("client_ca", &t.client_ca_file, &t.client_ca, dir, files)?;
    if ca.is_some() && auth == ClientAuth::NoClientCert {
        return Err(
            "tls_server_config: client_ca_file is given but client_auth_type is NoClientCert: set client_auth_type (RequireAndVerifyClientCert to require certificates the CA signed)"
                .into(),
        );
    }
    let provider = Arc::new(provider(t)?);
    let verifier: Arc<dyn ClientCertVerifier> = if auth.verifies() {
        let (bytes, name) = ca.ok_or_else(|| {
            format!(
                "tls_server_config: client_auth_type {} needs client_ca_file (the CA that signs the clients' certificates)",
                auth.name()
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in certificates(&bytes, &name)? {
            roots
                .add(c)
                .map_err(|e| format!("{name}: not a usable CA certificate ({e})"))?;
        }
        let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let b = if auth.mandatory() {
            b
        } else {
            b.allow_unauthenticated()
        };
        b.build()
            .map_err(|e| format!("{name}: cannot verify clients with it ({e})"))?
    } else if auth == ClientAuth::NoClientCert {
        WebPkiClientVerifier::no_client_auth()
    } else {
        Arc::new(AnyCert {
            mandatory: auth.mandatory(),
            algorithms: provider.signature_verification_algorithms,
        })
    };
    let verifier = if t.client_allowed_sans.is_empty() {
        verifier
    } else {
        if !auth.verifies() {
            return Err(format!(
                "tls_server_config.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert or VerifyClientCertIfGiven (it is {})",
                auth.name()
            ));
        }
        let mut names = Vec::new();
        for s in &t.client_allowed_sans {
            names.push(ServerName::try_from(s.clone()).map_err(|_| {
                format!(
                    "tls_server_config.client_allowed_sans: `{s}` is not a DNS name or IP address (llamaprobe matches those SANs only)"
                )
            })?);
        }
        Arc::new(AllowedSans {
            inner: verifier,
            names,
        })
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions(
            t.min_version.as_deref(),
            t.max_version.as_deref(),
        )?)
        .map_err(|e| format!("tls_server_config: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{key_name} is not the private key of {cert_name}: give the key the certificate was made for"
            ),
            e => format!("{cert_name} with {key_name}: {e}"),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(false);
    Ok((cfg, auth))
}

/// Checks that `hash` is a bcrypt hash this crate can verify. The reasons never repeat the
/// value: a password put there by mistake must not reach a log.
fn check_bcrypt(hash: &str) -> Result<(), String> {
    let parts: Vec<&str> = hash.split('$').collect();
    let ["", version, cost, tail] = parts[..] else {
        return Err("it is not of the form $2y$COST$ and 53 characters".into());
    };
    if !["2a", "2b", "2x", "2y"].contains(&version) {
        return Err("its version is not 2a, 2b, 2x or 2y".into());
    }
    match cost.parse::<u32>() {
        Ok(c) if (4..=31).contains(&c) => {}
        Ok(c) => return Err(format!("cost {c} is not 4 to 31")),
        Err(_) => return Err("its cost is not a number".into()),
    }
    if tail.len() != 53
        || !tail
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    {
        return Err("its salt and hash are not 53 characters of bcrypt's alphabet".into());
    }
    hash.parse::<bcrypt::HashParts>()
        .map(|_| ())
        .map_err(|_| "bcrypt cannot read it".into())
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let Some((canonical, allowed)) = SETTABLE_HEADERS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    else {
        return Err(format!(
            "http_server_config.headers: `{name}` cannot be set (only {})",
            SETTABLE_HEADERS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    if let Some(allowed) = allowed {
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(value)) {
            return Err(format!(
                "http_server_config.headers.{canonical}: `{value}` is not allowed (only {})",
                allowed.join(", ")
            ));
        }
    }
    let v = HeaderValue::from_str(value).map_err(|_| {
        format!("http_server_config.headers.{canonical}: `{value}` is not a valid header value")
    })?;
    Ok((HeaderName::from_static(lower(canonical)), v))
}

/// The lower-case spelling of a settable header (a `HeaderName` wants it).
fn lower(name: &str) -> &'static str {
    match name {
        "Strict-Transport-Security" => "strict-transport-security",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-Frame-Options" => "x-frame-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "content-security-policy",
    }
}

// ---- client certificate verifiers beyond rustls's own ---------------------------------------

/// `RequestClientCert` / `RequireAnyClientCert`: a certificate is asked for (or required) and
/// not verified against any CA, as in Go; its handshake signature still is (the client holds
/// its key).
#[derive(Debug)]
struct AnyCert {
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `client_allowed_sans`: a verified client certificate must also name one of these.
#[derive(Debug)]
struct AllowedSans {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AllowedSans {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        if self
            .names
            .iter()
            .any(|n| rustls::client::verify_server_name(&parsed, n).is_ok())
        {
            Ok(ok)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---- the file as served: reloaded on change, passwords cached -------------------------------

/// What identifies a file's content without reading it.
type Stamp = Option<(u64, u64, i64, i64, u64)>;

/// A changed file is read again once none of its files has changed for this long: a file
/// being rewritten in place is not read half-written (cut short, it could be a weaker
/// configuration: the TLS part without the users after it).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether none of `files` changed in the last [`SETTLE`].
fn settled(files: &[PathBuf]) -> bool {
    files.iter().all(|f| {
        std::fs::metadata(f)
            .and_then(|m| m.modified())
            .map_or(true, |t| t.elapsed().map_or(true, |age| age >= SETTLE))
    })
}

fn stamp(p: &Path) -> Stamp {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// A `--web-config` file as the server uses it: the configuration of the latest good read,
/// read again when one of its files changed.
pub struct WebConfigFile {
    path: PathBuf,
    current: RwLock<(Vec<Stamp>, Arc<WebConfig>)>,
    /// (user, hash, password) digest → whether it matched.
    cache: Mutex<HashMap<[u8; 32], bool>>,
    /// One bcrypt at a time (each takes a core for tens of milliseconds).
    bcrypt: Arc<Mutex<()>>,
}

impl fmt::Debug for WebConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebConfigFile({})", self.path.display())
    }
}

impl WebConfigFile {
    /// Loads `path` (an error says what to fix).
    pub fn open(path: &Path) -> Result<Self, WebConfigError> {
        let cfg = WebConfig::load(path)?;
        let stamps = cfg.files.iter().map(|f| stamp(f)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            current: RwLock::new((stamps, Arc::new(cfg))),
            cache: Mutex::new(HashMap::new()),
            bcrypt: Arc::new(Mutex::new(())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration now: read again if a file changed since, once it has settled (the
    /// previous one is kept, and the failure logged, when the new one does not load).
    pub fn current(&self) -> Arc<WebConfig> {
        let (stale, cfg) = {
            let cur = self.current.read().expect("web config lock");
            let now: Vec<Stamp> = cur.1.files.iter().map(|f| stamp(f)).collect();
            (now != cur.0, cur.1.clone())
        };
        if !stale || !settled(&cfg.files) {
            return cfg;
        }
        let mut cur = self.current.write().expect("web config lock");
        match WebConfig::load(&self.path) {
            // Files it names anew that are being written: later.
            Ok(new) if !settled(&new.files) => {}
            Ok(new) => {
                tracing::info!(
                    "web config {} read again: {}",
                    self.path.display(),
                    new.describe()
                );
                let stamps = new.files.iter().map(|f| stamp(f)).collect();
                *cur = (stamps, Arc::new(new));
                self.cache.lock().expect("auth cache lock").clear();
            }
            Err(e) => {
                tracing::warn!("{e}; the previous web configuration stays in force");
                // Not again until the files change once more.
                cur.0 = cur.1.files.iter().map(|f| stamp(f)).collect();
            }
        }
        cur.1.clone()
    }

    /// Whether a request for `path` with this `Authorization` header may be served by `cfg`.
    pub async fn authorized(
        &self,
        cfg: &WebConfig,
        path: &str,
        header: Option<&HeaderValue>,
    ) -> bool {
        if !cfg.needs_auth(path) {
            return true;
        }
        let Some((user, password)) = WebConfig::credentials(header) else {
            return false;
        };
        let known = cfg.users.get(&user);
        let hash = known.map_or(DUMMY_HASH, String::as_str).to_string();
        let key = {
            let mut d = ring::digest::Context::new(&ring::digest::SHA256);
            for part in [user.as_bytes(), hash.as_bytes(), password.as_bytes()] {
                d.update(&(part.len() as u64).to_le_bytes());
                d.update(part);
            }
            let mut k = [0u8; 32];
            k.copy_from_slice(d.finish().as_ref());
            k
        };
        if let Some(ok) = self.cache.lock().expect("auth cache lock").get(&key) {
            return *ok;
        }
        let lock = self.bcrypt.clone();
        let matched = tokio::task::spawn_blocking(move || {
            let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = matched && known.is_some();
        let mut cache = self.cache.lock().expect("auth cache lock");
        if cache.len() >= CACHE_ENTRIES {
            if let Some(k) = cache.keys().next().copied() {
                cache.remove(&k);
            }
        }
        cache.insert(key, ok);
        ok
    }

    /// How many (user, password) results are cached (for the tests).
    #[cfg(test)]
    fn cached(&self) -> usize {
        self.cache.lock().unwrap().len()
    }
}

/// `--web-config`'s value parser: the file is read and checked while the command line is.
pub fn parse_arg(s: &str) -> Result<Arc<WebConfigFile>, String> {
    WebConfigFile::open(Path::new(s))
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for one test.
    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("llamaprobe-webcfg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A self-signed certificate and its key (PEM), from rcgen.
    fn cert_and_key(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn load(d: &Path, yaml: &str) -> Result<WebConfig, String> {
        let p = d.join("web.yml");
        std::fs::write(&p, yaml).unwrap();
        WebConfig::load(&p).map_err(|e| e.to_string())
    }

    /// bcrypt of "secret" at cost 4 (quick in tests).
    fn hash() -> String {
        bcrypt::hash("secret", 4).unwrap()
    }

    #[test]
    fn an_empty_file_is_plain_http_without_auth() {
        let d = dir("empty");
        for body in ["", "# nothing\n", "---\n"] {
            let c = load(&d, body).unwrap();
            assert!(c.tls.is_none() && c.users.is_empty(), "{body:?}");
            assert!(!c.needs_auth("/metrics"));
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let d = dir("unknown");
        let e = load(&d, "tls_server_config:\n  cert_fil: x.crt\n").unwrap_err();
        assert!(e.contains("unknown key `cert_fil`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = load(&d, "basic_auth_user:\n  a: b\n").unwrap_err();
        assert!(e.contains("unknown key `basic_auth_user`"), "{e}");
        let e = load(&d, "llamaprobe:\n  open_paths: [/healthz]\n").unwrap_err();
        assert!(e.contains("unknown key `open_paths`"), "{e}");
        let e = load(&d, "rate_limit:\n  interval: 1s\n  burst: 5\n").unwrap_err();
        assert!(e.contains("rate_limit is not supported"), "{e}");
    }

    #[test]
    fn bad_hashes_and_paths_say_what_to_fix() {
        let d = dir("bad");
        let e = load(&d, "basic_auth_users:\n  alice: plaintext\n").unwrap_err();
        assert!(
            e.contains("basic_auth_users.alice: not a bcrypt hash") && e.contains("htpasswd"),
            "{e}"
        );
        let e = load(
            &d,
            "basic_auth_users:\n  alice: $2y$99$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi\n",
        )
        .unwrap_err();
        assert!(e.contains("cost 99"), "{e}");
        let e = load(
            &d,
            "llamaprobe:\n  unauthenticated_paths: [/metrics]\nbasic_auth_users: {}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("`/metrics` cannot be served without credentials"),
            "{e}"
        );
        let e = load(&d, "http_server_config:\n  headers:\n    Server: x\n").unwrap_err();
        assert!(e.contains("`Server` cannot be set"), "{e}");
        let e = load(
            &d,
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        )
        .unwrap_err();
        assert!(e.contains("not allowed (only deny, sameorigin)"), "{e}");
        let missing = WebConfig::load(&d.join("nope.yml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nope.yml") && missing.contains("cannot read it"),
            "{missing}"
        );
        let e = load(
            &d,
            "tls_server_config:\n  cert_file: gone.crt\n  key_file: gone.key\n",
        )
        .unwrap_err();
        assert!(
            e.contains(&d.join("gone.crt").display().to_string())
                && e.contains("relative path is taken from the web config file's directory"),
            "{e}"
        );
        let e = load(&d, "tls_server_config:\n  key_file: gone.key\n").unwrap_err();
        assert!(e.contains("cert_file is missing"), "{e}");
    }

    #[test]
    fn relative_paths_are_from_the_files_directory() {
        let d = dir("relative");
        std::fs::create_dir_all(d.join("tls")).unwrap();
        let (cert, key) = cert_and_key("localhost");
        std::fs::write(d.join("tls/server.crt"), &cert).unwrap();
        std::fs::write(d.join("tls/server.key"), &key).unwrap();
        // Read from another working directory: the paths hold.
        let c = load(
            &d,
            "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n",
        )
        .unwrap();
        assert!(c.tls.is_some());
        assert_eq!(c.scheme(), "https");
        assert_eq!(
            c.files,
            [
                d.join("web.yml"),
                d.join("tls/server.crt"),
                d.join("tls/server.key")
            ]
        );
        assert_eq!(
            c.describe(),
            "TLS, client certificates NoClientCert, no basic auth"
        );
    }

    #[test]
    fn keys_and_certificates_are_checked() {
        let d = dir("keys");
        let (cert, key) = cert_and_key("localhost");
        let (_, other_key) = cert_and_key("other");
        std::fs::write(d.join("s.crt"), &cert).unwrap();
        std::fs::write(d.join("s.key"), &key).unwrap();
        std::fs::write(d.join("other.key"), &other_key).unwrap();
        std::fs::write(d.join("junk.key"), "not a key\n").unwrap();
        for (yaml, want) in [
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: other.key\n",
                "is not the private key of",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: junk.key\n",
                "no private key read from it",
            ),
            (
                "tls_server_config:\n  cert_file: s.key\n  key_file: s.key\n",
                "no certificate in it",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  client_auth_type: RequireAndVerifyClientCert\n",
                "needs client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  client_ca_file: s.crt\n",
                "client_auth_type is NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  client_auth_type: Always\n",
                "`Always` is not one of",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  max_version: TLS11\n",
                "TLS 1.2 and 1.3 only",
            ),
            (
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  cipher_suites: [TLS_RSA_WITH_AES_128_CBC_SHA]\n",
                "`TLS_RSA_WITH_AES_128_CBC_SHA` is not one llamaprobe offers",
            ),
        ] {
            let e = load(&d, yaml).unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        // What a node exporter's file may hold is taken.
        let c = load(
            &d,
            &format!(
                "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: s.crt\n  min_version: TLS12\n  max_version: TLS13\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305]\n  curve_preferences: [X25519, CurveP256]\n  prefer_server_cipher_suites: true\n  client_allowed_sans: [client.example, 127.0.0.1]\nhttp_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000\nbasic_auth_users:\n  alice: {}\nllamaprobe:\n  unauthenticated_paths: [/healthz]\n",
                hash()
            ),
        )
        .unwrap();
        assert_eq!(
            c.describe(),
            "TLS, client certificates RequireAndVerifyClientCert, basic auth (1 user), open: /healthz"
        );
        assert_eq!(c.headers().len(), 2);
        assert!(c.needs_auth("/metrics") && !c.needs_auth("/healthz") && c.needs_auth("/readyz"));
        // Inline PEM, as the toolkit allows.
        let inline = format!(
            "tls_server_config:\n  cert: |\n{}  key: |\n{}",
            indent(&cert),
            indent(&key)
        );
        assert!(load(&d, &inline).unwrap().tls.is_some());
    }

    fn indent(pem: &str) -> String {
        pem.lines().map(|l| format!("    {l}\n")).collect()
    }

    #[test]
    fn passwords_are_checked_once_and_cached() {
        let d = dir("auth");
        let p = d.join("web.yml");
        std::fs::write(&p, format!("basic_auth_users:\n  alice: {}\n", hash())).unwrap();
        let f = WebConfigFile::open(&p).unwrap();
        let basic = |u: &str, pw: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"))
            ))
            .unwrap()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg = f.current();
            assert!(
                f.authorized(&cfg, "/metrics", Some(&basic("alice", "secret")))
                    .await
            );
            assert!(
                f.authorized(&cfg, "/metrics", Some(&basic("alice", "secret")))
                    .await
            );
            assert_eq!(f.cached(), 1);
            assert!(
                !f.authorized(&cfg, "/metrics", Some(&basic("alice", "wrong")))
                    .await
            );
            assert!(
                !f.authorized(&cfg, "/metrics", Some(&basic("bob", "secret")))
                    .await
            );
            assert!(!f.authorized(&cfg, "/metrics", None).await);
            let bearer = HeaderValue::from_static("Bearer abc");
            assert!(!f.authorized(&cfg, "/metrics", Some(&bearer)).await);
            assert_eq!(f.cached(), 3);
        });
        // A changed file is read again once it settled (and the cache emptied); a broken one
        // keeps the last.
        std::fs::write(&p, "basic_auth_users: {}\n# changed\n").unwrap();
        assert!(
            f.current().needs_auth("/metrics"),
            "read while just written"
        );
        std::thread::sleep(SETTLE + std::time::Duration::from_millis(100));
        assert!(!f.current().needs_auth("/metrics"));
        assert_eq!(f.cached(), 0);
        std::fs::write(&p, "basic_auth_userz: {}\n# broken\n").unwrap();
        std::thread::sleep(SETTLE + std::time::Duration::from_millis(100));
        assert!(!f.current().needs_auth("/metrics"));
    }
}
