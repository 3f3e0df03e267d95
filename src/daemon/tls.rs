//! NBD over TLS (NBD_OPT_STARTTLS): the server's credentials from `[nbd.tls]`, the export
//! policy the sessions apply, and the layer a connection puts between its socket and its
//! session once the session has acknowledged STARTTLS.
//!
//! rustls works on byte buffers: ciphertext moves between rustls and the non-blocking socket
//! here, plaintext between rustls and the connection's own receive and send buffers, so the
//! session sees exactly the bytes it would see without TLS. X.509 only: rustls has no
//! external pre-shared keys on the server side (docs/nbd.md).

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tessel_targets::nbd::{TlsMode, TlsPolicy};

use crate::config::{self, Config};

/// Why `[nbd.tls]` could not be turned into server credentials.
#[derive(Debug)]
pub enum CredentialsError {
    /// A PEM file could not be read or holds nothing of the kind needed.
    File {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// rustls refused the set (a key that does not match the certificate, say).
    Refused(rustls::Error),
    /// The client CAs cannot verify client certificates.
    ClientCa(VerifierBuilderError),
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialsError::File { key, path, detail } => {
                write!(f, "nbd.tls.{key} ({}): {detail}", path.display())
            }
            CredentialsError::Refused(e) => write!(f, "[nbd.tls]: {e}"),
            CredentialsError::ClientCa(e) => write!(f, "nbd.tls.client_ca: {e}"),
        }
    }
}

impl std::error::Error for CredentialsError {}

/// The server side of TLS as `[nbd.tls]` describes it (paths resolved against data_dir):
/// TLS 1.2 and 1.3, and with `client_ca` a client certificate signed by it is required.
pub fn credentials(
    c: &Config,
    tls: &config::NbdTlsConfig,
) -> Result<Arc<ServerConfig>, CredentialsError> {
    let provider = Arc::new(ring::default_provider());
    let certs = certificates(&c.resolve(&tls.certificate), "certificate")?;
    let key_path = c.resolve(&tls.key);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| CredentialsError::File {
        key: "key",
        path: key_path,
        detail: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(CredentialsError::Refused)?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(&c.resolve(ca), "client_ca")? {
                roots.add(cert).map_err(CredentialsError::Refused)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(CredentialsError::ClientCa)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(CredentialsError::Refused)?;
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; none is an error.
fn certificates(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let failed = |detail: String| CredentialsError::File {
        key,
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Which exports need TLS: `nbd.tls.default`, and each `[[export]]`'s own `tls`.
pub fn policy(c: &Config, tls: &config::NbdTlsConfig) -> TlsPolicy {
    let mode = |m: config::TlsMode| match m {
        config::TlsMode::Optional => TlsMode::Optional,
        config::TlsMode::Require => TlsMode::Require,
    };
    TlsPolicy {
        default: mode(tls.default),
        exports: c
            .exports
            .iter()
            .filter_map(|x| Some((x.name(), mode(x.tls?))))
            .collect(),
    }
}

/// What one `TlsLayer::receive` found.
pub enum Received {
    /// This many plaintext bytes.
    Data(usize),
    /// Nothing more until the socket is readable again.
    Blocked,
    /// The peer ended the connection (close_notify or end of stream).
    Closed,
}

/// One connection's TLS, between the socket and the connection's plaintext buffers.
pub struct TlsLayer {
    conn: ServerConnection,
    peer: SocketAddr,
    /// The handshake's end was logged.
    announced: bool,
    close_sent: bool,
}

impl TlsLayer {
    /// The server side of a new TLS session with `peer`.
    pub fn new(config: Arc<ServerConfig>, peer: SocketAddr) -> io::Result<TlsLayer> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(TlsLayer {
            conn,
            peer,
            announced: false,
            close_sent: false,
        })
    }

    /// Take bytes the client sent before TLS started (right behind its STARTTLS): the start
    /// of its handshake, or garbage that fails it.
    pub fn feed(&mut self, mut early: &[u8]) -> io::Result<()> {
        while !early.is_empty() {
            self.conn.read_tls(&mut early)?;
            self.process()?;
        }
        Ok(())
    }

    /// Decrypted bytes into `buf` (not empty), reading the socket as needed.
    pub fn receive(&mut self, socket: &mut impl Read, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => return Ok(Received::Closed),
                Ok(n) => return Ok(Received::Data(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(Received::Closed),
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(socket) {
                Ok(0) => return Ok(Received::Closed),
                Ok(_) => self.process()?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Received::Blocked),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Decrypt what arrived; a handshake or record error queues an alert (`flush` sends it).
    fn process(&mut self) -> io::Result<()> {
        self.conn
            .process_new_packets()
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        if !self.announced && !self.conn.is_handshaking() {
            self.announced = true;
            tracing::info!(
                peer = %self.peer,
                version = ?self.conn.protocol_version(),
                suite = ?self.conn.negotiated_cipher_suite().map(|s| s.suite()),
                client_certificate = self.conn.peer_certificates().is_some(),
                "nbd: TLS established"
            );
        }
        Ok(())
    }

    /// Encrypt what of `plain` rustls' output buffer takes and write ciphertext until the
    /// socket is full; returns the plaintext bytes taken (the rest waits in the caller's
    /// buffer, where the memory budget sees it).
    pub fn send(&mut self, socket: &mut impl Write, plain: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        while self.flush(socket)? && taken < plain.len() {
            match self.conn.writer().write(&plain[taken..])? {
                0 => break,
                n => taken += n,
            }
        }
        Ok(taken)
    }

    /// Queue close_notify once (the clean end of TLS before the socket closes).
    pub fn close(&mut self) {
        if !self.close_sent {
            self.close_sent = true;
            self.conn.send_close_notify();
        }
    }

    /// Write queued ciphertext; false while the socket takes no more.
    pub fn flush(&mut self, socket: &mut impl Write) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// True while ciphertext waits for the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }
}
